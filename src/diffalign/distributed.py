"""Multi-process training with ``torch.distributed``: one process per device, whole prompt groups per rank.

Launch with ``torchrun --nproc_per_node N`` or ``accelerate launch`` (docs/distributed.md);
both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which
:func:`init_distributed` reads. Without them (a plain ``python`` / ``diffalign`` run) every
function here is a cheap no-op for a world of one process, so single-process code needs no
branches.

The pieces a data-parallel RL step needs:

- :func:`shard_groups` — the contiguous block of prompt groups of this rank (groups are never
  split across ranks, so group statistics need no communication);
- :func:`all_gather_tensor` / :func:`all_gather_object` — rewards and metrics of every rank,
  in rank order (= the single-process order, since shards are contiguous);
- :func:`all_reduce_gradients` — average the trainable parameters' gradients across ranks
  (one flat all-reduce per dtype), called by every update step before gradient clipping;
- :func:`broadcast_parameters` / :func:`check_in_sync` — start identical, and verify that the
  ranks still hold bit-identical parameters after an update;
- :func:`run_on_main` — run a side effect (create the run directory, evaluate) on rank 0 only
  and raise its error on every rank instead of leaving the others waiting at the next
  collective.

Backend: NCCL when CUDA is available, gloo on CPU (``DIFFALIGN_DIST_BACKEND`` overrides it).
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from diffalign.errors import ConfigError, DiffalignError

__all__ = [
    "DistributedError",
    "World",
    "all_gather_object",
    "all_gather_tensor",
    "all_reduce_gradients",
    "barrier",
    "broadcast_object",
    "broadcast_parameters",
    "check_in_sync",
    "get_world",
    "init_distributed",
    "launch_sharding",
    "live_gradients",
    "raise_if_any_failed",
    "resolve_sharding",
    "run_on_main",
    "shard_groups",
    "true_on_any_rank",
]

T = TypeVar("T")

TIMEOUT_MINUTES = 30
"""Collective timeout: rank 0 evaluates and checkpoints while the others wait at the next collective."""


class DistributedError(DiffalignError):
    """A failure on another rank, or ranks that disagree (shapes, parameters)."""


@dataclass(frozen=True)
class World:
    """This process's place in the job. A single-process run is ``World(0, 1, 0, None)``."""

    rank: int
    """Global rank in ``[0, world_size)``."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    backend: str | None
    """``nccl`` / ``gloo``, or None when not distributed."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes metrics, images, checkpoints and evaluations."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers must live: this rank's GPU for NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


_SINGLE = World(0, 1, 0, None)


