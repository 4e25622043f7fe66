"""``diffalign eval``: a checkpoint (or a run's latest weights) on test and out-of-domain prompts.

Scores every image with every ShapesWorld measure: the exact verifier (overall, per task
type, hallucinated / missing / mis-attributed objects), the ShapesScore proxy reward (and its
correlation with, and gap to, the verifier), the JPEG size, the low-level hallucination
metrics next to the renderer's for the same prompts and seeds, and — with several images
per prompt — diversity within a prompt.

Writes ``eval.json`` (every figure), ``eval.md`` (tables) and one image grid per split.
Deterministic given the seeds: prompts are task-balanced draws (``prompt_seed``), each
repeated ``images_per_prompt`` times, and image ``i`` uses seed ``image_seed + i``. With
``images_per_prompt=1`` the images are exactly those of earlier versions of this command.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffalign.errors import CheckpointError, DiffalignError
from diffalign.evaluation.grid import save_grid
from diffalign.evaluation.hallucination import low_level_metrics, summarize
from diffalign.evaluation.quick import verdict_stats
from diffalign.models.tiny import TinyFlowPolicy
from diffalign.sampling.generate import generate
from diffalign.world.grammar import TASKS, eval_prompts
from diffalign.world.render import render_batch
from diffalign.world.verify import verify_batch

LOW_LEVEL = ("laplacian_var", "highpass", "edge_spread", "flat_noise")


def _load_run(path: Path, step: int | None = None) -> tuple[TinyFlowPolicy, str]:
    """The latest weights (or ``step``'s) of a training run directory (EMA when the run
    evaluates with it)."""
    from diffalign.config import load_yaml
    from diffalign.training.rundir import latest_step, load_checkpoint

    if not (path / "config.yaml").is_file():
        hint = " (it holds eval.json: it is an evaluation output, not a run)" if (path / "eval.json").exists() else ""
        raise DiffalignError(f"{path} is not a run directory: no config.yaml{hint}. Give a training run "
                             "directory, a tiny-model .safetensors checkpoint, or 'base'.")
    cfg = load_yaml(path / "config.yaml") or {}
    family = cfg.get("model_family", "tiny")
    if family != "tiny":
        raise DiffalignError(f"run {path} fine-tunes a {family!r} model; diffalign eval measures ShapesWorld tiny "
                             "models only (use the run's own evaluation for other families)")
    if latest_step(path) is None:
        raise CheckpointError(f"run {path} has no checkpoint yet (nothing under {path / 'checkpoints'}); let it "
                              "train until its first checkpoint (ckpt_every) or evaluate another run")
    lora_rank = int(cfg.get("lora_rank") or 0)
    try:
        policy = TinyFlowPolicy.from_checkpoint(cfg.get("model"), lora_rank=lora_rank,
                                                lora_alpha=cfg.get("lora_alpha"))
    except CheckpointError as e:
        raise CheckpointError(f"run {path}: its base model cannot be loaded: {e}") from None
    state = load_checkpoint(path, step)
    use_ema = bool((cfg.get("eval") or {}).get("use_ema", True))
    weights = (state.get("snapshots") or {}).get("ema") if use_ema else None
    weights = weights or state.get("policy")
    if not isinstance(weights, dict):
        raise CheckpointError(f"run {path}: its checkpoint holds no policy weights")
    params = policy.trainable_state()
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    wrong = [k for k in set(params) & set(weights) if tuple(params[k].shape) != tuple(weights[k].shape)]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise CheckpointError(
            f"run {path}: its checkpoint does not fit the model in its config.yaml (model={cfg.get('model')!r}, "
            f"lora_rank={lora_rank}): {len(missing)} missing, {len(extra)} unexpected, {len(wrong)} mis-shaped "
            f"parameters (e.g. {first!r}). Was the run's base model replaced, or config.yaml edited?")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    return policy, f"run {path} (step {state.get('epoch', state.get('step', '?'))})"


def load_policy_for_eval(target: str | Path | None) -> tuple[TinyFlowPolicy, str]:
    """A checkpoint file, a training run directory (its latest policy, EMA if it has one), or None (base)."""
    if target is None:
        return TinyFlowPolicy.from_checkpoint(None), "shipped base model"
    path = Path(target)
    if not path.exists():
        raise DiffalignError(f"{path}: no such checkpoint file or run directory")
    if path.is_dir():
        from diffalign.training.rundir import checkpoint_dir_step

        step = checkpoint_dir_step(path)  # <run>/checkpoints/step_N: that step of the run
        return _load_run(path) if step is None else _load_run(path.parent.parent, step)
    return TinyFlowPolicy.from_checkpoint(path), str(path)


def diversity(images: torch.Tensor, prompts: list[str], verdicts: list) -> dict[str, float]:
    """Diversity within a prompt, averaged over the prompts that have ≥ 2 images.

    ``diversity/pixel``: mean pairwise RMS difference between a prompt's images ([0, 1] units).
    ``diversity/centroid``: mean pairwise distance (px) between the centroids of all detected
    objects of two images of a prompt (images with no detection are left out).
    ``diversity/outcomes``: mean number of distinct detected object sets (colour, shape,
    count) per prompt, divided by its number of images (1 = every image differs)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    pix, cen, out = [], [], []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        x = images[idx].flatten(1).double()
        d = torch.cdist(x, x) / x.shape[1] ** 0.5
        iu = torch.triu_indices(len(idx), len(idx), 1)
        pix.append(float(d[iu[0], iu[1]].mean()))
        cents = []
        for i in idx:
            dets = verdicts[i].detections
            if dets:
                cents.append(np.mean([(d.cx, d.cy) for d in dets], axis=0))
        if len(cents) >= 2:
            cen.append(float(np.mean([np.linalg.norm(a - b) for a, b in itertools.combinations(cents, 2)])))
        sigs = {tuple(sorted((d.color, d.shape) for d in verdicts[i].detections)) for i in idx}
        out.append(len(sigs) / len(idx))
    res = {}
    if pix:
        res["diversity/pixel"] = float(np.mean(pix))
        res["diversity/outcomes"] = float(np.mean(out))
    if cen:
        res["diversity/centroid"] = float(np.mean(cen))
    return res


