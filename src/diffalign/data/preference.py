"""Preference data: ``(prompt, winner, loser)`` pairs on disk, and the ShapesWorld builder.

A dataset is a directory (format ``diffalign.prefs/1``, documented in ``docs/data.md``)::

    DIR/
      manifest.json             format, image size, pair count, shard list (rows, sha256), builder settings
      pairs.jsonl               one JSON line per pair: {"prompt", "shard", "row", ...free-form extras}
      shard-00000.safetensors   uint8 tensors "winners" (n, 3, H, W) and, unless winners-only,
                                "losers" (n, 3, H, W); row i of both is pair i of that shard

:class:`PreferenceWriter` writes one (also for your own images); :func:`load_preference_dataset`
reads and checks one, raising :class:`~diffalign.errors.DatasetError` that names the file and
the problem when a shard is missing, corrupt, changed since it was written (sha256), of the
wrong shape or dtype, or disagrees with the index. :meth:`PreferenceDataset.winners_only` is
the winners-only view SePPO and SFT train on.

:func:`build_shapes_preferences` makes a Pick-a-Pic-like set on ShapesWorld: base-model
samples of training prompts (Euler ODE, few steps, batched) are judged by the exact verifier;
the rejected ones become losers, each paired with a winner for the same prompt — a renderer
image, or a verified-correct base-model sample. Shards are written as they fill, so an
interrupted build resumes where it stopped (same command), and a finished one is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from diffalign.config import MAX_SEED, config_to_dict, ranged
from diffalign.errors import ConfigError, DatasetError

__all__ = [
    "FORMAT",
    "PrefDataConfig",
    "PreferenceBatch",
    "PreferenceDataset",
    "PreferenceWriter",
    "build_shapes_preferences",
    "load_preference_dataset",
]

FORMAT = "diffalign.prefs/1"
MANIFEST = "manifest.json"
INDEX = "pairs.jsonl"


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_uint8_chw(image: Tensor | np.ndarray, size: int, what: str) -> Tensor:
    """One image → uint8 ``(3, size, size)``. Accepts float ``(3, H, W)`` in [0, 1] or uint8
    ``(3, H, W)`` / ``(H, W, 3)`` (tensor or numpy)."""
    t = torch.as_tensor(np.asarray(image)) if isinstance(image, np.ndarray) else image.detach().cpu()
    if t.dim() == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.shape != (3, size, size):
        raise DatasetError(f"{what} must be a (3, {size}, {size}) image (or ({size}, {size}, 3) uint8); "
                           f"got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if not t.dtype.is_floating_point:
        raise DatasetError(f"{what} must be uint8 or float in [0, 1]; got {t.dtype}")
    return t.float().clamp(0, 1).mul(255).round().to(torch.uint8).contiguous()


# --------------------------------------------------------------------------- writing


class PreferenceWriter:
    """Write a preference dataset, shard by shard.

    >>> with PreferenceWriter("my_prefs", image_size=32) as w:
    ...     w.add("a red circle", winner_image, loser_image)    # float (3, H, W) in [0, 1] or uint8
    ...     w.add("two blue squares", winner_image)             # winners-only dataset: no loser

    Either every pair has a loser or none does. ``extra`` keyword arguments go into the pair's
    index line (JSON values). Nothing is final until :meth:`close` (the manifest says
    ``"complete": false`` until then).
    """

    def __init__(self, out: str | Path, *, image_size: int = 32, shard_size: int = 256,
                 builder: dict | None = None) -> None:
        if shard_size < 1:
            raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
        self.out = Path(out)
        self.image_size = int(image_size)
        self.shard_size = int(shard_size)
        self.builder = builder or {}
        self.shards: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.has_losers: bool | None = None
        self._w: list[Tensor] = []
        self._l: list[Tensor] = []
        self._pending: list[dict[str, Any]] = []
        self.auto_flush = True
        """Write a shard as soon as ``shard_size`` pairs are pending (builders that flush at
        their own boundaries turn this off)."""
        self.out.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> PreferenceWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()

    def __len__(self) -> int:
        return len(self.records) + len(self._pending)

    @property
    def pending(self) -> int:
        """Pairs added but not yet written to a shard."""
        return len(self._pending)

    def add(self, prompt: str, winner: Tensor | np.ndarray, loser: Tensor | np.ndarray | None = None,
            **extra: Any) -> None:
        """Append one pair (a winner alone for a winners-only dataset)."""
        if not isinstance(prompt, str) or not prompt:
            raise DatasetError(f"a pair needs a non-empty prompt string, got {prompt!r}")
        has = loser is not None
        if self.has_losers is None:
            self.has_losers = has
        elif self.has_losers != has:
            raise DatasetError("either every pair has a loser or none does (winners-only); this pair "
                               f"{'has' if has else 'lacks'} one and the earlier ones do not agree")
        self._w.append(_to_uint8_chw(winner, self.image_size, "winner"))
        if has:
            self._l.append(_to_uint8_chw(loser, self.image_size, "loser"))
        self._pending.append({"prompt": prompt, **extra})
        if self.auto_flush and len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending pairs as one shard and update the index and manifest."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        name = _shard_name(len(self.shards))
        tensors = {"winners": torch.stack(self._w)}
        if self.has_losers:
            tensors["losers"] = torch.stack(self._l)
        path = self.out / name
        tmp = self.out / f".tmp-{name}"
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        tmp.replace(path)
        rows = len(self._pending)
        self.shards.append({"file": name, "rows": rows, "sha256": _sha256(path)})
        self.records += [{"prompt": r.pop("prompt"), "shard": name, "row": i, **r}
                         for i, r in enumerate(self._pending)]
        self._w, self._l, self._pending = [], [], []
        self._write_index(complete=False)

    def _write_index(self, *, complete: bool) -> None:
        tmp = self.out / f".tmp-{INDEX}"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        tmp.replace(self.out / INDEX)
        manifest = {"format": FORMAT, "image_size": self.image_size, "num_pairs": len(self.records),
                    "has_losers": bool(self.has_losers), "complete": complete, "shards": self.shards,
                    "builder": self.builder}
        tmp = self.out / f".tmp-{MANIFEST}"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.out / MANIFEST)

    def close(self) -> Path:
        """Write the last shard and mark the dataset complete; returns its directory."""
        self.flush()
        if not self.records:
            raise DatasetError(f"no pairs were added to {self.out}; nothing to write")
        self._write_index(complete=True)
        return self.out

    @classmethod
    def resume(cls, out: str | Path, *, shard_size: int, builder: dict) -> PreferenceWriter:
        """Continue an incomplete dataset written with the same ``builder`` settings: its
        shards are checked (sha256) and kept."""
        out = Path(out)
        manifest = _read_manifest(out)
        if manifest.get("builder") != builder:
            raise DatasetError(
                f"{out} holds a preference dataset built with other settings ({manifest.get('builder')}); "
                "choose another --out, or delete it to rebuild")
        w = cls(out, image_size=manifest["image_size"], shard_size=shard_size, builder=builder)
        w.shards = list(manifest["shards"])
        w.has_losers = manifest["has_losers"] if manifest["shards"] else None
        for s in w.shards:
            _check_sha(out, s)
        w.records = _read_index(out, {s["file"]: s["rows"] for s in w.shards})
        return w


# --------------------------------------------------------------------------- reading


@dataclass
class PreferenceBatch:
    """A batch of pairs. ``B`` pairs, images ``(B, 3, H, W)`` float in [0, 1]."""

    prompts: list[str]
    winners: Tensor
    losers: Tensor | None
    """None for a winners-only dataset."""


@dataclass
class PreferenceDataset:
    """Pairs in memory: ``N`` prompts, uint8 images ``(N, 3, H, W)``; ``losers`` None if
    winners-only. ``records`` are the index lines (prompt, shard, row, extras)."""

    prompts: list[str]
    winners: Tensor
    losers: Tensor | None
    records: list[dict[str, Any]]
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def image_size(self) -> int:
        return int(self.winners.shape[-1])

    def batch(self, indices: Sequence[int] | Tensor) -> PreferenceBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return PreferenceBatch(
            prompts=[self.prompts[i] for i in idx.tolist()],
            winners=self.winners[idx].float().div(255.0),
            losers=None if self.losers is None else self.losers[idx].float().div(255.0),
        )

    def winners_only(self) -> PreferenceDataset:
        """The winners-only view: each distinct (prompt, winner image) once, no losers."""
        seen: dict[tuple[str, bytes], int] = {}
        for i, (p, w) in enumerate(zip(self.prompts, self.winners, strict=True)):
            seen.setdefault((p, w.numpy().tobytes()), i)
        keep = sorted(seen.values())
        return PreferenceDataset([self.prompts[i] for i in keep], self.winners[keep], None,
                                 [self.records[i] for i in keep], self.root)


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise DatasetError(f"no preference dataset at {root} (not a directory); build one with "
                           f"'diffalign data prefs --out {root}'")
    if not path.is_file():
        raise DatasetError(f"{root} is not a preference dataset (no {MANIFEST}); build one with "
                           f"'diffalign data prefs --out {root}' or write one with PreferenceWriter")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); the dataset is corrupt — rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"{path}: format {got!r} is not {FORMAT!r}; see docs/data.md for the layout")
    for key in ("image_size", "num_pairs", "has_losers", "shards"):
        if key not in manifest:
            raise DatasetError(f"{path} lacks the key {key!r}; see docs/data.md for the layout")
    return manifest


def _check_sha(root: Path, shard: dict[str, Any]) -> Path:
    path = root / shard["file"]
    if not path.is_file():
        raise DatasetError(f"shard {path} listed in {root / MANIFEST} is missing; restore it or rebuild the dataset")
    if shard.get("sha256") and _sha256(path) != shard["sha256"]:
        raise DatasetError(f"shard {path} is corrupt or was replaced: its sha256 does not match "
                           f"{root / MANIFEST}. Restore it, or rebuild the dataset (same command)")
    return path


def _read_index(root: Path, rows: dict[str, int]) -> list[dict[str, Any]]:
    path = root / INDEX
    if not path.is_file():
        raise DatasetError(f"{root} lacks its index {INDEX}; rebuild the dataset")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n} is not a JSON line ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or "shard" not in r or "row" not in r:
            raise DatasetError(f"{path}:{n} must be an object with 'prompt' (text), 'shard' and 'row'; got {line[:120]}")
        if r["shard"] not in rows:
            raise DatasetError(f"{path}:{n} names shard {r['shard']!r}, which {MANIFEST} does not list")
        if not isinstance(r["row"], int) or not 0 <= r["row"] < rows[r["shard"]]:
            raise DatasetError(f"{path}:{n}: row {r['row']!r} is out of range for {r['shard']} "
                               f"({rows[r['shard']]} rows)")
        records.append(r)
    return records


def _load_shard(root: Path, shard: dict[str, Any], size: int, has_losers: bool) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _check_sha(root, shard)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DatasetError(f"shard {path} is corrupt or not a safetensors file ({e}); restore it or rebuild "
                           "the dataset") from None
    need = ["winners", "losers"] if has_losers else ["winners"]
    for key in need:
        t = tensors.get(key)
        if t is None:
            raise DatasetError(f"shard {path} has no {key!r} tensor (has {sorted(tensors)}); "
                               f"{MANIFEST} says the dataset {'has' if has_losers else 'lacks'} losers")
        if t.dtype != torch.uint8 or t.dim() != 4 or tuple(t.shape[1:]) != (3, size, size):
            raise DatasetError(f"shard {path}: {key!r} must be uint8 (n, 3, {size}, {size}); got "
                               f"{t.dtype} {tuple(t.shape)} — it does not match the dataset's image size")
        if t.shape[0] != shard["rows"]:
            raise DatasetError(f"shard {path}: {key!r} has {t.shape[0]} rows, {MANIFEST} lists {shard['rows']}")
    return tensors


def load_preference_dataset(root: str | Path, *, allow_incomplete: bool = False) -> PreferenceDataset:
    """Read and check a dataset directory (see the module docstring)."""
    root = Path(root)
    manifest = _read_manifest(root)
    if not manifest.get("complete", True) and not allow_incomplete:
        raise DatasetError(f"preference dataset {root} is incomplete (its build was interrupted); run the "
                           "same 'diffalign data prefs' command again to finish it")
    size, has_losers = int(manifest["image_size"]), bool(manifest["has_losers"])
    shards = {s["file"]: _load_shard(root, s, size, has_losers) for s in manifest["shards"]}
    records = _read_index(root, {s["file"]: s["rows"] for s in manifest["shards"]})
    if len(records) != manifest["num_pairs"]:
        raise DatasetError(f"{root / INDEX} has {len(records)} pairs, {MANIFEST} says {manifest['num_pairs']}")
    if not records:
        raise DatasetError(f"preference dataset {root} holds no pairs")

    def gather(key: str) -> Tensor:
        return torch.stack([shards[r["shard"]][key][r["row"]] for r in records])

    return PreferenceDataset([r["prompt"] for r in records], gather("winners"),
                             gather("losers") if has_losers else None, records, root)


# --------------------------------------------------------------------------- the ShapesWorld builder


@dataclass
class PrefDataConfig:
    """``diffalign data prefs``: ShapesWorld preference pairs from the base model and the verifier."""

    num_pairs: int = ranged(1000, ge=1)
    """Pairs to make (one per rejected base-model sample)."""
    winners: Literal["render", "samples", "mixed"] = "render"
    """Winner of a pair: a renderer image of the prompt (render), a verified-correct base-model
    sample of the same prompt from the same round (samples; losers without one are dropped),
    or a correct sample when there is one, else a render (mixed)."""
    model: str | None = None
    """Tiny-model checkpoint that draws the samples (None = the shipped base)."""
    split: str = "train"
    """Prompt split the pairs come from."""
    steps: int = ranged(8, ge=1)
    """Euler ODE steps per sample (few: generation cost is linear in it)."""
    guidance_scale: float = ranged(4.5, ge=0)
    """CFG weight of the samples."""
    images_per_prompt: int = ranged(4, ge=1)
    """Base-model samples per chosen prompt and round."""
    batch_size: int = ranged(64, ge=1)
    """Images per round (one batched generation)."""
    shard_size: int = ranged(256, ge=1)
    """Pairs per shard file (a shard ends at the first round boundary past this)."""
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    """Seed of every draw (prompts, sample seeds, render seeds)."""
    max_rounds: int = ranged(1000, ge=1)
    """Give up after this many rounds (a model the verifier never rejects makes no losers)."""

    def validate(self) -> None:
        if self.winners not in ("render", "samples", "mixed"):
            raise ConfigError(f"winners={self.winners!r}; choose render, samples or mixed")
        if self.split not in ("train", "test", "ood"):
            raise ConfigError(f"split={self.split!r}; choose train, test or ood")
        for k in ("num_pairs", "steps", "images_per_prompt", "batch_size", "shard_size", "max_rounds"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be at least 1, got {getattr(self, k)}")
        if self.batch_size < self.images_per_prompt:
            raise ConfigError(f"batch_size ({self.batch_size}) must be at least images_per_prompt "
                              f"({self.images_per_prompt})")


def _round_plan(cfg: PrefDataConfig, rnd: int) -> tuple[list[str], list[int], list[int]]:
    """Round ``rnd``'s prompts (task-balanced, ``images_per_prompt`` each, contiguous), sample
    seeds and render seeds — a function of ``(seed, rnd)`` only."""
    from diffalign.world.grammar import TASKS, prompt_splits

    rng = np.random.default_rng([cfg.seed, rnd, 7])
    split = prompt_splits()[cfg.split]
    tasks = [t for t in TASKS if split[t]]
    n_prompts = cfg.batch_size // cfg.images_per_prompt
    chosen = []
    for _ in range(n_prompts):
        pool = split[tasks[rng.integers(len(tasks))]]
        chosen.append(pool[rng.integers(len(pool))])
    prompts = [p for p in chosen for _ in range(cfg.images_per_prompt)]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=len(prompts))]
    render_seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=len(prompts))]
    return prompts, seeds, render_seeds


def _is_finished(out: Path, builder: dict, num_pairs: int) -> bool:
    """Whether ``out`` holds a complete dataset built with ``builder`` and at least ``num_pairs`` pairs."""
    if not (out / MANIFEST).is_file():
        return False
    manifest = _read_manifest(out)
    return bool(manifest.get("complete")) and manifest.get("builder") == builder and manifest["num_pairs"] >= num_pairs


def _resume_writer(cfg: PrefDataConfig, out: Path, builder: dict) -> PreferenceWriter | None:
    """The writer of an unfinished (or to be extended) build in ``out``; None for a new dataset."""
    if (out / MANIFEST).is_file():
        return PreferenceWriter.resume(out, shard_size=cfg.shard_size, builder=builder)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not a preference dataset; choose an empty or new --out")
    return None


def _choose_winner(cfg: PrefDataConfig, prompt: str, rank: int, correct: list[int], images: Tensor,
                   seeds: list[int], render_seed: int, size: int) -> tuple[Tensor, str, int] | None:
    """The winner paired with a prompt's ``rank``-th rejected image: ``(image, source, seed)``,
    or None when ``winners=samples`` and the round has no correct sample of the prompt."""
    from diffalign.world.render import render

    if correct and cfg.winners in ("samples", "mixed"):
        j = correct[rank % len(correct)]  # spread the losers over the correct samples
        return images[j], "sample", seeds[j]
    if cfg.winners == "samples":
        return None
    return torch.from_numpy(render(prompt, render_seed, size)[0]), "render", render_seed


def _add_round(cfg: PrefDataConfig, rnd: int, policy, writer: PreferenceWriter, skip_through: int) -> None:
    """Generate and verify round ``rnd``; add a pair for each rejected image after ``skip_through``
    (its index in the round) until the writer holds ``num_pairs``."""
    from diffalign.sampling.generate import generate
    from diffalign.world.grammar import parse_prompt
    from diffalign.world.verify import verify_batch

    prompts, seeds, render_seeds = _round_plan(cfg, rnd)
    images = generate(policy, prompts, seeds, steps=cfg.steps, cfg=cfg.guidance_scale, batch_size=cfg.batch_size)
    verdicts = verify_batch(images, prompts)
    correct: dict[str, list[int]] = {}
    for i, v in enumerate(verdicts):
        if v.score == 1.0:
            correct.setdefault(prompts[i], []).append(i)
    taken: dict[str, int] = {}
    for i, v in enumerate(verdicts):
        if v.score == 1.0:
            continue
        p = prompts[i]
        rank = taken[p] = taken.get(p, -1) + 1  # this prompt's rank-th rejected image of the round
        if len(writer) >= cfg.num_pairs or i <= skip_through:
            continue
        chosen = _choose_winner(cfg, p, rank, correct.get(p, []), images, seeds, render_seeds[i], policy.image_size)
        if chosen is None:
            continue
        winner, source, wseed = chosen
        writer.add(p, winner, images[i], task=parse_prompt(p).task, loser_partial=float(v.partial),
                   loser_seed=seeds[i], winner_source=source, winner_seed=wseed, round=rnd, loser_index=i)


def build_shapes_preferences(cfg: PrefDataConfig, out: str | Path, *,
                             progress: Callable[[int, int], None] | None = None) -> Path:
    """Build (or finish, or reuse) a ShapesWorld preference dataset in ``out``.

    Each round generates ``batch_size`` base-model images of task-balanced ``split`` prompts and
    verifies them; every rejected image (verifier score 0) becomes the loser of one pair whose
    winner is chosen by ``cfg.winners``. Index extras: ``task``, ``loser_partial`` (the loser's
    fraction of constraints met), ``loser_seed``, ``winner_source`` (render | sample),
    ``winner_seed``, ``round``, ``loser_index`` (the image's place in its round).
    ``progress(pairs_done, num_pairs)`` is called after each round.
    """
    from diffalign.models.tiny import TinyFlowPolicy

    cfg.validate()
    out = Path(out)
    # num_pairs is not part of the identity: a larger num_pairs extends a finished dataset
    builder = {k: v for k, v in config_to_dict(cfg).items() if k != "num_pairs"}
    if _is_finished(out, builder, cfg.num_pairs):
        load_preference_dataset(out)  # reuse it, after checking it
        return out
    writer = _resume_writer(cfg, out, builder)
    policy = TinyFlowPolicy.from_checkpoint(cfg.model)
    policy.eval()
    if writer is None:
        writer = PreferenceWriter(out, image_size=policy.image_size, shard_size=cfg.shard_size, builder=builder)
    writer.auto_flush = False
    # rounds are deterministic: a resumed (or extended) build regenerates the last stored round
    # and continues after its last stored image, so it ends up equal to an uninterrupted build
    last = writer.records[-1] if writer.records else None
    rnd = last["round"] if last else 0
    skip_through = last["loser_index"] if last else -1
    while len(writer) < cfg.num_pairs:
        if rnd >= cfg.max_rounds:
            raise DatasetError(f"only {len(writer)} of {cfg.num_pairs} pairs after {rnd} rounds (max_rounds): the "
                               "model's samples are rarely rejected, or (winners=samples) rarely correct. "
                               "Raise max_rounds or use winners=render")
        _add_round(cfg, rnd, policy, writer, skip_through)
        # a shard never splits a round, so a resumed build restarts at a round boundary
        if writer.pending >= cfg.shard_size or len(writer) >= cfg.num_pairs:
            writer.flush()
        rnd, skip_through = rnd + 1, -1
        if progress is not None:
            progress(len(writer), cfg.num_pairs)
    return writer.close()


def dataset_summary(ds: PreferenceDataset) -> dict[str, Any]:
    """Counts by task and winner source, and the losers' mean partial score."""
    tasks: dict[str, int] = {}
    sources: dict[str, int] = {}
    for r in ds.records:
        tasks[r.get("task", "?")] = tasks.get(r.get("task", "?"), 0) + 1
        sources[r.get("winner_source", "?")] = sources.get(r.get("winner_source", "?"), 0) + 1
    partial = [r["loser_partial"] for r in ds.records if "loser_partial" in r]
    return {"pairs": len(ds), "winners_only": len(ds.winners_only()), "image_size": ds.image_size,
            "has_losers": ds.losers is not None, "by_task": tasks, "winner_source": sources,
            "loser_mean_partial": float(np.mean(partial)) if partial else None}

