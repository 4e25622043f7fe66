"""The RL training loop: sample → score → advantages → update, per epoch.

Every random draw of epoch ``e`` (prompts, initial and SDE noise, step orders) comes from
generators seeded with ``(seed, e)``; with the policy, optimizer, snapshots, algorithm
state and ``e`` saved in each checkpoint, ``--resume`` continues *exactly* (same losses as
an uninterrupted run on CPU).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from diffalign.algorithms.consistent_rft import (
    CPGOConfig,
    CPGORegularizer,
    DGRConfig,
    dgr_shared_groups,
)
from diffalign.algorithms.flow_grpo import GRPO, GRPOConfig
from diffalign.algorithms.forward import CRDConfig, ForwardProcess, NFTConfig
from diffalign.algorithms.ptx import PTXConfig, RenderReplay
from diffalign.config import MAX_SEED, ranged
from diffalign.distributed import (
    all_gather_object,
    all_gather_tensor,
    broadcast_parameters,
    check_in_sync,
    init_distributed,
    raise_if_any_failed,
    resolve_sharding,
    run_on_main,
    shard_groups,
)
from diffalign.errors import ConfigError, PromptError
from diffalign.evaluation.grid import save_grid
from diffalign.models.factory import FAMILIES, ModelOptions, build_policy
from diffalign.rewards import build_reward, checked_call
from diffalign.rewards.multi import per_reward_inputs
from diffalign.sampling.rollout import RolloutConfig, Trajectory, rollout
from diffalign.sharding import SHARDING_MODES, make_optimizer
from diffalign.training import loop
from diffalign.training.prompts import sample_file_prompts
from diffalign.training.rundir import MetricsLogger, save_checkpoint
from diffalign.world.grammar import TASKS, eval_prompts, prompt_splits


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out prompts (fixed prompts and seeds)."""

    every: int = ranged(5, ge=0)
    """Epochs between evaluations (0 = only at the end)."""
    num_images: int = ranged(64, ge=1)
    """Images per evaluation (task-balanced prompts, one image each)."""
    split: str = "test"
    """Prompt split: test or ood."""
    steps: int = ranged(20, ge=1)
    """ODE sampler steps."""
    guidance_scale: float = ranged(4.5, ge=0)
    """CFG weight at evaluation."""
    use_ema: bool = True
    """Evaluate the EMA weights (if ema_decay > 0) rather than the raw policy."""
    tasks: list[str] | None = None
    """Evaluate only these ShapesWorld task types, e.g. ``[position, color_attr]`` (None = all six)."""