def _proxy():
    """The shipped ShapesScore reward, or None (with the reason) when it is unavailable."""
    from diffalign.rewards.shapes_score import ShapesScore

    try:
        return ShapesScore(), None
    except CheckpointError as e:
        return None, str(e)


def proxy_stats(proxy, images: torch.Tensor, prompts: list[str], verdicts: list, prefix: str = "proxy") -> dict:
    """Mean ShapesScore, its correlation with the verifier (score and partial) and its gap to it."""
    from diffalign.training.proxy import pearson

    with torch.no_grad():
        s = proxy(images, prompts, [{} for _ in prompts]).scores.double()
    score = torch.tensor([v.score for v in verdicts], dtype=torch.float64)
    partial = torch.tensor([v.partial for v in verdicts], dtype=torch.float64)
    def corr(a, b):  # None (JSON null) when one side is constant, e.g. every image fails
        r = pearson(a, b)
        return None if r != r else r

    return {f"{prefix}/score": float(s.mean()), f"{prefix}/pearson_score": corr(s, score),
            f"{prefix}/pearson_partial": corr(s, partial),
            f"{prefix}/agreement": float(((s > 0.5).double() == score).double().mean()),
            f"{prefix}/gap": float(s.mean() - score.mean())}


def evaluate(target, out_dir: str | Path, *, num_images: int = 512, steps: int = 20, guidance_scale: float = 4.5,
             splits: tuple[str, ...] = ("test", "ood"), prompt_seed: int = 0, image_seed: int = 0,
             images_per_prompt: int = 1, use_proxy: bool = True, batch_size: int = 64,
             tasks: tuple[str, ...] | None = None) -> dict:
    """Evaluate ``target`` (see :func:`load_policy_for_eval`) and write eval.json / eval.md / grids.

    ``num_images`` images per split: ``num_images // images_per_prompt`` task-balanced prompts,
    each ``images_per_prompt`` times; ``tasks``: only these task types (None = all six)."""
    if num_images <= 0 or steps <= 0:
        raise DiffalignError("--num-images and --steps must be positive")
    if images_per_prompt < 1 or num_images % images_per_prompt:
        raise DiffalignError(f"--images-per-prompt {images_per_prompt} must be at least 1 and divide --num-images "
                             f"{num_images}")
    bad = [s for s in splits if s not in ("train", "test", "ood")]
    if bad or not splits:
        raise DiffalignError(f"unknown split(s) {bad or splits}; choose from train, test, ood")
    for split in splits:  # bad task names fail here, before the model loads
        eval_prompts(split, 1, seed=prompt_seed, tasks=tasks)
    policy, label = load_policy_for_eval(target)
    policy.eval()
    proxy, proxy_missing = _proxy() if use_proxy else (None, "disabled (--no-proxy)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": label, "num_images": num_images, "images_per_prompt": images_per_prompt,
                    "steps": steps, "guidance_scale": guidance_scale, "prompt_seed": prompt_seed,
                    "image_seed": image_seed, "tasks": list(tasks) if tasks else None, "proxy": proxy.info.get("heldout_pair_accuracy") if proxy else None,
                    "proxy_unavailable": proxy_missing, "splits": {}}
    for split in splits:
        t0 = time.perf_counter()
        base = eval_prompts(split, num_images // images_per_prompt, seed=prompt_seed, tasks=tasks)
        prompts = [p for p in base for _ in range(images_per_prompt)]
        seeds = [image_seed + i for i in range(num_images)]
        with torch.no_grad():
            images = generate(policy, prompts, seeds, steps=steps, cfg=guidance_scale, batch_size=batch_size)
        gen_s = time.perf_counter() - t0
        verdicts = verify_batch(images, prompts)
        res = verdict_stats(prompts, verdicts)
        res |= {f"lowlevel/{k}": v for k, v in summarize(low_level_metrics(images)).items()}
        renders = render_batch(prompts, seeds)
        res |= {f"renderer_lowlevel/{k}": v for k, v in summarize(low_level_metrics(renders)).items()}
        from diffalign.rewards.jpeg import jpeg_sizes_kb

        res["jpeg_kb"] = float(jpeg_sizes_kb(images).mean())
        if proxy is not None:
            res |= proxy_stats(proxy, images, prompts, verdicts)
            with torch.no_grad():
                res["renderer_proxy/score"] = float(proxy(renders, prompts, [{} for _ in prompts]).scores.mean())
        res |= diversity(images, prompts, verdicts)
        res["seconds"] = gen_s
        report["splits"][split] = res
        save_grid(images[:64], out / f"grid_{split}.png", ncol=8 if images_per_prompt == 1 else images_per_prompt,
                  captions=prompts[:64], marks=[v.score == 1.0 for v in verdicts[:64]])
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(markdown(report))
    return report


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def markdown(report: dict) -> str:
    splits = list(report["splits"])
    k = report.get("images_per_prompt", 1)
    lines = [f"# Evaluation: {report['model']}", "",
             f"{report['num_images']} images per split ({k} per prompt), {report['steps']} Euler steps, "
             f"CFG {report['guidance_scale']}, prompt seed {report['prompt_seed']}, image seeds "
             f"{report['image_seed']}…" + (f"; task types: {', '.join(report['tasks'])}" if report.get("tasks") else ""),
             "",
             "| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    keys = ["score", "partial"] + [f"score/{t}" for t in TASKS] + [
        "hallucinated", "misattributed", "missing", "high_level_hallucination",
        "proxy/score", "proxy/gap", "proxy/pearson_score", "proxy/pearson_partial", "proxy/agreement",
        "renderer_proxy/score", "jpeg_kb", "diversity/pixel", "diversity/centroid", "diversity/outcomes"]
    for key in keys:
        if any(key in report["splits"][s] for s in splits):
            lines.append(f"| {key} | " + " | ".join(_fmt(report["splits"][s].get(key)) for s in splits) + " |")
    if report.get("proxy_unavailable"):
        lines += ["", f"Proxy reward not scored: {report['proxy_unavailable']}"]
    elif report.get("proxy") is not None:
        lines += ["", f"proxy = ShapesScore (held-out pair accuracy {report['proxy']:.3f}); gap = proxy score − "
                      "verifier score; pearson_* = correlation with the verifier over the images."]
    if k < 2:
        lines += ["", "Diversity needs several images per prompt: rerun with --images-per-prompt 4."]
    lines += ["", "Low-level hallucination (model vs renderer images of the same prompts and seeds):", "",
              "| metric | " + " | ".join(f"{s} model | {s} renderer" for s in splits) + " |",
              "|---|" + "---|---|" * len(splits)]
    for key in LOW_LEVEL:
        cells = []
        for s in splits:
            r = report["splits"][s]
            cells += [f"{r[f'lowlevel/{key}']:.4f}", f"{r[f'renderer_lowlevel/{key}']:.4f}"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
