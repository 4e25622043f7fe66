"""Training data and training loop of the ShapesScore proxy reward.

Pairs (``diffalign data proxy-pairs``): for task-balanced prompts of one split, each pair is
``(prompt, winner image, loser image)`` where the verifier passes the winner and fails the
loser on that prompt. Kinds:

=========================  ===============================================================
kind                       winner vs loser
=========================  ===============================================================
``nearmiss:<k>``           the render vs a near-miss of kind ``k`` (object removed, wrong
                           colour, wrong shape, mirrored relation, extra object)
``other_prompt``           the render vs the render of another prompt (same seed)
``base_failure``           the render vs a base-model image that fails the prompt
``base_success_vs_nearmiss`` a base-model image that passes vs a near-miss
``base_vs_base``           a base-model image that passes vs one that fails, same prompt
=========================  ===============================================================

Base-model images use few Euler steps (``base_steps``, default 8): they are cheap and fail
more often, which gives more realistic negatives. Every image is judged by the verifier, so
each label is exact.

Training (``diffalign proxy train``): Bradley–Terry on the pairs, ``−log σ(s_w − s_l)``, plus
a pointwise binary cross-entropy (winners 1, losers 0) weighted by ``bce_weight`` so that
``σ(s)`` reads as "probability the image satisfies the prompt".
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.config import MAX_SEED, ranged
from diffalign.errors import ConfigError, DiffalignError
from diffalign.rewards.shapes_score import ShapesScoreConfig, ShapesScoreNet, save_shapes_score, text_features
from diffalign.world.grammar import TASKS, eval_prompts, parse_prompt
from diffalign.world.nearmiss import NEAR_MISS_KINDS, near_miss
from diffalign.world.render import render
from diffalign.world.verify import verify

PAIRS_FORMAT = "diffalign.proxy-pairs/1"
BASE_KINDS = ("base_failure", "base_success_vs_nearmiss", "base_vs_base")


@dataclass
class ProxyPairsConfig:
    """What ``diffalign data proxy-pairs`` builds."""

    split: str = "train"
    """Prompt split the pairs are drawn from (train, test or ood)."""
    num_prompts: int = ranged(3000, ge=1)
    """Task-balanced prompt draws, each with its own image seed (renders + near-misses)."""
    base_prompts: int = ranged(512, ge=0)
    """Of those, how many also get base-model images (``base_images_per_prompt`` each)."""
    base_images_per_prompt: int = ranged(2, ge=1)
    """Base-model images per prompt (2 gives pass-vs-fail pairs within a prompt)."""
    base_steps: int = ranged(8, ge=1)
    """Euler ODE steps for base-model images (few: cheap, and they fail more often)."""
    base_cfg: float = ranged(4.5, ge=0)
    """CFG scale of the base-model images."""
    base_model: str | None = None
    """Tiny-model checkpoint for the model images (None = the shipped base)."""
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    """Prompt draw seed; image seeds are ``seed·1_000_000 + i`` (use another seed for held-out pairs)."""

    def validate(self) -> None:
        if self.split not in ("train", "test", "ood"):
            raise ConfigError(f"split must be train, test or ood; got {self.split!r}")
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be at least 1; got {self.num_prompts}")
        if not 0 <= self.base_prompts <= self.num_prompts:
            raise ConfigError(f"base_prompts must be in [0, num_prompts={self.num_prompts}]; got {self.base_prompts}")
        if self.base_images_per_prompt < 1 or self.base_steps < 1:
            raise ConfigError("base_images_per_prompt and base_steps must be at least 1")


class _Builder:
    """Accumulates unique images and pairs."""

    def __init__(self):
        self.images: list[np.ndarray] = []
        self.image_prompt: list[str] = []
        self.image_source: list[str] = []
        self.image_score: list[float] = []
        self.image_partial: list[float] = []
        self.pairs: list[tuple[str, int, int, str]] = []

    def add(self, img: np.ndarray, prompt: str, source: str) -> int:
        v = verify(img, prompt)
        self.images.append(np.ascontiguousarray(img))
        self.image_prompt.append(prompt)
        self.image_source.append(source)
        self.image_score.append(float(v.score))
        self.image_partial.append(float(v.partial))
        return len(self.images) - 1

    def pair(self, prompt: str, w: int, l: int, kind: str) -> bool:
        """Add the pair when the verifier passes ``w`` and fails ``l`` on ``prompt``."""
        if verify(self.images[w], prompt).score == 1.0 and verify(self.images[l], prompt).score == 0.0:
            self.pairs.append((prompt, w, l, kind))
            return True
        return False


def _render_pairs(cfg: ProxyPairsConfig, prompts: list[str], rng: random.Random, b: _Builder) -> list[int]:
    """Phase 1: each prompt's render against its near-misses and another prompt's render.

    Returns the image index of every prompt's render."""
    renders: list[int] = []
    for i, p in enumerate(prompts):
        s = cfg.seed * 1_000_000 + i
        r = b.add(render(p, s, avoid_held_out=cfg.split != "ood")[0], p, "render")
        renders.append(r)
        for kind in NEAR_MISS_KINDS:
            img = near_miss(p, s, kind)
            if img is not None:
                b.pair(p, r, b.add(img, p, f"nearmiss:{kind}"), f"nearmiss:{kind}")
        q = prompts[rng.randrange(len(prompts))]
        if parse_prompt(q) != parse_prompt(p):
            b.pair(p, r, b.add(render(q, s)[0], p, "other_prompt"), "other_prompt")
    return renders