@dataclass
class TrainConfig:
    """An RL fine-tuning run (ShapesWorld tiny model). Units in each docstring."""

    algorithm: str = "flow_grpo"
    """Algorithm name (flow_grpo, dance_grpo, ddpo, consistent_rft, crd, diffusion_nft)."""
    model: str | None = None
    """Model to fine-tune: a tiny-model checkpoint (None = the shipped ShapesWorld base), or a
    local diffusers pipeline directory for model_family sd3 / flux / sd15."""
    model_family: str = "tiny"
    """Model family: tiny (ShapesWorld), sd3 (SD3 / SD3.5), flux (FLUX.1), sd15 (SD1.x)."""
    model_options: ModelOptions = field(default_factory=ModelOptions)
    """dtype, LoRA targets, gradient checkpointing, device, ... of the diffusers adapters."""
    image_size: int | None = ranged(None, ge=1)
    """Side of the generated square images in pixels (None = the model's default: the tiny
    checkpoint's size; 512 for sd3 / flux / sd15)."""
    prompt_file: str | None = None
    """Training prompts for models outside ShapesWorld: a text file (one per line) or .jsonl
    with a "prompt" field. None = ShapesWorld prompts (prompt_split)."""
    eval_prompt_file: str | None = None
    """Evaluation prompts with prompt_file (None = the training prompt file); evaluation then
    scores deterministic samples with the training reward."""
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    """Seed of every random draw."""
    epochs: int = ranged(30, ge=1)
    """Sample → update iterations."""
    prompts_per_epoch: int = ranged(8, ge=1)
    """Prompt groups sampled per epoch, over all processes (each of N processes rolls out
    prompts_per_epoch / N whole groups)."""
    group_size: int = ranged(8, ge=2)
    """Images per prompt (K)."""
    prompt_split: str = "train"
    """Split the training prompts come from."""
    reward: str = "shapes_verifier"
    """Registered reward name."""
    reward_kwargs: dict = field(default_factory=lambda: {"mode": "partial"})
    """Keyword arguments of the reward."""
    async_reward: bool = True
    """Score each rollout chunk in a background thread while the next chunk samples."""
    lora_rank: int = ranged(0, ge=0)
    """LoRA rank (0 = full fine-tuning)."""
    lora_alpha: float | None = ranged(None, gt=0)
    """LoRA alpha (None = rank)."""
    lr: float = ranged(1e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = ranged(0.0, ge=0)
    """AdamW weight decay."""
    lr_schedule: str = "constant"
    """``constant``, or ``cosine``: epoch e (0-based) trains at
    ``lr · (m + (1 − m)·½(1 + cos(π·e/epochs)))`` with ``m = lr_min_ratio``. Set ``epochs`` to
    what the budget holds when ``max_train_minutes`` stops the run."""
    lr_min_ratio: float = ranged(0.1, ge=0, le=1)
    """``cosine``: the final learning rate as a fraction of ``lr``."""
    adam_betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)
    """AdamW betas."""
    sharding: str = "none"
    """Multi-process runs: ``none`` (every rank holds the whole AdamW state), ``optimizer``
    (ZeRO stage 1: each rank keeps the AdamW state of its share of the parameters, gradients
    are reduced to their owner and the updated weights broadcast; same results, optimizer
    memory divided by the number of ranks), or ``gradients`` (ZeRO stage 2: as ``optimizer``,
    and gradients are reduced in buckets during backward and freed on the other ranks, so
    gradient memory is divided too). ``none`` defers to an ``accelerate`` DeepSpeed ZeRO-1/2 or
    FSDP ``SHARD_GRAD_OP`` launch config (docs/distributed.md). No effect in one process."""
    ema_decay: float = ranged(0.0, ge=0, lt=1)
    """EMA of the trainable weights for evaluation (0 = off)."""
    task_sampling: str = "uniform"
    """How each epoch's ShapesWorld prompts pick their task type: ``uniform``, or ``adaptive``
    (probability ∝ a running mean of the task's within-group reward std, i.e. how much GRPO
    signal its groups still carry; tasks the policy always passes or always fails are drawn
    less). Ignored with ``prompt_file``."""
    task_weights: dict | None = None
    """ShapesWorld training-prompt mix: task type → relative weight (task types left out get
    none), e.g. ``{position: 1, color_attr: 1}`` to train on the two compositional tasks only.
    None = every task type of ``prompt_split`` equally. With ``task_sampling: adaptive`` the
    weights scale the curriculum's probabilities."""
    task_sampling_floor: float = ranged(0.3, ge=0, le=1)
    """``adaptive``: this share of the draws stays uniform over tasks (0–1), so no task is forgotten."""
    task_sampling_decay: float = ranged(0.7, ge=0, lt=1)
    """``adaptive``: decay of the running mean per epoch in which the task was drawn (0–1)."""
    threads: int = ranged(0, ge=0)
    """torch threads (0 = default)."""
    max_train_minutes: float | None = ranged(None, gt=0)
    """Stop after the epoch in which training time (sampling + updates, not evaluation) passes
    this budget (None = run all epochs). Budget-stopped runs are not bit-exact on resume."""
    ckpt_every: int = ranged(5, ge=1)
    """Epochs between checkpoints (the last epoch always saves)."""
    ckpt_keep_every: int = ranged(0, ge=0)
    """Keep the checkpoints of epochs that are multiples of this for good (0 = keep only the
    newest two). For comparisons at matched reward, which evaluate a run's earlier policies."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampler used for rollouts."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """PPO-clip update settings."""
    dgr: DGRConfig = field(default_factory=DGRConfig)
    """ConsistentRFT's Dynamic Granularity Rollout (off by default)."""
    cpgo: CPGOConfig = field(default_factory=CPGOConfig)
    """ConsistentRFT's Consistent Policy Gradient Optimization (weight 0 = off)."""
    crd: CRDConfig = field(default_factory=CRDConfig)
    """CRD's forward-process update (algorithm crd)."""
    nft: NFTConfig = field(default_factory=NFTConfig)
    """DiffusionNFT's forward-process update (algorithm diffusion_nft)."""
    ptx: PTXConfig = field(default_factory=PTXConfig)
    """Pretraining-data replay ("PPO-ptx"): a flow-matching loss on fresh ShapesWorld renders
    added to every policy-gradient step of the GRPO family (weight 0 = off)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation."""

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; available: {', '.join(sorted(ALGORITHMS))}")
        if self.grpo.reward_normalization == "per_reward" and self.reward != "multi":
            raise ConfigError("grpo.reward_normalization=per_reward normalises each part of a multi reward; "
                              f"set reward: multi (got reward: {self.reward})")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be at least 2 for group advantages, got {self.group_size}")
        if self.model_family not in FAMILIES:
            raise ConfigError(f"unknown model_family {self.model_family!r}; available: {', '.join(FAMILIES)}")
        if self.model_family != "tiny" and self.prompt_file is None:
            raise ConfigError(f"model_family={self.model_family} needs prompt_file=<prompts.txt> (ShapesWorld "
                              "prompts and its verifier are for the tiny model)")
        if self.prompt_split not in ("train", "test", "ood") or self.eval.split not in ("train", "test", "ood"):
            raise ConfigError("prompt_split and eval.split must be train, test or ood")
        if self.lr_schedule not in ("constant", "cosine") or not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"lr_schedule must be constant or cosine (got {self.lr_schedule!r}) and lr_min_ratio "
                              f"in [0, 1] (got {self.lr_min_ratio})")
        if self.sharding not in SHARDING_MODES:
            raise ConfigError(f"sharding must be one of {', '.join(SHARDING_MODES)}, got {self.sharding!r} "
                              "(parameter sharding, ZeRO-3 / FSDP FULL_SHARD, is not supported: docs/distributed.md)")
        if self.task_sampling not in ("uniform", "adaptive"):
            raise ConfigError(f"task_sampling must be uniform or adaptive, got {self.task_sampling!r}")
        if not (0 <= self.task_sampling_floor <= 1 and 0 <= self.task_sampling_decay < 1):
            raise ConfigError("task_sampling_floor must be in [0, 1] and task_sampling_decay in [0, 1)")
        if self.task_weights is not None:
            self._check_task_weights()
        if self.ptx.extra_steps > 0 and self.ptx.weight <= 0:
            raise ConfigError(f"ptx.extra_steps={self.ptx.extra_steps} replays renders with the loss weight ptx.weight, "
                              "which is 0; set ptx.weight > 0 (e.g. 0.1) or ptx.extra_steps: 0")
        if self.ptx.weight > 0 and (self.algorithm in ("crd", "diffusion_nft") or self.model_family != "tiny"):
            raise ConfigError(f"ptx (pretraining-data replay) adds ShapesWorld renders to the GRPO family's update; "
                              f"algorithm={self.algorithm}, model_family={self.model_family} has no such update or "
                              "renderer. Set ptx.weight: 0, or use a GRPO-family algorithm on the tiny model")
        if self.eval.tasks is not None:
            try:
                eval_prompts(self.eval.split, 1, tasks=self.eval.tasks)
            except PromptError as e:
                raise ConfigError(f"eval.tasks: {e}") from None

    def _check_task_weights(self) -> None:
        w = self.task_weights
        if self.prompt_file is not None:
            raise ConfigError("task_weights picks ShapesWorld task types; it cannot be combined with prompt_file "
                              "(write the mix you want into the prompt file instead)")
        if not isinstance(w, dict) or not w:
            raise ConfigError(f"task_weights must be a mapping task type -> weight, e.g. "
                              f"{{position: 1, color_attr: 1}}; got {w!r}")
        unknown = sorted(set(w) - set(TASKS))
        if unknown:
            raise ConfigError(f"task_weights: unknown task type(s) {unknown}; choose from {', '.join(TASKS)}")
        try:
            vals = {t: float(v) for t, v in w.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"task_weights: weights must be numbers, got {w!r}") from None
        if any(not math.isfinite(v) or v < 0 for v in vals.values()):
            raise ConfigError(f"task_weights: weights must be finite and >= 0, got {w!r}")
        split = prompt_splits()[self.prompt_split]
        if sum(v for t, v in vals.items() if split[t]) <= 0:
            raise ConfigError(f"task_weights {w!r} give no weight to a task type with prompts in split "
                              f"{self.prompt_split!r} (its task types: {', '.join(t for t in TASKS if split[t])})")
        self.task_weights = vals


