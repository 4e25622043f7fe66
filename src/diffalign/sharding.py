"""Optimizer-state sharding across ranks (ZeRO stage 1) for diffalign's data-parallel trainer.

``sharding: optimizer`` in a training config. Each trainable parameter is *owned* by one rank
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

Parameters and gradients stay replicated during forward and backward: this is not FSDP.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

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
)

__all__ = ["ShardedOptimizer", "make_optimizer", "partition_parameters", "reduce_clip_step"]

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

    def __init__(self, params: Sequence[torch.nn.Parameter], factory: Callable[[list], torch.optim.Optimizer]):
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

    # -- the step --------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step_with_clipping(self, max_norm: float) -> float:
        """Reduce gradients to their owners, clip by the global norm, step, broadcast; returns the
        total gradient norm before clipping (as ``clip_grad_norm_``)."""
        world, dev = self.world, self.world.comm_device
        live = live_gradients(self.params)
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


def make_optimizer(params: Sequence[torch.nn.Parameter], factory: Callable[[list], torch.optim.Optimizer],
                   sharding: str = "none") -> torch.optim.Optimizer | ShardedOptimizer:
    """``factory(params)`` (replicated), or a :class:`ShardedOptimizer` when ``sharding == "optimizer"``
    in a multi-process run (in one process there is nothing to shard)."""
    if sharding == "optimizer" and get_world().distributed:
        return ShardedOptimizer(params, factory)
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