def get_world() -> World:
    """The current world (a world of one unless :func:`init_distributed` set up a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return _SINGLE
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local, str(backend))


def init_distributed() -> World:
    """Join the process group described by the launcher's environment variables (idempotent).

    Returns the single-process world when ``WORLD_SIZE`` is unset or 1. With CUDA, selects
    ``cuda:LOCAL_RANK`` as this process's device.
    """
    if dist.is_available() and dist.is_initialized():
        return get_world()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch multi-process "
                          "runs with `torchrun --nproc_per_node N ...` or `accelerate launch ...` (docs/distributed.md)")
    launch_sharding()  # refuse an unsupported FSDP / DeepSpeed launch config before joining
    backend = os.environ.get("DIFFALIGN_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(minutes=TIMEOUT_MINUTES))
    atexit.register(_shutdown)
    return get_world()


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_world().distributed:
        dist.barrier()


# --------------------------------------------------------------------------- sharding

_FSDP_STRATEGIES = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD",
                    "5": "_HYBRID_SHARD_ZERO2"}
_UNSUPPORTED_HINT = ("diffalign replicates the parameters on every rank (rollouts, snapshots and the reference model "
                     "need them whole) and shards the optimizer state (ZeRO-1) or the optimizer state and gradients "
                     "(ZeRO-2) itself. Launch with configs/accelerate/deepspeed_zero2.yaml or fsdp.yaml as shipped, "
                     "or with ddp.yaml and sharding=gradients (docs/distributed.md)")


def launch_sharding(env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """The sharding an ``accelerate launch`` config asks for, as diffalign implements it.

    ``accelerate launch --config_file ...`` describes FSDP and DeepSpeed runs in environment
    variables. diffalign does not hand its model to the DeepSpeed engine or wrap it in FSDP: it
    implements the same memory savings itself (``diffalign.sharding``), so a launch config maps
    to a ``sharding`` mode:

    - DeepSpeed ZeRO stage 1 → ``optimizer``; stage 2 → ``gradients``; stage 0 → ``none``;
    - FSDP ``SHARD_GRAD_OP`` (FSDP 1) or ``reshard_after_forward: false`` (FSDP 2) →
      ``gradients``; ``NO_SHARD`` → ``none``.

    Returns ``(mode, description)``, or None for a launch without FSDP / DeepSpeed (``ddp.yaml``,
    ``torchrun``).

    Raises:
        ConfigError: parameter sharding (ZeRO stage 3, FSDP ``FULL_SHARD`` / ``HYBRID_SHARD``) or
            CPU offloading, which diffalign does not implement.
    """
    env = dict(os.environ if env is None else env)
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            with open(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]) as f:
                stage = str(json.load(f).get("zero_optimization", {}).get("stage", 0))
        offload = [k for k in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
                   if env.get(k, "none").lower() not in ("none", "")]
        if offload:
            raise ConfigError(f"the DeepSpeed launch config offloads to the CPU ({', '.join(offload)}); diffalign "
                              f"does not implement offloading. Set offload_optimizer_device and "
                              f"offload_param_device to none. {_UNSUPPORTED_HINT}")
        modes = {"0": "none", "1": "optimizer", "2": "gradients"}
        if stage is None:
            raise ConfigError("the DeepSpeed launch config names no ZeRO stage: set zero_stage (1 or 2) in its "
                              f"deepspeed_config. {_UNSUPPORTED_HINT}")
        if stage not in modes:
            raise ConfigError(f"the DeepSpeed launch config asks for ZeRO stage {stage} (parameter sharding); diffalign "
                              f"supports stages 0, 1 and 2. {_UNSUPPORTED_HINT}")
        return modes[stage], f"DeepSpeed ZeRO stage {stage} launch config"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise ConfigError(f"the FSDP launch config offloads parameters to the CPU (fsdp_offload_params: true); "
                              f"diffalign does not implement offloading. {_UNSUPPORTED_HINT}")
        if env.get("FSDP_VERSION", "1") == "2":
            if env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "false":
                return "gradients", "FSDP 2 launch config (reshard_after_forward: false)"
            raise ConfigError("the FSDP 2 launch config reshards parameters after forward (parameter sharding); "
                              f"set fsdp_reshard_after_forward: false. {_UNSUPPORTED_HINT}")
        raw = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
        strategy = _FSDP_STRATEGIES.get(raw, raw).upper()
        if strategy in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2"):
            return "gradients", f"FSDP {strategy} launch config"
        if strategy == "NO_SHARD":
            return "none", "FSDP NO_SHARD launch config"
        raise ConfigError(f"the FSDP launch config asks for fsdp_sharding_strategy {strategy} (parameter sharding); "
                          f"use SHARD_GRAD_OP (gradients and optimizer state sharded). {_UNSUPPORTED_HINT}")
    return None


def resolve_sharding(requested: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """The sharding mode of a run: the config's ``sharding``, or the launch config's when the
    config leaves it at ``none``. Returns ``(mode, where it came from)``.

    Raises:
        ConfigError: both set, to different modes, or an unsupported launch config.
    """
    launch = launch_sharding(env)
    if launch is None or launch[0] == requested:
        return requested, "config"
    if requested == "none":
        return launch
    raise ConfigError(f"sharding={requested} in the training config, but the {launch[1]} means sharding={launch[0]}; "
                      "drop one of the two or make them agree")


def shard_groups(num_groups: int, world: World | None = None) -> slice:
    """This rank's contiguous block of ``num_groups`` prompt groups (equal blocks, groups never split).

    Raises:
        ConfigError: ``num_groups`` is not a multiple of the world size. Equal blocks keep every
            rank's update loop the same length (each optimizer step is a collective).
    """
    world = world or get_world()
    if num_groups % world.world_size:
        raise ConfigError(f"prompts_per_epoch={num_groups} is not divisible by the {world.world_size} processes: "
                          f"each rank takes whole prompt groups, the same number on every rank. Use a multiple of "
                          f"{world.world_size} (e.g. prompts_per_epoch={world.world_size * max(1, num_groups // world.world_size)})")
    per = num_groups // world.world_size
    return slice(world.rank * per, (world.rank + 1) * per)


# --------------------------------------------------------------------------- collectives


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    world = get_world()
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not get_world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_tensor(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (sizes along dim 0 may differ).

    The result is on ``t``'s device and keeps its dtype; gradients do not flow through it.
    """
    world = get_world()
    if not world.distributed:
        return t
    dev = world.comm_device
    local = t.detach().to(dev).contiguous()
    sizes = torch.tensor([local.shape[0]], device=dev)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world.world_size)]
    dist.all_gather(all_sizes, sizes)
    n = [int(s) for s in all_sizes]
    padded = torch.zeros((max(n), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, n, strict=True)]).to(t.device)


