"""Optimizer-state and gradient sharding across ranks (ZeRO stages 1 and 2) for diffalign's
data-parallel trainer.

``sharding: optimizer`` (ZeRO stage 1) in a training config. Each trainable parameter is *owned* by one rank
(a deterministic greedy partition by size); each rank keeps the AdamW state (``exp_avg``,
``exp_avg_sq``: 8 bytes per parameter in float32) of its own parameters only, so optimizer
memory drops by the number of ranks. An optimizer step:

1. reduces each gradient to its owner (a ``reduce``, half the traffic of an all-reduce) and
   frees it on the other ranks;
2. clips by the global gradient norm (per-parameter norms, summed across ranks), computed
   exactly as :func:`torch.nn.utils.clip_grad_norm_` does;
3. steps AdamW on the owned parameters;
4. broadcasts every parameter from its owner, so all ranks hold the full, identical weights
   (rollouts, snapshots, the reference model and evaluation need no change).

The arithmetic is that of the replicated path (all-reduce, clip, AdamW on every rank): on CPU
the two give bit-identical parameters (tested with ``torchrun --nproc_per_node 2``).
:meth:`ShardedOptimizer.state_dict` gathers the shards into the plain ``AdamW.state_dict()``
format, so checkpoints move freely between sharded, replicated and single-process runs.

``sharding: gradients`` (ZeRO stage 2) adds gradient sharding *during* backward: a hook on
every parameter (``register_post_accumulate_grad_hook``) collects the gradients of each
backward pass into fixed buckets (reverse parameter order, about :data:`BUCKET_MB` each); as
soon as a bucket is complete it is reduced to the owners of its parameters, which add it to a
float32 accumulator, and every rank frees those gradients. A rank therefore holds the gradients
of its own share plus the buckets in flight, not the whole model's, across all the micro-batches
of a step. The step then clips, steps and broadcasts as above. With one backward per
optimizer step the arithmetic is that of the replicated path (bit-identical on CPU); with
gradient accumulation the sum over ranks is taken per micro-batch instead of once, which
changes the float rounding only (tested to 1e-6).

Parameters stay replicated during forward and backward: parameter sharding (ZeRO stage 3,
FSDP ``FULL_SHARD``) is not implemented.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from diffalign.distributed import (
    _buckets,
    all_gather_object,
    all_reduce_gradients,
    broadcast_parameters,
    get_world,
    live_gradients,
    true_on_any_rank,
)

__all__ = ["BUCKET_MB", "SHARDING_MODES", "ShardedOptimizer", "make_optimizer", "partition_parameters",
           "reduce_clip_step"]

SHARDING_MODES = ("none", "optimizer", "gradients")
"""``none`` (replicated, DDP), ``optimizer`` (ZeRO stage 1), ``gradients`` (ZeRO stage 2)."""

BUCKET_MB = 25.0
"""Gradient bucket size of ``sharding: gradients`` (the default of DDP and DeepSpeed)."""

# hyperparameters the trainer may change between steps (the lr schedule); mirrored into the shard
_MUTABLE = ("lr", "betas", "eps", "weight_decay")


def partition_parameters(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each parameter: largest first, to the rank with the fewest elements so far
    (ties: lowest rank, then the earlier parameter). Deterministic, so every rank agrees."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class ShardedOptimizer:
    """A ``torch.optim`` optimizer whose state is split across ranks; see the module docstring.

    ``param_groups`` shows one group with *every* parameter (the algorithms collect their
    parameters from it) and the current hyperparameters; set ``lr`` there as on any optimizer.
    Use :func:`reduce_clip_step` for the step; :meth:`state_dict` is a collective (call it on
    every rank).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], factory: Callable[[list], torch.optim.Optimizer],
                 shard_gradients: bool = False, bucket_mb: float = BUCKET_MB):
        self.world = get_world()
        self.params = list(params)
        if not self.params:
            raise ValueError("ShardedOptimizer got an empty parameter list")
        self.owner = partition_parameters([p.numel() for p in self.params], self.world.world_size)
        self.local = [i for i, r in enumerate(self.owner) if r == self.world.rank]
        # a rank that owns nothing (more ranks than parameters) still needs the hyperparameters
        template = factory([torch.nn.Parameter(torch.zeros(1))])
        self.inner = factory([self.params[i] for i in self.local]) if self.local else None
        hyper = {k: v for k, v in template.param_groups[0].items() if k != "params"}
        self.param_groups = [{**hyper, "params": self.params}]
        self.shard_gradients = shard_gradients
        self._acc: dict[int, Tensor] = {}  # owned gradients, summed over ranks and micro-batches
        self._seen: set[int] = set()  # parameters that received a gradient since the last step
        if shard_gradients:
            self._buckets = _fixed_buckets(self.params, bucket_mb)
            self._ready: set[int] = set()  # gradients of the current backward pass not yet reduced
            self._next = 0  # the next bucket to reduce (buckets go in order on every rank)
            self._pass_open = False
            self._hooks = [p.register_post_accumulate_grad_hook(partial(self._on_gradient, i))
                           for i, p in enumerate(self.params)]

    # -- gradient sharding during backward (ZeRO stage 2) -----------------------------------
    def _on_gradient(self, i: int, _param: Tensor) -> None:
        if not self._pass_open:  # first gradient of this backward: reduce the rest when it ends
            self._pass_open = True
            # runs when this backward's graph is done (the hook DDP uses for its last buckets)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        self._ready.add(i)
        while self._next < len(self._buckets) and all(j in self._ready for j in self._buckets[self._next]):
            self._reduce_bucket(self._next)
            self._next += 1

    def _end_pass(self) -> None:
        # buckets holding a parameter without a gradient in this pass wait until here
        for b in range(self._next, len(self._buckets)):
            self._reduce_bucket(b)
        self._ready.clear()
        self._next = 0
        self._pass_open = False

    @torch.no_grad()
    def _reduce_bucket(self, b: int) -> None:
        world, dev = self.world, self.world.comm_device
        idx = [i for i in self._buckets[b] if i in self._ready]
        parts: dict[tuple, list[int]] = {}  # one reduce per owner, gradient dtype and device
        for i in idx:
            g = self.params[i].grad
            parts.setdefault((self.owner[i], str(g.dtype), str(g.device)), []).append(i)
        for (r, _, _), mine in sorted(parts.items()):
            flat = torch.cat([self.params[i].grad.reshape(-1) for i in mine]).to(dev)
            dist.reduce(flat, dst=r)
            if world.rank == r:
                offset = 0
                for i in mine:
                    g = self.params[i].grad
                    part = flat[offset : offset + g.numel()].view_as(g).to(g.device, torch.float32)
                    if i in self._acc:
                        self._acc[i].add_(part)
                    else:
                        self._acc[i] = part.clone()
                    offset += g.numel()
        for i in idx:
            self.params[i].grad = None
            self._ready.discard(i)
            self._seen.add(i)

    def owned_gradients(self) -> dict[int, Tensor]:
        """``sharding: gradients``: the gradients reduced to this rank so far in the current step,
        averaged over ranks, by parameter index (what the step will use before clipping)."""
        return {i: a / self.world.world_size for i, a in self._acc.items()}

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (before another optimizer takes over these parameters)."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []

    def gradient_bytes(self) -> int:
        """Bytes of gradients this rank holds now (``.grad`` tensors plus owned accumulators)."""
        held = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        return held + sum(a.numel() * a.element_size() for a in self._acc.values())

    # -- the step --------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._acc.clear()
        self._seen.clear()
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step_with_clipping(self, max_norm: float) -> float:
        """Reduce gradients to their owners, clip by the global norm, step, broadcast; returns the
        total gradient norm before clipping (as ``clip_grad_norm_``)."""
        if self.shard_gradients:
            live = self._collect_owned_gradients()
        else:
            live = live_gradients(self.params)
            self._reduce_to_owners(live)
        return self._clip_step_broadcast(live, max_norm)

    @torch.no_grad()
    def _collect_owned_gradients(self) -> list[int]:
        """``sharding: gradients``: move the owned accumulators into ``.grad`` (averaged)."""
        world = self.world
        live = true_on_any_rank([i in self._seen for i in range(len(self.params))])
        for i in live:
            if self.owner[i] == world.rank:
                p = self.params[i]
                acc = self._acc.pop(i, None)
                p.grad = (torch.zeros_like(p) if acc is None else (acc / world.world_size).to(p.dtype))
        self._acc.clear()
        self._seen.clear()
        return live

    @torch.no_grad()
    def _reduce_to_owners(self, live: list[int]) -> None:
        """``sharding: optimizer``: reduce each gradient to its owner, free it elsewhere."""
        world, dev = self.world, self.world.comm_device
        for r in range(world.world_size):
            mine = [i for i in live if self.owner[i] == r]
            for group in _buckets(self.params[i].grad for i in mine).values():
                flat = torch.cat([g.reshape(-1) for g in group]).to(dev)
                dist.reduce(flat, dst=r)
                if world.rank == r:
                    flat /= world.world_size
                    offset = 0
                    for g in group:
                        g.copy_(flat[offset : offset + g.numel()].view_as(g))
                        offset += g.numel()
            if world.rank != r:
                for i in mine:
                    self.params[i].grad = None

    @torch.no_grad()
    def _clip_step_broadcast(self, live: list[int], max_norm: float) -> float:
        world, dev = self.world, self.world.comm_device
        # the global norm, assembled from per-parameter norms in the replicated order
        norms = torch.zeros(len(live), dtype=torch.float32, device=dev)
        for j, i in enumerate(live):
            if self.owner[i] == world.rank:
                norms[j] = torch.linalg.vector_norm(self.params[i].grad.detach(), 2.0).float()
        dist.all_reduce(norms)
        total = torch.linalg.vector_norm(norms, 2.0) if len(live) else torch.zeros((), device=dev)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if self.inner is not None:
            for i in self.local:
                if self.params[i].grad is not None:
                    self.params[i].grad.mul_(coef.to(self.params[i].grad.device))
            for k in _MUTABLE:
                if k in self.param_groups[0]:
                    for g in self.inner.param_groups:
                        g[k] = self.param_groups[0][k]
            self.inner.step()
        for r in range(world.world_size):
            broadcast_parameters([p for p, o in zip(self.params, self.owner, strict=True) if o == r], src=r)
        return float(total)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The full ``AdamW.state_dict()`` of every parameter, gathered from the shards (collective)."""
        mine: dict[int, dict] = {}
        if self.inner is not None:
            for j, i in enumerate(self.local):
                st = self.inner.state.get(self.inner.param_groups[0]["params"][j])
                if st:
                    mine[i] = {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
        state: dict[int, dict] = {}
        for part in all_gather_object(mine):
            state.update(part)
        group = {k: copy.deepcopy(v) for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": dict(sorted(state.items())), "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full (unsharded) optimizer state; each rank keeps its own parameters' part."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state holds {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} group(s); this model trains {len(self.params)} in one group")
        group = {k: v for k, v in groups[0].items() if k != "params"}
        self.param_groups[0].update(group)
        if self.inner is None:
            return
        index = groups[0]["params"]
        full = state_dict["state"]
        local = {j: full[index[i]] for j, i in enumerate(self.local) if index[i] in full}
        self.inner.load_state_dict({"state": local, "param_groups": [{**group, "params": list(range(len(self.local)))}]})


def _fixed_buckets(params: Sequence[Tensor], bucket_mb: float) -> list[list[int]]:
    """Parameter indices in reverse order (about the order backward produces gradients), cut
    into buckets of at most ``bucket_mb`` (a larger parameter gets a bucket of its own)."""
    limit = bucket_mb * 2**20
    buckets: list[list[int]] = [[]]
    size = 0
    for i in reversed(range(len(params))):
        n = params[i].numel() * params[i].element_size()
        if buckets[-1] and size + n > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return buckets


def make_optimizer(params: Sequence[torch.nn.Parameter], factory: Callable[[list], torch.optim.Optimizer],
                   sharding: str = "none", bucket_mb: float = BUCKET_MB) -> torch.optim.Optimizer | ShardedOptimizer:
    """``factory(params)`` (replicated), or a :class:`ShardedOptimizer` for ``sharding`` ``optimizer``
    (ZeRO-1) or ``gradients`` (ZeRO-2) in a multi-process run (in one process there is nothing to
    shard)."""
    if sharding not in SHARDING_MODES:
        raise ValueError(f"sharding must be one of {', '.join(SHARDING_MODES)}, got {sharding!r}")
    if sharding != "none" and get_world().distributed:
        return ShardedOptimizer(params, factory, shard_gradients=sharding == "gradients", bucket_mb=bucket_mb)
    return factory(list(params))


def reduce_clip_step(optimizer, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """The end of every update step: average gradients across ranks, clip by ``max_norm``, step.

    Returns the total gradient norm before clipping. With a :class:`ShardedOptimizer` the
    gradients go to their owners only and the updated weights come back by broadcast.
    """
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.step_with_clipping(max_norm)
    all_reduce_gradients(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    return norm