def _base_images(cfg: ProxyPairsConfig, prompts: list[str], say) -> tuple[np.ndarray, list[int]]:
    """``base_images_per_prompt`` base-model images of each of the first ``base_prompts``
    prompts (contiguous per prompt), uint8, and their seeds."""
    from diffalign.models.tiny import TinyFlowPolicy
    from diffalign.sampling.generate import generate
    from diffalign.world.render import to_uint8

    policy = TinyFlowPolicy.from_checkpoint(cfg.base_model).eval()
    k = cfg.base_images_per_prompt
    gen_prompts = [prompts[i] for i in range(cfg.base_prompts) for _ in range(k)]
    gen_seeds = [cfg.seed * 1_000_000 + 500_000 + i * k + j for i in range(cfg.base_prompts) for j in range(k)]
    t0 = time.perf_counter()
    done = [0]

    def tick(n):
        done[0] += n
        say(f"base images {done[0]}/{len(gen_prompts)} ({time.perf_counter() - t0:.0f} s)")

    images = to_uint8(generate(policy, gen_prompts, gen_seeds, steps=cfg.base_steps, cfg=cfg.base_cfg,
                               batch_size=64, progress=tick))
    return images, gen_seeds


def _base_pairs(cfg: ProxyPairsConfig, prompts: list[str], renders: list[int], rng: random.Random,
                b: _Builder, say) -> None:
    """Phase 2: base-model images against renders, near-misses and each other (``BASE_KINDS``)."""
    images, gen_seeds = _base_images(cfg, prompts, say)
    k = cfg.base_images_per_prompt
    for i in range(cfg.base_prompts):
        p = prompts[i]
        ids = [b.add(images[i * k + j], p, "base") for j in range(k)]
        wins = [j for j in ids if b.image_score[j] == 1.0]
        fails = [j for j in ids if b.image_score[j] == 0.0]
        for f in fails:
            b.pair(p, renders[i], f, "base_failure")
        for w in wins:
            nm_seed = gen_seeds[i * k] + 17
            kinds = [kd for kd in NEAR_MISS_KINDS if near_miss(p, nm_seed, kd) is not None]
            kd = rng.choice(kinds)
            nm = b.add(near_miss(p, nm_seed, kd), p, f"nearmiss:{kd}")
            b.pair(p, w, nm, "base_success_vs_nearmiss")
            for f in fails:
                b.pair(p, w, f, "base_vs_base")


