"""The preference trainer: Diffusion-DPO, SePPO and SFT-on-winners over a dataset on disk.

One optimizer update = ``grad_accum`` micro-batches of ``batch_size`` pairs. Each micro-batch
reads top to bottom (ALGORITHMS.md §4):

1. **batch** — the next ``batch_size`` items of the epoch's shuffled order (pairs for
   Diffusion-DPO; the winners-only view for SePPO and SFT);
2. **reference samples** (SePPO) — a reference model chosen from the pool for this update
   generates ``x_s ~ π_ref(·|c)`` for the batch's prompts with ``seppo.sampler``;
3. **errors** — one shared ``(σ, ε)`` per pair; per-sample flow-matching errors of the
   policy (with gradient) and of the reference (no gradient) on the winner and the
   loser / reference sample;
4. **loss** — ``diffusion_dpo_loss``, ``seppo_loss`` or ``sft_loss``; backward; after
   ``grad_accum`` micro-batches clip, step, and (SePPO) maybe add the policy to the pool.

The reference is the base model for Diffusion-DPO (adapters off / base weights) and the
chosen pool entry for SePPO. SePPO's pool starts with the base model; every ``pool_every``
updates the policy is saved into it as a named snapshot (``seppo_pool_<update>``), keeping at
most ``pool_size`` entries (the oldest non-base one goes first; the base stays when
``keep_base``). Snapshots are part of every checkpoint.

Every random draw of micro-batch ``m`` (σ, ε, reference samples) and of update ``u`` (the
reference choice) comes from generators seeded with ``(seed, m)`` / ``(seed, u)``, and the
order of epoch ``e`` from ``(seed, e)``; with the weights, optimizer, snapshots, the pool list
and ``u`` saved, ``--resume`` continues exactly (same losses as an uninterrupted run on CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from diffalign.algorithms.preference import (
    SEPPO_FLIPPERS,
    diffusion_dpo_loss,
    flow_matching_error,
    seppo_loss,
    sft_loss,
)
from diffalign.config import MAX_SEED, load_yaml, ranged
from diffalign.data.preference import PreferenceDataset, load_preference_dataset
from diffalign.errors import CheckpointError, ConfigError
from diffalign.models.factory import FAMILIES, ModelOptions, build_policy
from diffalign.sampling.rollout import RolloutConfig, rollout
from diffalign.training import loop
from diffalign.training.rundir import MetricsLogger, save_checkpoint

__all__ = [
    "PREFERENCE_ALGORITHMS",
    "PrefEvalConfig",
    "PreferenceConfig",
    "PreferenceTrainer",
    "ReferencePool",
    "SePPOConfig",
    "preset_algorithm",
]

PREFERENCE_ALGORITHMS = ("diffusion_dpo", "seppo", "sft")
POOL_SELECTIONS = ("uniform", "first", "latest")
BASE = "base"
"""The pool's name for the base model (the ``reference()`` parameter set)."""


@dataclass
class SePPOConfig:
    """SePPO's reference pool, reference samples and flipper (ALGORITHMS.md §4)."""

    flipper: Literal["sign", "indicator", "off"] = "sign"
    """Anchor-based adaptive flipper: sign (the paper's), indicator (SFT-like on the winner
    where the reference explains it better), off (reference sample always the loser)."""
    selection: Literal["uniform", "first", "latest"] = "uniform"
    """Reference per update: uniform over the pool, first (the base model when kept), latest."""
    pool_every: int = ranged(10, ge=1)
    """Updates between saving the policy into the pool."""
    pool_size: int = ranged(5, ge=1)
    """Most entries in the pool, the base model included."""
    keep_base: bool = True
    """Never evict the base model from the pool."""
    sampler: RolloutConfig = field(default_factory=lambda: RolloutConfig(sampler="ode", steps=8))
    """How the reference model draws its samples (any rollout sampler; steps = model calls)."""
    dataset_losers: bool = False
    """Use the dataset's losers instead of reference samples (a check: with flipper off and
    selection first this is exactly Diffusion-DPO)."""