ALGORITHMS = {"flow_grpo", "dance_grpo", "ddpo", "consistent_rft", "crd", "diffusion_nft"}


def build_algorithm(cfg: TrainConfig) -> GRPO | ForwardProcess:
    """The GRPO family; ConsistentRFT adds its DGR granularity schedule and CPGO regularizer.
    ``crd`` / ``diffusion_nft``: the forward-process update (clean-sample rollouts)."""
    if cfg.algorithm == "crd":
        return ForwardProcess("crd", cfg.crd, autocast_bf16=cfg.rollout.autocast_bf16)
    if cfg.algorithm == "diffusion_nft":
        return ForwardProcess("nft", cfg.nft, autocast_bf16=cfg.rollout.autocast_bf16)
    regs = [CPGORegularizer(cfg.cpgo)] if cfg.cpgo.weight > 0 else []
    gran = None if cfg.dgr.mode == "off" else (lambda e, g, gen: dgr_shared_groups(cfg.dgr, e, g, gen))
    aux = RenderReplay(cfg.ptx, autocast_bf16=cfg.rollout.autocast_bf16) if cfg.ptx.weight > 0 else None
    return GRPO(cfg.grpo, regs, granularity=gran, autocast_bf16=cfg.rollout.autocast_bf16, auxiliary=aux)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """Epoch ``epoch``'s generator; ``stream > 0`` gives independent ones (rank ``r``'s update draws)."""
    entropy = [seed, epoch] if stream == 0 else [seed, epoch, 3, stream]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def chunk_generator(base: int, first_group: int) -> torch.Generator:
    """The rollout noise of a chunk of whole groups, keyed by the chunk's first (global) group id:
    a group's images do not depend on the process that samples it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([base, first_group]).generate_state(1)[0]))


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch`` under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    m = cfg.lr_min_ratio
    return cfg.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs)))


def sample_prompts(cfg: TrainConfig, epoch: int, task_probs: dict[str, float] | None = None,
                   ) -> tuple[list[str], torch.Tensor]:
    """Group-contiguous prompts for one epoch: ``prompts_per_epoch`` prompts × K, each prompt's
    task drawn uniformly, or in proportion to ``cfg.task_weights`` and / or ``task_probs`` (uniform
    draws from ``prompt_file`` when one is set)."""
    prompts, group_ids, _ = sample_prompts_with_tasks(cfg, epoch, task_probs)
    return prompts, group_ids


def sample_prompts_with_tasks(cfg: TrainConfig, epoch: int, task_probs: dict[str, float] | None = None,
                              ) -> tuple[list[str], torch.Tensor, list[str | None]]:
    """:func:`sample_prompts` plus each group's task type (None for prompt-file prompts)."""
    if cfg.prompt_file is not None:
        prompts, ids = sample_file_prompts(cfg.prompt_file, cfg.prompts_per_epoch, cfg.group_size, cfg.seed, epoch)
        return prompts, ids, [None] * cfg.prompts_per_epoch
    rng = np.random.default_rng([cfg.seed, epoch, 1])
    split = prompt_splits()[cfg.prompt_split]
    tasks = [t for t in TASKS if split[t]]
    probs = None if task_probs is None else np.array([task_probs[t] for t in tasks], dtype=np.float64)
    if cfg.task_weights is not None:
        w = np.array([cfg.task_weights.get(t, 0.0) for t in tasks], dtype=np.float64)
        probs = w if probs is None else probs * w
        if probs.sum() <= 0:  # the curriculum gave every weighted task zero probability: weights alone
            probs = w
    chosen, kinds = [], []
    for _ in range(cfg.prompts_per_epoch):
        if probs is None:
            task = tasks[rng.integers(len(tasks))]
        else:
            task = tasks[rng.choice(len(tasks), p=probs / probs.sum())]
        pool = split[task]
        chosen.append(pool[rng.integers(len(pool))])
        kinds.append(task)
    prompts = [p for p in chosen for _ in range(cfg.group_size)]
    group_ids = torch.arange(cfg.prompts_per_epoch).repeat_interleave(cfg.group_size)
    return prompts, group_ids, kinds