def _buckets(tensors: Iterable[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    out: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        out.setdefault((t.dtype, t.device), []).append(t)
    return out


def true_on_any_rank(flags: Sequence[bool]) -> list[int]:
    """Indices of ``flags`` that are true on at least one rank (one all-reduce; collective)."""
    has = torch.tensor(list(flags), dtype=torch.int32, device=get_world().comm_device)
    dist.all_reduce(has)
    return [i for i, h in enumerate(has.tolist()) if h]


@torch.no_grad()
def live_gradients(params: Sequence[torch.nn.Parameter]) -> list[int]:
    """Indices of the parameters that have a gradient on at least one rank (one all-reduce);
    those without one on this rank get a zero gradient, so every rank reduces the same tensors."""
    live = true_on_any_rank([p.grad is not None for p in params])
    for i in live:
        if params[i].grad is None:
            params[i].grad = torch.zeros_like(params[i])
    return live


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average ``p.grad`` over ranks, in place (one flat all-reduce per dtype and device).

    Call it after the last backward of an optimizer step and before gradient clipping, on
    every rank, the same number of times. Each rank's loss is the mean over its own
    micro-batches, so with equal shards the average is the gradient of the mean over the
    global batch: ``N`` ranks × ``minibatch_size`` samples per step.
    A parameter without a gradient on some ranks counts as zero there; one without a gradient
    on every rank stays ``None`` (the optimizer skips it, as in a single process).
    """
    world = get_world()
    if not world.distributed:
        return
    dev = world.comm_device
    params = list(params)
    live = [params[i] for i in live_gradients(params)]
    for group in _buckets(p.grad for p in live).values():
        flat = torch.cat([g.reshape(-1) for g in group]).to(dev)
        dist.all_reduce(flat)
        flat /= world.world_size
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


@torch.no_grad()
def broadcast_parameters(params: Sequence[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` (or any tensors) into every rank's, in place."""
    world = get_world()
    if not world.distributed:
        return
    for group in _buckets(params).values():
        flat = torch.cat([p.detach().reshape(-1) for p in group]).to(world.comm_device)
        dist.broadcast(flat, src=src)
        offset = 0
        for p in group:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


@torch.no_grad()
def check_in_sync(params: Sequence[Tensor], what: str = "parameters") -> None:
    """Raise :class:`DistributedError` unless every rank holds bit-identical ``params``.

    Compares a float64 fingerprint (plain and position-weighted absolute sums); one all-gather.
    """
    world = get_world()
    if not world.distributed:
        return
    parts = [torch.stack([v.sum(), (i + 1) * v.abs().sum()]).to(world.comm_device)
             for i, v in enumerate(p.detach().double() for p in params)]
    fp = torch.stack(parts).sum(0) if parts else torch.zeros(2, dtype=torch.float64, device=world.comm_device)
    prints = all_gather_tensor(fp.unsqueeze(0)).cpu()
    if not bool((prints == prints[0]).all()):
        raise DistributedError(f"{what} differ across ranks after the update (fingerprints {prints.tolist()}): the "
                               "update step must call diffalign.distributed.all_reduce_gradients(params) after its "
                               "last backward and before clipping / optimizer.step()")


def run_on_main(fn: Callable[[], T], *, broadcast: bool = True) -> T | None:
    """Run ``fn`` on rank 0 only; its exception is raised on every rank.

    Returns ``fn()``'s value on every rank when ``broadcast`` (it must be picklable), else on
    rank 0 and None elsewhere. Ranks other than 0 wait here for rank 0 to finish.
    """
    world = get_world()
    if not world.distributed:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if world.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    failure = broadcast_object(None if error is None else (type(error).__name__, str(error), isinstance(error, DiffalignError)))
    if failure is not None:
        if error is not None:
            raise error
        name, msg, user = failure
        raise (DistributedError if user else RuntimeError)(f"rank 0 failed: {name}: {msg}")
    return broadcast_object(result) if broadcast else result


def raise_if_any_failed(error: BaseException | None) -> None:
    """A collective check after a step that may fail on some ranks only (e.g. a reward server).

    Every rank passes its own exception (or None). If any rank failed, the failing ranks
    re-raise their own error and the others raise a :class:`DistributedError` naming it, so no
    rank is left waiting at a later collective.
    """
    world = get_world()
    if not world.distributed:
        if error is not None:
            raise error
        return
    reports = all_gather_object(None if error is None else (type(error).__name__, str(error), isinstance(error, DiffalignError)))
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return
    if error is not None:
        raise error
    rank, (name, msg, user) = failed[0]
    raise (DistributedError if user else RuntimeError)(f"rank {rank} failed: {name}: {msg}")