@dataclass
class PrefEvalConfig:
    """Periodic evaluation on held-out prompts (fixed prompts and seeds)."""

    every: int = ranged(20, ge=0)
    """Updates between evaluations (0 = only before training and at the end)."""
    num_images: int = ranged(64, ge=1)
    """Images per evaluation (task-balanced prompts, one image each)."""
    split: str = "test"
    """Prompt split of the periodic evaluation: test or ood."""
    final_splits: tuple[str, ...] = ("test", "ood")
    """Splits evaluated at the end of training (written to summary.json)."""
    final_num_images: int = ranged(128, ge=1)
    """Images per split in the final evaluation."""
    steps: int = ranged(20, ge=1)
    """ODE sampler steps."""
    guidance_scale: float = ranged(4.5, ge=0)
    """CFG weight at evaluation."""


@dataclass
class PreferenceConfig:
    """An off-policy preference fine-tuning run (ShapesWorld tiny model). Units in each docstring."""

    algorithm: str = "seppo"
    """diffusion_dpo, seppo or sft (SFT on the winners)."""
    data: str = "runs/prefs_shapes"
    """Preference dataset directory (diffalign data prefs --out DIR; docs/data.md)."""
    model: str | None = None
    """Tiny-model checkpoint to fine-tune (None = the shipped ShapesWorld base), or a local
    diffusers pipeline directory for model_family sd3 / flux / sd15."""
    model_family: str = "tiny"
    """Model family: tiny (ShapesWorld), sd3, flux or sd15 (SD1.5 needs model_options.flow_view:
    the losses use flow-matching errors). The image size is the dataset's."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    """dtype, LoRA targets, gradient checkpointing, device, ... of the diffusers adapters."""
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    """Seed of every random draw."""
    epochs: int = ranged(1, ge=1)
    """Passes over the dataset (pairs, or winners for seppo / sft)."""
    max_updates: int | None = ranged(None, ge=1)
    """Stop after this many optimizer updates (None = all epochs). Comparisons fix this."""
    batch_size: int = ranged(16, ge=1)
    """Pairs (or winners) per micro-batch."""
    grad_accum: int = ranged(1, ge=1)
    """Micro-batches per optimizer update."""
    beta: float = ranged(1000.0, gt=0)
    """β of Diffusion-DPO / SePPO (logit −β/2·(Δ_w − s·Δ_l); unused by sft)."""
    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    """Training σ distribution (one σ and one ε per pair, shared by winner and loser)."""
    lora_rank: int = ranged(32, ge=0)
    """LoRA rank (0 = full fine-tuning)."""
    lora_alpha: float | None = ranged(None, gt=0)
    """LoRA alpha (None = rank)."""
    lr: float = ranged(3e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = ranged(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)
    """AdamW betas."""
    grad_clip: float = ranged(1.0, ge=0)
    """Gradient-norm clip (0 = off)."""
    threads: int = ranged(0, ge=0)
    """torch threads (0 = default)."""
    max_train_minutes: float | None = ranged(None, gt=0)
    """Stop after the update in which training time passes this budget (None = no budget).
    Budget-stopped runs are not bit-exact on resume."""
    ckpt_every: int = ranged(20, ge=1)
    """Updates between checkpoints (the last update always saves)."""
    ckpt_keep_every: int = ranged(0, ge=0)
    """Keep the checkpoints of updates that are multiples of this for good (0 = keep only the
    newest two)."""
    seppo: SePPOConfig = field(default_factory=SePPOConfig)
    """SePPO settings (ignored by the other algorithms)."""
    eval: PrefEvalConfig = field(default_factory=PrefEvalConfig)
    """Evaluation during and after training."""

    def validate(self) -> None:
        if self.algorithm not in PREFERENCE_ALGORITHMS:
            raise ConfigError(f"unknown preference algorithm {self.algorithm!r}; choose one of "
                              f"{', '.join(PREFERENCE_ALGORITHMS)}")
        for k in ("epochs", "batch_size", "grad_accum", "ckpt_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be at least 1, got {getattr(self, k)}")
        if self.max_updates is not None and self.max_updates < 1:
            raise ConfigError(f"max_updates must be at least 1 (or null), got {self.max_updates}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a positive number, got {self.beta}")
        if self.timesteps not in ("logit_normal", "uniform"):
            raise ConfigError(f"timesteps={self.timesteps!r}; choose logit_normal or uniform")
        s = self.seppo
        if s.flipper not in SEPPO_FLIPPERS:
            raise ConfigError(f"seppo.flipper={s.flipper!r}; choose one of {', '.join(SEPPO_FLIPPERS)}")
        if s.selection not in POOL_SELECTIONS:
            raise ConfigError(f"seppo.selection={s.selection!r}; choose one of {', '.join(POOL_SELECTIONS)}")
        if s.pool_every < 1 or s.pool_size < 1:
            raise ConfigError(f"seppo.pool_every and seppo.pool_size must be at least 1, got "
                              f"{s.pool_every} and {s.pool_size}")
        if s.keep_base and s.pool_size < 2 and self.algorithm == "seppo":
            raise ConfigError("seppo.pool_size must be at least 2 with keep_base (the base plus one checkpoint)")
        for split in (self.eval.split, *self.eval.final_splits):
            if split not in ("train", "test", "ood"):
                raise ConfigError(f"evaluation split {split!r}; choose train, test or ood")


def preset_algorithm(path: str | Path) -> str | None:
    """The ``algorithm`` a preset sets, following its ``base:`` chain (None if none sets it)."""
    path = Path(path)
    seen: set[Path] = set()
    while path.resolve() not in seen:
        seen.add(path.resolve())
        data = load_yaml(path)
        if "algorithm" in data:
            return str(data["algorithm"])
        if "base" not in data:
            return None
        path = path.parent / str(data["base"])
    return None


def _seeded(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


# --------------------------------------------------------------------------- reference pool


class ReferencePool:
    """SePPO's pool of reference models: names of policy snapshots, oldest first.

    ``"base"`` stands for the base model (``policy.reference()``); other entries are snapshots
    saved with ``policy.save_snapshot``. The list itself is checkpointed (:meth:`state_dict`);
    the snapshot tensors travel in the policy's snapshot state.
    """

    def __init__(self, size: int, *, keep_base: bool = True, prefix: str = "seppo_pool_") -> None:
        self.size, self.keep_base, self.prefix = size, keep_base, prefix
        self.entries: list[str] = [BASE]

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, policy, update: int) -> list[str]:
        """Save the current policy as ``<prefix><update>``; evict beyond ``size``. Returns the
        evicted names (their snapshots are dropped)."""
        name = f"{self.prefix}{update}"
        policy.save_snapshot(name)
        self.entries.append(name)
        evicted = []
        while len(self.entries) > self.size:
            i = 1 if (self.keep_base and self.entries[0] == BASE) else 0
            gone = self.entries.pop(i)
            evicted.append(gone)
            if gone != BASE:
                policy.drop_snapshot(gone)
        return evicted

    def select(self, strategy: str, generator: torch.Generator) -> int:
        """Index of this step's reference: uniform over the pool, the first or the latest entry.
        ``uniform`` always draws one number from ``generator`` (so the others' draws do not
        depend on the strategy)."""
        draw = int(torch.randint(len(self.entries), (1,), generator=generator))
        if strategy == "uniform":
            return draw
        if strategy == "first":
            return 0
        if strategy == "latest":
            return len(self.entries) - 1
        raise ConfigError(f"unknown pool selection {strategy!r}; choose one of {', '.join(POOL_SELECTIONS)}")

    def context(self, policy, index: int) -> AbstractContextManager:
        """Run ``policy`` as pool entry ``index``."""
        name = self.entries[index]
        return policy.reference() if name == BASE else policy.use_snapshot(name)

    def age(self, index: int, update: int) -> int:
        """Updates since entry ``index`` was saved (the base counts from update 0)."""
        name = self.entries[index]
        return update if name == BASE else update - int(name[len(self.prefix):])

    def state_dict(self) -> dict:
        return {"entries": list(self.entries)}

    def load_state_dict(self, state: dict, policy) -> None:
        entries = list(state["entries"])
        missing = [e for e in entries if e != BASE and not policy.has_snapshot(e)]
        if missing:
            raise CheckpointError(f"the checkpoint's reference pool names snapshots it does not hold: {missing}")
        self.entries = entries


# --------------------------------------------------------------------------- trainer


class PreferenceTrainer:
    """Runs a :class:`PreferenceConfig` in a run directory (same layout as the RL trainer's); the
    loop is :class:`~diffalign.training.loop.TrainLoop` over :meth:`step_update`."""

    def __init__(self, cfg: PreferenceConfig, run_dir: str | Path, *, resume: bool = False, console=None):
        loop.configure(cfg)
        self.cfg, self.console = cfg, console
        pairs = load_preference_dataset(cfg.data)
        needs_losers = cfg.algorithm == "diffusion_dpo" or (cfg.algorithm == "seppo" and cfg.seppo.dataset_losers)
        if needs_losers and pairs.losers is None:
            raise ConfigError(f"{cfg.algorithm} needs losers, but {cfg.data} is a winners-only dataset; use "
                              "seppo (reference samples replace the losers) or sft")
        self.data: PreferenceDataset = pairs if needs_losers else pairs.winners_only()
        self.batches_per_epoch = len(self.data) // cfg.batch_size
        if self.batches_per_epoch < cfg.grad_accum:
            raise ConfigError(f"the dataset has {len(self.data)} items, fewer than one update's "
                              f"{cfg.batch_size * cfg.grad_accum} (batch_size × grad_accum); lower them")
        per_epoch = self.batches_per_epoch // cfg.grad_accum
        self.total_updates = cfg.epochs * per_epoch if cfg.max_updates is None else cfg.max_updates
        self.run = loop.open_run(run_dir, cfg, resume)
        with loop.unlocked_on_error(self.run):
            torch.manual_seed(cfg.seed)
            if cfg.model_family not in FAMILIES:
                raise ConfigError(f"unknown model_family {cfg.model_family!r}; available: {', '.join(FAMILIES)}")
            self.policy = build_policy(cfg.model_family, cfg.model, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                       image_size=None if cfg.model_family == "tiny" else self.data.image_size,
                                       options=cfg.model_options)
            if self.policy.prediction != "flow":
                raise ConfigError(f"the preference losses use flow-matching errors; the {cfg.model_family} model predicts "
                                  f"{self.policy.prediction!r}: set model_options.flow_view=true")
            if self.policy.image_size != self.data.image_size:
                raise ConfigError(f"{cfg.data} holds {self.data.image_size}px images, the model makes "
                                  f"{self.policy.image_size}px ones")
            self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=cfg.lr,
                                               betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
            self.pool = ReferencePool(cfg.seppo.pool_size, keep_base=cfg.seppo.keep_base)
            self.update, self.train_time = 0, 0.0
            if resume:
                self._load()
            self.logger: MetricsLogger | loop.NoLogger = loop.open_logger(self.run, self.update if resume else None)

    # -- checkpoints -------------------------------------------------------------------
    def _save(self, update: int) -> None:
        """Checkpoint after ``update`` updates: the shared entries, the update count and the reference pool."""
        save_checkpoint(self.run, update, loop.checkpoint_state(
            self.policy, self.optimizer.state_dict(), self.train_time,
            epoch=self.update,  # `diffalign eval` reports this as the run's progress
            update=self.update, pool=self.pool.state_dict()), keep_every=self.cfg.ckpt_keep_every)

    def _load(self) -> None:
        """Resume from the latest checkpoint (the shared entries and the reference pool)."""
        state = loop.restore_checkpoint(self.run, self.policy, self.optimizer,
                                        lambda st: self.pool.load_state_dict(st["pool"], self.policy))
        self.update, self.train_time = state["update"], state["train_time"]

    # -- data order ----------------------------------------------------------------------
    def micro_batch_indices(self, m: int) -> torch.Tensor:
        """Dataset indices of micro-batch ``m`` (counted from the start of training): epoch
        ``m // batches_per_epoch`` is a permutation seeded with ``(seed, epoch)``; the
        remainder of a permutation that does not fill a batch is skipped."""
        epoch, pos = divmod(m, self.batches_per_epoch)
        perm = torch.randperm(len(self.data), generator=_seeded(self.cfg.seed, epoch, 11))
        b = self.cfg.batch_size
        return perm[pos * b : (pos + 1) * b]

    # -- phases ------------------------------------------------------------------------
    def _noised(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor):
        s, eps = sigma.to(x0.device).view(-1, 1, 1, 1), eps.to(x0.device)
        return (1 - s) * x0 + s * eps, eps - x0

    def _errors(self, x0s: list[torch.Tensor], cond, sigma, eps, ref_ctx):
        """Policy errors (with grad) and reference errors (no grad) of each ``x0`` in ``x0s``
        under the shared ``(σ, ε)``; one batched forward each."""
        n = len(x0s)
        xt, target = zip(*(self._noised(x0, sigma, eps) for x0 in x0s), strict=True)
        x_t, v_star = torch.cat(xt), torch.cat(target)
        sig = sigma.repeat(n)
        cond_n = type(cond).cat([cond] * n) if n > 1 else cond
        err = flow_matching_error(self.policy.predict(x_t, sig, cond_n), v_star).chunk(n)
        if ref_ctx is None:
            return err, None
        with torch.no_grad(), ref_ctx:
            ref_err = flow_matching_error(self.policy.predict(x_t, sig, cond_n), v_star).chunk(n)
        return err, ref_err

    def reference_samples(self, prompts: list[str], ref_index: int, gen: torch.Generator) -> torch.Tensor:
        """``x_s ~ π_ref(·|c)``: images ``(B, 3, H, W)`` in [0, 1] from pool entry ``ref_index``."""
        was_training = self.policy.training
        self.policy.eval()
        with self.pool.context(self.policy, ref_index):
            traj = rollout(self.policy, prompts, torch.arange(len(prompts)), self.cfg.seppo.sampler, generator=gen)
        self.policy.train(was_training)
        return traj.images

    def micro_step(self, m: int, ref_index: int) -> dict[str, float]:
        """Forward and backward of micro-batch ``m`` (loss scaled by ``1/grad_accum``)."""
        cfg = self.cfg
        batch = self.data.batch(self.micro_batch_indices(m))
        gen = _seeded(cfg.seed, m, 13)
        b = len(batch.prompts)
        sigma = (torch.sigmoid(torch.randn(b, generator=gen)) if cfg.timesteps == "logit_normal"
                 else torch.rand(b, generator=gen))
        # noise in the model's latent space (pixel space for the tiny model)
        eps = torch.randn((b, *self.policy.latent_shape(*batch.winners.shape[-2:])), generator=gen)
        cond = self.policy.encode(batch.prompts)
        x_w = self.policy.encode_images(batch.winners)
        extra: dict[str, float] = {}
        if cfg.algorithm == "sft":
            (err_w,), _ = self._errors([x_w], cond, sigma, eps, None)
            loss, metrics = sft_loss(err_w)
        elif cfg.algorithm == "diffusion_dpo":
            (err_w, err_l), (ref_w, ref_l) = self._errors([x_w, self.policy.encode_images(batch.losers)], cond,
                                                          sigma, eps, self.policy.reference())
            loss, metrics = diffusion_dpo_loss(err_w, ref_w, err_l, ref_l, cfg.beta)
        else:
            if cfg.seppo.dataset_losers:
                samples = batch.losers
            else:
                samples = self.reference_samples(batch.prompts, ref_index, gen)
                extra |= self._sample_scores(samples, batch.prompts)
            (err_w, err_s), (ref_w, ref_s) = self._errors([x_w, self.policy.encode_images(samples)], cond, sigma,
                                                          eps, self.pool.context(self.policy, ref_index))
            loss, metrics = seppo_loss(err_w, ref_w, err_s, ref_s, cfg.beta, flipper=cfg.seppo.flipper)
            if "ref_sample_correct" in extra:
                extra |= self._flip_quality(err_w, ref_w, extra.pop("_correct"))
        (loss / cfg.grad_accum).backward()
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}, **extra}

    def _sample_scores(self, images: torch.Tensor, prompts: list[str]) -> dict:
        from diffalign.world.verify import verify_batch

        correct = torch.tensor([v.score for v in verify_batch(images, prompts)])
        return {"ref_sample_correct": float(correct.mean()), "_correct": correct}

    def _flip_quality(self, err_w, ref_w, correct: torch.Tensor) -> dict[str, float]:
        """Verifier view of the flipper: how often flipped / kept reference samples are correct."""
        flipped = (ref_w.detach() < err_w.detach()).cpu()
        out = {}
        if flipped.any():
            out["flipped_sample_correct"] = float(correct[flipped].mean())
        if (~flipped).any():
            out["kept_loser_sample_correct"] = float(correct[~flipped].mean())
        return out

    def train_update(self) -> dict[str, float]:
        """One optimizer update: ``grad_accum`` micro-batches, clip, step, pool."""
        cfg = self.cfg
        u = self.update
        ref_index = 0
        row: dict[str, float] = {}
        if cfg.algorithm == "seppo":
            ref_index = self.pool.select(cfg.seppo.selection, _seeded(cfg.seed, u, 17))
            row |= {"ref_index": float(ref_index), "ref_age": float(self.pool.age(ref_index, u)),
                    "pool_size": float(len(self.pool))}
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = [self.micro_step(u * cfg.grad_accum + a, ref_index) for a in range(cfg.grad_accum)]
        params = self.policy.trainable_parameters()
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.update = u + 1
        if cfg.algorithm == "seppo" and self.update % cfg.seppo.pool_every == 0:
            self.pool.add(self.policy, self.update)
        keys = {k for p in parts for k in p}
        for k in sorted(keys):
            vals = [p[k] for p in parts if k in p]
            row[k] = float(np.mean(vals))
        row["grad_norm"] = float(gnorm)
        row["epoch"] = (self.update * cfg.grad_accum) / self.batches_per_epoch
        return row

    def evaluate(self, tag: str, split: str | None = None, num_images: int | None = None) -> dict:
        """Verifier metrics on ``split`` (default ``eval.split``) and the sample grid ``samples/<tag>.png``."""
        e = self.cfg.eval
        self.policy.eval()
        return loop.evaluate_to_grid(self.policy, self.run, tag, split or e.split, num_images or e.num_images,
                                     steps=e.steps, guidance_scale=e.guidance_scale)

    # -- the loop ----------------------------------------------------------------------
    def step_update(self, update: int, on_phase: Callable[[str], None] | None = None) -> dict:
        """Optimizer update ``update`` (:meth:`train_update`; the next one, ``self.update``), timed
        into ``train_time``: what :meth:`train` runs per step. Returns its ``metrics.jsonl`` row."""
        if update != self.update:
            raise ValueError(f"the next update is {self.update}, not {update}")
        if on_phase is not None:
            on_phase("update")
        t0 = time.perf_counter()
        row = self.train_update()
        self.train_time += time.perf_counter() - t0
        row["train_time_s"] = self.train_time
        return row

    def train(self) -> dict:
        """Runs the remaining updates in the shared loop, then :meth:`finish`."""
        cfg = self.cfg
        runner = loop.TrainLoop(self.step_update, self.evaluate, self._save, unit="update", label=cfg.algorithm,
                                start=self.update, total=self.total_updates, eval_every=cfg.eval.every,
                                ckpt_every=cfg.ckpt_every, max_train_minutes=cfg.max_train_minutes,
                                metric="loss", metric_format=".4f")
        try:
            return self.finish(runner.run(self.logger, self.console).stopped_by_budget)
        finally:
            self.run.unlock()

    def finish(self, stopped_early: bool = False) -> dict:
        """Final evaluation on ``eval.final_splits``, curves.png and summary.json."""
        final: dict = {"algorithm": self.cfg.algorithm, "updates": self.update, "train_time_s": self.train_time,
                       "stopped_by_budget": stopped_early, "dataset_items": len(self.data)}
        return loop.write_summary(self.run, final, plot_preference_curves, self._final_entries)

    def _final_entries(self, rows: list[dict]) -> dict:
        """summary.json's final evaluation per split and the pair metrics averaged over the updates."""
        e = self.cfg.eval
        out: dict = {}
        for split in e.final_splits:
            res = self.evaluate(f"final_{split}", split, e.final_num_images)
            out[f"final/{split}"] = {k: v for k, v in res.items() if not k.startswith("lowlevel/")}
        train_rows = [r for r in rows if "loss" in r]
        for k in ("flip_fraction", "ref_sample_correct", "accuracy"):
            vals = [r[k] for r in train_rows if k in r]
            if vals:
                out[f"mean_{k}"] = float(np.mean(vals))
        return out


def plot_preference_curves(run_path: Path, rows: list[dict]) -> Path | None:
    """``curves.png``: eval score, training loss and (SePPO) flip fraction vs update."""
    return loop.plot_run_curves(run_path, rows, "loss", 3, 13, _draw_preference_curves)


def _draw_preference_curves(axes, ev: list[dict], tr: list[dict]) -> None:
    """Eval score, training loss and the pair metrics vs update, one panel each."""
    if ev:
        axes[0].plot([r["step"] for r in ev], [r["eval/score"] for r in ev], "o-", label="eval verifier score")
    axes[0].set_title("evaluation")
    if tr:
        axes[1].plot([r["step"] for r in tr], [r["loss"] for r in tr], alpha=0.7, label="loss")
    axes[1].set_title("training loss")
    for key in ("flip_fraction", "ref_sample_correct", "accuracy"):
        pts = [(r["step"], r[key]) for r in tr if key in r]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), alpha=0.7, label=key)
    axes[2].set_title("pairs")
    for ax in axes:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

