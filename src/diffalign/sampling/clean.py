"""Rollouts that keep only the clean samples (the forward-process family: CRD, DiffusionNFT).

Forward-process methods (ALGORITHMS.md §3) train on freshly re-noised clean samples, so the
rollout needs neither the intermediate states nor log-probabilities. :func:`sample_clean`
runs any sampler of :mod:`diffalign.sampling.rollout` with the *same* random draws as
:func:`~diffalign.sampling.rollout.rollout` (so it returns exactly ``rollout(...).latents[:, -1]``)
but holds only the running state: memory ``O(B)`` instead of ``O(B·T)`` in the number of steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.models.base import with_sampling_weights
from diffalign.sampling.rollout import (
    IndexLike,
    RolloutConfig,
    _chunks,
    _initial_noise,
    _model_output,
    _randn,
    _setup,
    _transition,
)

__all__ = ["CleanSamples", "sample_clean"]


@dataclass
class CleanSamples:
    """A batch of clean samples from a rollout. ``B`` images, latents ``(C, H, W)``.

    Attributes:
        prompts: ``B`` prompts, group-contiguous.
        group_ids: ``(B,)`` long, the prompt group of each sample.
        latents: ``(B, C, H, W)`` float32 final samples in the policy's latent space (the
            ``x0`` the forward process re-noises).
        images: ``(B, 3, H, W)`` float32 decoded samples in [0, 1].
        shared_noise: ``(G,)`` bool, whether group ``g`` shared one initial noise
            (``torch.unique(group_ids)`` order).
        sampler: the sampler that made them (any of ``SAMPLERS``).
        guidance_scale: the CFG weight used while sampling.
    """

    prompts: list[str]
    group_ids: Tensor
    latents: Tensor
    images: Tensor
    shared_noise: Tensor
    sampler: str
    guidance_scale: float

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_groups(self) -> int:
        return int(self.shared_noise.shape[0])

    def group_index(self) -> Tensor:
        """``(B,)`` long dense group index in ``[0, G)`` (``torch.unique(group_ids)`` order)."""
        return torch.unique(self.group_ids, return_inverse=True)[1]

    @staticmethod
    def cat(parts: Sequence[CleanSamples]) -> CleanSamples:
        """Concatenate chunks of whole groups (group ids must not repeat across chunks)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return CleanSamples(
            prompts=[q for p in parts for q in p.prompts],
            group_ids=torch.cat([p.group_ids for p in parts]),
            latents=torch.cat([p.latents for p in parts]),
            images=torch.cat([p.images for p in parts]),
            shared_noise=torch.cat([p.shared_noise for p in parts]),
            sampler=first.sampler,
            guidance_scale=first.guidance_scale,
        )


@torch.no_grad()
@with_sampling_weights
def sample_clean(
    policy: Any,
    prompts: Sequence[str],
    group_ids: IndexLike,
    config: RolloutConfig,
    *,
    generator: torch.Generator,
    shared_groups: Tensor | None = None,
) -> CleanSamples:
    """Sample ``B = len(prompts)`` images with ``config``'s sampler, keeping only the result.

    Same arguments and the same random draws as :func:`~diffalign.sampling.rollout.rollout`
    (initial noise per group and per sample, one SDE draw per step), so the returned
    ``latents`` equal ``rollout(...).latents[:, -1]`` bit for bit.

    Returns:
        :class:`CleanSamples` on the policy's device.
    """
    prompts, gids, group_index, shared, model, device, sched, shape = _setup(
        policy, prompts, group_ids, config, shared_groups)
    b = len(prompts)

    x = _initial_noise(shape, group_index, shared, generator, device)
    chunks = _chunks(b, config.batch_size)
    conds = [model.encode(prompts[c]) for c in chunks]
    for k in range(config.steps):
        noise = _randn((b, *shape), generator, device)
        ks = torch.full((b,), k, dtype=torch.long, device=device)
        out = torch.cat([
            _model_output(model, sched, x[c], ks[c], cond, config.guidance_scale, config.autocast_bf16)
            for c, cond in zip(chunks, conds, strict=True)
        ])
        x = _transition(sched, x, out, ks, noise=noise).prev_sample
    images = torch.cat([policy.decode(x[c]).float() for c in chunks])
    return CleanSamples(prompts=prompts, group_ids=gids.to(device), latents=x, images=images,
                        shared_noise=shared.to(device), sampler=config.sampler,
                        guidance_scale=float(config.guidance_scale))