class TaskCurriculum:
    """``task_sampling: adaptive``: a running mean, per task type, of the within-group reward
    std of its groups (the signal GRPO's group advantages get from them); each epoch's task
    probabilities are ``floor / T + (1 − floor) · s_t / Σ s``. Tasks not yet drawn keep the
    largest running value seen, so they are not starved before they are measured."""

    def __init__(self, tasks: list[str], floor: float, decay: float):
        self.tasks, self.floor, self.decay = list(tasks), floor, decay
        self.signal: dict[str, float] = {}

    def probs(self) -> dict[str, float] | None:
        if not self.signal:
            return None  # first epoch: uniform
        top = max(self.signal.values())
        s = np.array([self.signal.get(t, top) for t in self.tasks])
        share = s / s.sum() if s.sum() > 0 else np.full(len(s), 1 / len(s))
        p = self.floor / len(s) + (1 - self.floor) * share
        return {t: float(v) for t, v in zip(self.tasks, p, strict=True)}

    def update(self, kinds: list[str | None], rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
        per_task: dict[str, list[float]] = {}
        for g, task in enumerate(kinds):
            if task is not None:
                per_task.setdefault(task, []).append(float(rewards[group_ids == g].std(correction=0)))
        for task, stds in per_task.items():
            x = float(np.mean(stds))
            self.signal[task] = x if task not in self.signal else self.decay * self.signal[task] + (1 - self.decay) * x

    def state_dict(self) -> dict:
        return {"signal": dict(self.signal)}

    def load_state_dict(self, state: dict) -> None:
        self.signal = dict(state.get("signal", {}))


def cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    cat = {name: torch.cat([getattr(p, name) for p in parts])
           for name in ("group_ids", "latents", "log_probs", "x0_pred", "shared_noise", "images")}
    # per-sample tensors concatenated; the schedule and sampler settings are the first part's
    return replace(first, prompts=[q for p in parts for q in p.prompts], **cat)


@dataclass
class EpochPrompts:
    """Phase 1's output: the epoch's group-contiguous prompts (all ranks' groups)."""

    prompts: list[str]
    group_ids: torch.Tensor
    """``(prompts_per_epoch · group_size,)`` group index of each prompt."""
    kinds: list[str | None]
    """Task type of each group (None for prompt-file prompts)."""
    task_probs: dict[str, float] | None
    """The adaptive curriculum's task probabilities they were drawn with (None = uniform)."""


@dataclass
class EpochRollout:
    """Phase 2's output: this rank's rollout and the whole epoch's rewards."""

    traj: Trajectory
    """This rank's groups."""
    rewards: torch.Tensor
    """``(prompts_per_epoch · group_size,)`` every rank's rewards, in the single-process order."""
    details: dict[str, torch.Tensor]
    """The reward's per-sample details, gathered like ``rewards``."""
    shared_noise: torch.Tensor
    """``(prompts_per_epoch,)`` bool, every group's DGR granularity (True = fine, shared noise)."""


class Trainer:
    """Runs a :class:`TrainConfig` in a run directory; the loop is :class:`~diffalign.training.loop.TrainLoop`
    over :meth:`step_epoch`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, console=None):
        loop.configure(cfg)
        self.cfg, self.console = cfg, console
        # under torchrun / accelerate launch: one process per device, whole prompt groups per rank
        self.world = init_distributed()
        self.groups = shard_groups(cfg.prompts_per_epoch, self.world)
        self.run = loop.open_run(run_dir, cfg, resume)
        with loop.unlocked_on_error(self.run):
            torch.manual_seed(cfg.seed)
            self.policy = build_policy(cfg.model_family, cfg.model, image_size=cfg.image_size, lora_rank=cfg.lora_rank,
                                       lora_alpha=cfg.lora_alpha, options=cfg.model_options)
            broadcast_parameters(self.policy.trainable_parameters())  # every rank starts from rank 0's weights
            self.sharding, source = resolve_sharding(cfg.sharding)
            if self.world.distributed and self.world.is_main and source != "config":
                print(f"{source}: sharding={self.sharding} (diffalign's own implementation, docs/distributed.md)",
                      flush=True)
            self.optimizer = make_optimizer(
                self.policy.trainable_parameters(),
                partial(torch.optim.AdamW, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay),
                self.sharding)
            self.algo = build_algorithm(cfg)
            self.reward = build_reward(cfg.reward, **cfg.reward_kwargs)
            self.eval_reward = build_reward("shapes_verifier", mode="score")
            self.start_epoch, self.train_time = 0, 0.0
            split = prompt_splits()[cfg.prompt_split]
            self.curriculum = (TaskCurriculum([t for t in TASKS if split[t]], cfg.task_sampling_floor,
                                              cfg.task_sampling_decay)
                               if cfg.task_sampling == "adaptive" and cfg.prompt_file is None else None)
            if cfg.ema_decay > 0:
                self.policy.save_snapshot("ema")
            if resume:
                self._load()
            self.logger: MetricsLogger | loop.NoLogger = loop.open_logger(self.run, self.start_epoch if resume else None)

    # -- checkpoints -------------------------------------------------------------------
    def _save(self, epoch: int) -> None:
        """Every rank calls this (a sharded optimizer gathers its state); rank 0 writes."""
        optimizer_state = self.optimizer.state_dict()
        run_on_main(lambda: save_checkpoint(self.run, epoch, loop.checkpoint_state(
            self.policy, optimizer_state, self.train_time, epoch=epoch, algorithm=self.algo.state_dict(),
            curriculum=self.curriculum.state_dict() if self.curriculum else None),
            keep_every=self.cfg.ckpt_keep_every))

    def _load(self) -> None:
        """Resume from the latest checkpoint (the shared entries, the algorithm's and the curriculum's state)."""

        def load_own(state: dict) -> None:
            self.algo.load_state_dict(state["algorithm"])
            if self.curriculum is not None and state.get("curriculum"):
                self.curriculum.load_state_dict(state["curriculum"])

        state = loop.restore_checkpoint(self.run, self.policy, self.optimizer, load_own)
        self.start_epoch, self.train_time = state["epoch"], state["train_time"]

    # -- phases ------------------------------------------------------------------------
    def epoch_prompts(self, epoch: int) -> EpochPrompts:
        """Phase 1: epoch ``epoch``'s prompts, the whole epoch, the same on every rank (task
        types from the adaptive curriculum when it is on)."""
        task_probs = self.curriculum.probs() if self.curriculum else None
        prompts, group_ids, kinds = sample_prompts_with_tasks(self.cfg, epoch, task_probs)
        return EpochPrompts(prompts, group_ids, kinds, task_probs)

    @property
    def _my_samples(self) -> slice:
        """This rank's samples of an epoch (whole groups)."""
        return slice(self.groups.start * self.cfg.group_size, self.groups.stop * self.cfg.group_size)

    def rollout_and_score(self, epoch: int, prompts: list[str], group_ids: torch.Tensor,
                          gen: torch.Generator) -> EpochRollout:
        """Phase 2: this rank's groups of ``prompts`` sampled (DGR granularity of epoch ``epoch``
        from ``gen``) and scored; the rewards of every rank gathered."""
        self.policy.eval()
        shared = self.algo.shared_groups(epoch, self.cfg.prompts_per_epoch, gen)
        mine = self._my_samples
        error = None
        try:
            traj, rewards, details = self.sample_and_score(prompts[mine], group_ids[mine], gen,
                                                           None if shared is None else shared[self.groups])
        except Exception as e:  # raised on every rank below, so none waits at a collective
            error = e
        raise_if_any_failed(error)
        # statistics over the whole epoch: every rank's rewards, in the single-process order
        return EpochRollout(traj, all_gather_tensor(rewards.cpu()),
                            {k: all_gather_tensor(v.cpu()) for k, v in details.items()},
                            all_gather_tensor(traj.shared_noise.cpu()))

    def epoch_advantages(self, batch: EpochRollout, prompts: list[str], group_ids: torch.Tensor,
                         ) -> tuple[torch.Tensor, dict]:
        """Phase 3: the algorithm's advantages from every rank's rewards; returns this rank's
        share and the advantage metrics."""
        adv, metrics = self.algo.advantages(batch.rewards, group_ids, prompts,
                                            **per_reward_inputs(self.reward, batch.details,
                                                                self.cfg.grpo.reward_normalization))
        return adv[self._my_samples], metrics

    def update_policy(self, epoch: int, traj: Trajectory, adv: torch.Tensor, gen: torch.Generator) -> dict:
        """Phase 4: epoch ``epoch``'s learning rate, the algorithm's update of the policy (rank
        r > 0 draws from its own stream), the EMA; returns the update metrics averaged over ranks."""
        cfg = self.cfg
        self.policy.train()
        for group in self.optimizer.param_groups:
            group["lr"] = epoch_lr(cfg, epoch)
        update_gen = gen if self.world.rank == 0 else epoch_generator(cfg.seed, epoch, self.world.rank)
        metrics = self.algo.update(self.policy, self.optimizer, traj, adv, update_gen)
        if isinstance(getattr(self.algo, "auxiliary", None), RenderReplay):  # replay-only steps (ptx.extra_steps)
            metrics |= self.algo.auxiliary.extra_steps(self.policy, self.optimizer, update_gen, cfg.grpo.max_grad_norm)
        metrics = _mean_over_ranks(metrics)
        check_in_sync(self.policy.trainable_parameters())
        if cfg.ema_decay > 0:
            self.policy.ema_snapshot("ema", cfg.ema_decay)
        return metrics

    def sample_and_score(self, prompts: list[str], group_ids: torch.Tensor, gen: torch.Generator,
                         shared_groups: torch.Tensor | None = None):
        """Rollout in chunks of whole groups; each chunk is scored in a worker thread while
        the next one samples (the reward overlaps sampling when it is slow). Each chunk's noise
        comes from its own generator, keyed by one draw from ``gen`` and the chunk's first group
        id, so a chunk's images do not depend on the rank that samples it."""
        cfg = self.cfg
        groups_per_chunk = max(1, cfg.rollout.batch_size // cfg.group_size)
        chunk = groups_per_chunk * cfg.group_size
        base = int(torch.randint(0, 2**62, (1,), generator=gen))
        parts, futures = [], []
        sample = getattr(self.algo, "rollout", rollout)  # forward-process: clean samples only
        with ThreadPoolExecutor(max_workers=1) as pool:
            for s in range(0, len(prompts), chunk):
                g0 = s // cfg.group_size
                shared = None if shared_groups is None else shared_groups[g0 : g0 + groups_per_chunk]
                traj = sample(self.policy, prompts[s : s + chunk], group_ids[s : s + chunk], cfg.rollout,
                              generator=chunk_generator(base, int(group_ids[s])), shared_groups=shared)
                parts.append(traj)
                meta = [{"group": int(g)} for g in traj.group_ids]
                if cfg.async_reward:
                    futures.append(pool.submit(checked_call, self.reward, traj.images, traj.prompts, meta))
                else:
                    futures.append(_Done(checked_call(self.reward, traj.images, traj.prompts, meta)))
            outs = [f.result() for f in futures]
        traj = getattr(self.algo, "cat_rollouts", cat_trajectories)(parts)
        rewards = torch.cat([o.scores for o in outs])
        details = {k: torch.cat([o.details[k] for o in outs]) for k in outs[0].details}
        return traj, rewards, details

    @torch.no_grad()
    def evaluate(self, tag: str, num_images: int | None = None) -> dict:
        """Evaluation on fixed prompts and seeds (the EMA weights when kept) and its sample grid
        ``samples/<tag>.png``: the verifier's metrics in ShapesWorld, the training reward's with
        ``prompt_file``."""
        e = self.cfg.eval
        ctx = self.policy.use_snapshot("ema") if (e.use_ema and self.policy.has_snapshot("ema")) else nullcontext()
        if self.cfg.prompt_file is not None:  # outside ShapesWorld: the training reward on fixed prompts
            from diffalign.evaluation.reward_eval import evaluate_with_reward
            from diffalign.training.prompts import read_prompt_file

            with ctx:
                res, images, prompts = evaluate_with_reward(
                    self.policy, read_prompt_file(self.cfg.eval_prompt_file or self.cfg.prompt_file), self.reward,
                    num_images=num_images or e.num_images, steps=e.steps, guidance_scale=e.guidance_scale,
                    shift=self.cfg.rollout.shift, batch_size=self.cfg.rollout.batch_size)
            save_grid(images[:64], self.run.samples_dir / f"{tag}.png", ncol=8, captions=prompts[:64])
            return res
        with ctx:
            return loop.evaluate_to_grid(self.policy, self.run, tag, e.split, num_images or e.num_images,
                                         steps=e.steps, guidance_scale=e.guidance_scale, tasks=e.tasks)

    def _log_granularity(self, epoch: int, prompts: list[str], group_ids: torch.Tensor, shared: torch.Tensor) -> None:
        """``granularity.jsonl``: which groups were fine (shared noise) or coarse, per epoch (rank 0)."""
        if not self.world.is_main:
            return
        path = self.run.path / "granularity.jsonl"
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["epoch"] < epoch] if path.exists() else []
        path.write_text("\n".join([*lines, _granularity_line(epoch, prompts, group_ids, shared)]) + "\n")

    # -- the loop ----------------------------------------------------------------------
    def step_epoch(self, epoch: int, on_phase: Callable[[str], None] | None = None) -> dict:
        """One training epoch in its four phases (:meth:`epoch_prompts` → :meth:`rollout_and_score`
        → :meth:`epoch_advantages` → :meth:`update_policy`), without evaluation, logging or
        checkpoints: what :meth:`train` runs per epoch and the diagnostic benchmarks call directly.
        Adds the epoch's time to ``train_time`` and returns its ``metrics.jsonl`` row.
        ``on_phase`` is told each phase's name as it starts."""
        cfg = self.cfg
        phase = on_phase or (lambda _: None)
        t0 = time.perf_counter()
        gen = epoch_generator(cfg.seed, epoch)
        phase("sample")
        ep = self.epoch_prompts(epoch)
        batch = self.rollout_and_score(epoch, ep.prompts, ep.group_ids, gen)
        t_sampled = time.perf_counter()
        self._log_granularity(epoch + 1, ep.prompts, ep.group_ids, batch.shared_noise)
        phase("update")
        adv, adv_metrics = self.epoch_advantages(batch, ep.prompts, ep.group_ids)
        if self.curriculum is not None:  # from every rank's rewards: the same on all ranks
            self.curriculum.update(ep.kinds, batch.rewards, ep.group_ids)
        metrics = self.update_policy(epoch, batch.traj, adv, gen)
        t1 = time.perf_counter()
        self.train_time += t1 - t0
        row = {"reward": float(batch.rewards.mean()), "train_time_s": self.train_time, "lr": epoch_lr(cfg, epoch),
               "time/sample_s": t_sampled - t0, "time/update_s": t1 - t_sampled,
               "dgr/coarse_fraction": float((~batch.shared_noise).float().mean()), **adv_metrics,
               **{f"reward/{k}": float(v.mean()) for k, v in batch.details.items()}, **metrics}
        if ep.task_probs is not None:
            row |= {f"task_prob/{t}": p for t, p in ep.task_probs.items()}
        return row

    def train(self) -> dict:
        """Runs the remaining epochs in the shared loop, then writes ``summary.json``."""
        cfg = self.cfg
        runner = loop.TrainLoop(self.step_epoch, self.evaluate, self._save, unit="epoch", label=cfg.algorithm,
                                start=self.start_epoch, total=cfg.epochs, eval_every=cfg.eval.every,
                                ckpt_every=cfg.ckpt_every, max_train_minutes=cfg.max_train_minutes)
        try:
            out = runner.run(self.logger, self.console)
            final = {"epochs": out.done if cfg.epochs > self.start_epoch else cfg.epochs,
                     "train_time_s": self.train_time}
            return run_on_main(lambda: loop.write_summary(self.run, final, plot_curves))
        finally:
            self.run.unlock()