def build_proxy_pairs(cfg: ProxyPairsConfig, *, progress=None) -> dict:
    """Build the pair dataset (a dict ready for :func:`save_pairs`). ``progress(msg)`` gets status lines."""
    cfg.validate()
    say = progress or (lambda msg: None)
    prompts = eval_prompts(cfg.split, cfg.num_prompts, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    b = _Builder()
    renders = _render_pairs(cfg, prompts, rng, b)
    say(f"{len(prompts)} renders, {len(b.pairs)} render pairs")
    if cfg.base_prompts:
        _base_pairs(cfg, prompts, renders, rng, b, say)
    say(f"{len(b.images)} images, {len(b.pairs)} pairs")
    return {
        "format": PAIRS_FORMAT,
        "config": json.dumps(asdict(cfg)),
        "images": torch.from_numpy(np.stack(b.images)),
        "image_prompt": b.image_prompt,
        "image_source": b.image_source,
        "image_score": torch.tensor(b.image_score),
        "image_partial": torch.tensor(b.image_partial),
        "pair_prompt": [q[0] for q in b.pairs],
        "winner": torch.tensor([q[1] for q in b.pairs], dtype=torch.long),
        "loser": torch.tensor([q[2] for q in b.pairs], dtype=torch.long),
        "pair_kind": [q[3] for q in b.pairs],
    }


def save_pairs(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return path


def load_pairs(path: str | Path) -> dict:
    """Load a pair file written by ``diffalign data proxy-pairs``; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"no pair file at {path}; build one with 'diffalign data proxy-pairs --out {path}'")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise DiffalignError(f"{path} is not a readable pair file ({type(e).__name__}); rebuild it with "
                             "'diffalign data proxy-pairs'") from None
    if not isinstance(data, dict) or data.get("format") != PAIRS_FORMAT:
        raise DiffalignError(f"{path} is not a proxy-pair file (expected format {PAIRS_FORMAT!r}); build one with "
                             "'diffalign data proxy-pairs'")
    return data


def describe_pairs(data: dict) -> dict:
    kinds: dict[str, int] = {}
    for k in data["pair_kind"]:
        kinds[k] = kinds.get(k, 0) + 1
    return {"images": len(data["image_prompt"]), "pairs": len(data["pair_kind"]), "kinds": dict(sorted(kinds.items()))}


# --------------------------------------------------------------------------- training


@dataclass
class ProxyTrainConfig:
    """``diffalign proxy train``: fits ShapesScore on a pair file."""

    epochs: int = ranged(4, ge=1)
    """Passes over the training pairs."""
    batch_size: int = ranged(128, ge=1)
    """Pairs per optimizer step (2× as many images)."""
    lr: float = ranged(2e-3, gt=0)
    """Peak AdamW learning rate (cosine decay to 5% of it)."""
    weight_decay: float = ranged(1e-4, ge=0)
    """AdamW weight decay."""
    bce_weight: float = ranged(0.5, ge=0)
    """Weight of the pointwise cross-entropy next to the pairwise Bradley–Terry loss."""
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    """Initialisation and shuffling seed."""
    threads: int = ranged(0, ge=0)
    """torch threads (0 = leave as is)."""
    channels: tuple[int, ...] = ranged((16, 32, 48, 64), ge=1)
    """Conv stage widths of the model."""
    holdout_prompts: float = ranged(0.15, ge=0, lt=1)
    """Fraction of the training file's distinct prompts held out with all their pairs (base-model
    pairs included): a second held-out figure, on prompts the model never saw in training."""
    max_pairs: int | None = ranged(None, ge=1)
    """Train on a random subset of at most this many of the remaining pairs (None = all)."""


def subset_pairs(data: dict, keep: list[int]) -> dict:
    """The pair file restricted to pairs ``keep`` (images are shared, not copied)."""
    return data | {"pair_prompt": [data["pair_prompt"][i] for i in keep],
                   "pair_kind": [data["pair_kind"][i] for i in keep],
                   "winner": data["winner"][keep], "loser": data["loser"][keep]}


def split_by_prompt(data: dict, fraction: float, seed: int = 0) -> tuple[dict, dict | None]:
    """Hold out ``fraction`` of the distinct prompts with all their pairs: ``(rest, held_out)``."""
    if fraction <= 0:
        return data, None
    prompts = sorted(set(data["pair_prompt"]))
    rng = random.Random(seed)
    held = set(rng.sample(prompts, max(1, round(fraction * len(prompts)))))
    idx_in = [i for i, p in enumerate(data["pair_prompt"]) if p not in held]
    idx_out = [i for i, p in enumerate(data["pair_prompt"]) if p in held]
    out = subset_pairs(data, idx_out)
    # only the held-out prompts' base images count for the correlation figures
    out["image_source"] = [s if (s != "base" or data["image_prompt"][j] in held) else "base(train)"
                           for j, s in enumerate(data["image_source"])]
    return subset_pairs(data, idx_in), out


def _images(data: dict, idx: torch.Tensor) -> torch.Tensor:
    return data["images"][idx].permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def pair_logits(model: ShapesScoreNet, data: dict, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every pair's winner and loser, each ``(P,)``, scored against the pair's prompt."""
    model.eval()
    sw, sl = [], []
    n = len(data["pair_kind"])
    for i in range(0, n, batch):
        prompts = data["pair_prompt"][i : i + batch]
        text = text_features(prompts)
        sw.append(model(_images(data, data["winner"][i : i + batch]), text))
        sl.append(model(_images(data, data["loser"][i : i + batch]), text))
    return torch.cat(sw), torch.cat(sl)


@torch.no_grad()
def image_logits(model: ShapesScoreNet, data: dict, which: list[int], batch: int = 512) -> torch.Tensor:
    """Logits of images ``which`` against the prompt each was made for."""
    model.eval()
    out = []
    for i in range(0, len(which), batch):
        idx = torch.tensor(which[i : i + batch], dtype=torch.long)
        out.append(model(_images(data, idx), text_features([data["image_prompt"][j] for j in idx.tolist()])))
    return torch.cat(out) if out else torch.zeros(0)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties)."""
    from scipy.stats import rankdata

    return pearson(torch.from_numpy(rankdata(a.numpy())), torch.from_numpy(rankdata(b.numpy())))


def pair_report(model: ShapesScoreNet, data: dict) -> dict:
    """Held-out figures: pair accuracy overall, per kind and per task; pointwise accuracy of
    ``σ(s) > ½``; and on base-model images the correlation of ``σ(s)`` with the verifier."""
    sw, sl = pair_logits(model, data)
    correct = (sw > sl).float()
    kinds = data["pair_kind"]
    tasks = [parse_prompt(p).task for p in data["pair_prompt"]]
    rep: dict = {"pairs": len(kinds), "pair_accuracy": float(correct.mean()) if len(kinds) else float("nan")}
    rep["by_kind"] = {k: float(correct[[i for i, kk in enumerate(kinds) if kk == k]].mean())
                      for k in sorted(set(kinds))}
    rep["by_task"] = {t: float(correct[[i for i, tt in enumerate(tasks) if tt == t]].mean())
                      for t in TASKS if t in tasks}
    point = torch.cat([(sw > 0).float(), (sl <= 0).float()])
    rep["pointwise_accuracy"] = float(point.mean()) if len(point) else float("nan")
    base = [i for i, s in enumerate(data["image_source"]) if s == "base"]
    if len(base) >= 3:
        prob = torch.sigmoid(image_logits(model, data, base))
        score, partial = data["image_score"][base], data["image_partial"][base]
        rep["base_images"] = {
            "n": len(base), "verifier_score": float(score.mean()), "proxy_score": float(prob.mean()),
            "pearson_score": pearson(prob, score), "pearson_partial": pearson(prob, partial),
            "spearman_partial": spearman(prob, partial),
            "accuracy": float(((prob > 0.5).float() == score).float().mean()),
        }
    return rep


def train_proxy(cfg: ProxyTrainConfig, train: dict, heldout: dict | None = None, *, progress=None
                ) -> tuple[ShapesScoreNet, dict]:
    """Fit ShapesScore on ``train`` pairs; returns the model and a report (held-out figures if given)."""
    say = progress or (lambda msg: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if len(train["pair_kind"]) == 0:
        raise DiffalignError("the training pair file holds no pairs; build more with 'diffalign data proxy-pairs'")
    train, inner_heldout = split_by_prompt(train, cfg.holdout_prompts, cfg.seed)
    if cfg.max_pairs is not None and len(train["pair_kind"]) > cfg.max_pairs:
        keep = sorted(random.Random(cfg.seed + 1).sample(range(len(train["pair_kind"])), cfg.max_pairs))
        train = subset_pairs(train, keep)
    n = len(train["pair_kind"])
    torch.manual_seed(cfg.seed)
    model = ShapesScoreNet(ShapesScoreConfig(channels=tuple(cfg.channels)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    text_all = text_features(sorted(set(train["pair_prompt"])))  # warm the encoder cache
    del text_all
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, history = time.perf_counter(), []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        tot, acc = 0.0, 0.0
        for s in range(0, n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            text = text_features([train["pair_prompt"][i] for i in idx.tolist()])
            imgs = torch.cat([_images(train, train["winner"][idx]), _images(train, train["loser"][idx])])
            logits = model(imgs, torch.cat([text, text]))
            sw, sl = logits.chunk(2)
            bt = -F.logsigmoid(sw - sl).mean()
            bce = 0.5 * (F.softplus(-sw).mean() + F.softplus(sl).mean())
            loss = bt + cfg.bce_weight * bce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            acc += float((sw > sl).float().sum())
        row = {"epoch": epoch + 1, "loss": tot / n, "train_pair_accuracy": acc / n,
               "seconds": time.perf_counter() - t0}
        if heldout is not None:
            sw, sl = pair_logits(model, heldout)
            row["heldout_pair_accuracy"] = float((sw > sl).float().mean())
        history.append(row)
        say(json.dumps(row))
    report = {"config": asdict(cfg), "train_pairs": describe_pairs(train), "history": history,
              "train_seconds": time.perf_counter() - t0}
    if heldout is not None:
        report["heldout"] = pair_report(model, heldout)
    if inner_heldout is not None and len(inner_heldout["pair_kind"]):
        report["heldout_train_prompts"] = pair_report(model, inner_heldout)
    return model, report


def save_trained(model: ShapesScoreNet, report: dict, out: str | Path, heldout: dict | None = None) -> Path:
    """Save the model with its held-out accuracy (when known) in the checkpoint metadata."""
    info = {"train_config": report["config"], "train_pairs": report["train_pairs"],
            "train_seconds": round(report["train_seconds"], 1)}
    if "heldout" in report:
        h = report["heldout"]
        info |= {"heldout_pair_accuracy": h["pair_accuracy"], "heldout_pairs": h["pairs"],
                 "heldout_by_kind": h["by_kind"], "heldout_by_task": h["by_task"]}
        if "base_images" in h:
            info["heldout_base_images"] = h["base_images"]
        if heldout is not None:
            info["heldout_data"] = json.loads(heldout["config"])
    if "heldout_train_prompts" in report:
        h = report["heldout_train_prompts"]
        info["heldout_train_prompts"] = {k: h[k] for k in ("pairs", "pair_accuracy", "by_kind", "base_images")
                                         if k in h}
    return save_shapes_score(out, model, info)


# --------------------------------------------------------------------------- blind spots


def _mean_prob(model: ShapesScoreNet, images: torch.Tensor, prompts: list[str]) -> float:
    with torch.no_grad():
        return float(torch.sigmoid(model(images, text_features(prompts))).mean())


def _pass_rate(images: torch.Tensor, prompts: list[str]) -> float:
    from diffalign.world.verify import verify_batch

    return float(np.mean([v.score for v in verify_batch(images.clamp(0, 1), prompts)]))


def probe_blind_spots(model: ShapesScoreNet, *, n: int = 96, seed: int = 4242, split: str = "test",
                      attack_steps: int = 20, attack_eps: float = 8 / 255) -> dict:
    """Where the proxy and the verifier disagree, on ``n`` fresh prompts and seeds of ``split``.

    For each perturbation: the proxy's mean ``σ(s)`` and the verifier's pass rate. Perturbations
    of correct renders that the verifier tolerates (pixel noise, a slight colour shift, a
    tinted background) and edits it does not (near-misses, a blank canvas, the render of
    another prompt). ``attack``: from near-misses (verifier 0), ``attack_steps`` signed-gradient
    ascent steps on the proxy within ``±attack_eps`` per pixel — how far the proxy can be
    pushed by small pixel changes that the verifier ignores (a worst case of reward hacking)."""
    model.eval()
    prompts = eval_prompts(split, n, seed=seed)
    seeds = [seed * 1000 + i for i in range(n)]
    good = torch.stack([torch.from_numpy(render(p, s, avoid_held_out=split != "ood")[0]) for p, s in
                        zip(prompts, seeds, strict=True)]).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(seed)
    white = (good > 0.99).all(dim=1, keepdim=True)
    cases = {
        "render": good,
        "render + noise σ=0.03": (good + 0.03 * torch.randn(good.shape, generator=g)).clamp(0, 1),
        "render + noise σ=0.08": (good + 0.08 * torch.randn(good.shape, generator=g)).clamp(0, 1),
        "render, colours shifted (+0.08 red)": torch.where(white, good, (good + torch.tensor([0.08, 0, 0])
                                                                         .view(1, 3, 1, 1)).clamp(0, 1)),
        "render, background tinted (0.92 blue-grey)": torch.where(white, torch.tensor([0.92, 0.92, 1.0])
                                                                  .view(1, 3, 1, 1).expand_as(good), good),
        "render, blurred (3×3 box)": F.avg_pool2d(F.pad(good, (1, 1, 1, 1), mode="replicate"), 3, stride=1),
        "blank canvas": torch.ones_like(good),
    }
    for kind in NEAR_MISS_KINDS:
        imgs, ps = [], []
        for p, s in zip(prompts, seeds, strict=True):
            img = near_miss(p, s, kind)
            if img is not None:
                imgs.append(torch.from_numpy(img))
                ps.append(p)
        if imgs:
            cases[f"near-miss: {kind}"] = (torch.stack(imgs).permute(0, 3, 1, 2).float() / 255, ps)
    out: dict = {"n": n, "split": split, "cases": {}}
    for name, val in cases.items():
        imgs, ps = val if isinstance(val, tuple) else (val, prompts)
        out["cases"][name] = {"n": len(ps), "proxy": _mean_prob(model, imgs, ps), "verifier": _pass_rate(imgs, ps)}

    # adversarial: signed-gradient ascent on the proxy from near-misses (object removed / wrong colour)
    start, ps = [], []
    for p, s in zip(prompts, seeds, strict=True):
        img = near_miss(p, s, "wrong_color") if parse_prompt(p).objects[0].color else near_miss(p, s, "object_removed")
        start.append(torch.from_numpy(img))
        ps.append(p)
    x0 = torch.stack(start).permute(0, 3, 1, 2).float() / 255
    text = text_features(ps)
    x = x0.clone()
    for _ in range(attack_steps):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(model(x, text).sum(), x)
        x = (x.detach() + (attack_eps / 4) * grad.sign()).clamp(x0 - attack_eps, x0 + attack_eps).clamp(0, 1)
    out["attack"] = {"steps": attack_steps, "eps": attack_eps, "proxy_before": _mean_prob(model, x0, ps),
                     "proxy_after": _mean_prob(model, x, ps), "verifier_before": _pass_rate(x0, ps),
                     "verifier_after": _pass_rate(x, ps)}
    return out


def record_heldout(checkpoint: str | Path, pairs: dict) -> dict:
    """Measure a ShapesScore checkpoint on held-out ``pairs`` and record the figures in its metadata."""
    from diffalign.rewards.shapes_score import load_shapes_score

    model, info = load_shapes_score(checkpoint)
    h = pair_report(model, pairs)
    info |= {"heldout_pair_accuracy": h["pair_accuracy"], "heldout_pairs": h["pairs"],
             "heldout_by_kind": h["by_kind"], "heldout_by_task": h["by_task"],
             "heldout_data": json.loads(pairs["config"])}
    if "base_images" in h:
        info["heldout_base_images"] = h["base_images"]
    save_shapes_score(checkpoint, model, info)
    return h