def _granularity_line(epoch: int, prompts: list[str], group_ids: torch.Tensor, shared: torch.Tensor) -> str:
    first = torch.unique(group_ids, return_inverse=True)[1]
    by_group = {}
    for i, g in enumerate(first.tolist()):
        by_group.setdefault(g, prompts[i])
    return json.dumps({"epoch": epoch, "groups": [
        {"group": g, "prompt": by_group[g], "granularity": "fine" if bool(shared[g]) else "coarse"}
        for g in sorted(by_group)]})


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each update metric averaged over the ranks that report it (a no-op in one process)."""
    reports = all_gather_object(metrics)
    if len(reports) == 1:
        return metrics
    keys = dict.fromkeys(k for r in reports for k in r)
    return {k: float(np.mean([r[k] for r in reports if k in r])) for k in keys}


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def plot_curves(run_path: Path, rows: list[dict]) -> Path | None:
    """``curves.png``: eval score and training reward vs epoch and vs training wall-clock."""
    return loop.plot_run_curves(run_path, rows, "reward", 2, 10, _draw_reward_curves)


def _draw_reward_curves(axes, ev: list[dict], tr: list[dict]) -> None:
    """Eval score and train reward vs epoch (left) and vs training minutes (right)."""
    for ax, x in zip(axes, ("step", "train_time_s"), strict=True):
        scale = 60.0 if x == "train_time_s" else 1.0
        if ev:
            ax.plot([r.get(x, 0) / scale for r in ev], [r["eval/score"] for r in ev], "o-", label="eval verifier score")
        if tr:
            ax.plot([r.get(x, 0) / scale for r in tr], [r["reward"] for r in tr], alpha=0.6, label="train reward")
        ax.set_xlabel("epoch" if x == "step" else "training wall-clock (min)")
        ax.grid(alpha=0.3)
    axes[0].legend()
