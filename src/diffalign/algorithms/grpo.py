"""GRPO-family losses (Flow-GRPO, DanceGRPO, DDPO): group advantages, PPO clip loss, Flow-GRPO KL.

All functions are pure: tensors in, tensors (and detached metrics) out. See ALGORITHMS.md §2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["flow_grpo_kl", "grpo_advantages", "per_reward_advantages", "ppo_clip_loss", "zero_signal_fraction"]

ADV_EPS = 1e-4


def _as_1d(values: Tensor | Sequence, name: str, dtype: torch.dtype | None = None) -> Tensor:
    t = torch.as_tensor(values) if dtype is None else torch.as_tensor(values, dtype=dtype)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per sample); got shape {tuple(t.shape)}")
    return t


def _group_index(rewards: Tensor, group_ids: Tensor | Sequence) -> tuple[Tensor, int]:
    """Dense group index ``(B,)`` in ``[0, G)`` and ``G``, validated against ``rewards``."""
    ids = _as_1d(group_ids, "group_ids").to(rewards.device)
    if ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have one id per reward: got {tuple(ids.shape)} ids for {tuple(rewards.shape)} rewards"
        )
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(uniq.numel())


def _group_mean(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Per-sample mean of ``values`` over the sample's group, shape ``(B,)``."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=num_groups).to(values.dtype)
    return (sums / counts)[inverse]


def grpo_advantages(
    rewards: Tensor | Sequence[float],
    group_ids: Tensor | Sequence[int],
    *,
    std: Literal["group", "global"] = "group",
    clip: float | None = 5.0,
) -> Tensor:
    """Group-relative advantages ``A = (r − mean_group) / (std + 1e-4)``, clipped to ``±clip``.

    Args:
        rewards: ``(B,)`` rewards.
        group_ids: ``(B,)`` integer id of each sample's group (prompt); groups need not be
            contiguous or numbered densely.
        std: ``"group"`` divides by the std of the sample's own group, ``"global"`` by the std of
            the whole batch (Flow-GRPO's ``global_std``). The mean is always the group mean.
        clip: advantages are clamped to ``[−clip, clip]``; ``None`` disables clipping.

    The std is the **population** std (``correction=0``, numpy's default, as in Flow-GRPO's
    stat tracker). A group of size 1 gets advantage 0 (its reward equals its group mean).

    Returns:
        ``(B,)`` float32 advantages (no gradient).
    """
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global'; got {std!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None; got {clip}")
    r = _as_1d(rewards, "rewards").detach().to(torch.float32)
    inverse, num_groups = _group_index(r, group_ids)
    centered = r - _group_mean(r, inverse, num_groups)
    if std == "group":
        scale = _group_mean(centered**2, inverse, num_groups).sqrt()
    else:
        scale = r.std(correction=0).expand_as(r)
    adv = centered / (scale + ADV_EPS)
    return adv if clip is None else adv.clamp(-clip, clip)


def per_reward_advantages(
    components: dict[str, Tensor],
    weights: dict[str, float],
    group_ids: Tensor | Sequence[int],
    *,
    std: Literal["group", "global"] = "group",
    clip: float | None = 5.0,
) -> Tensor:
    """Advantages of a weighted multi-reward, each reward normalised within its group first::

        A = clip(Σ_i w_i · (r_i − mean_group(r_i)) / (std(r_i) + 1e-4), ±clip)

    so a reward with a large numeric range (PickScore ≈ 20) cannot drown one in [0, 1] (OCR),
    whatever their weights. ``std`` as in :func:`grpo_advantages`; each component is
    normalised unclipped and the weighted sum is clipped.

    Args:
        components: name → ``(B,)`` rewards.
        weights: name → weight; must have exactly the keys of ``components``.

    Returns:
        ``(B,)`` float32 advantages (no gradient).
    """
    if not components:
        raise ValueError("per_reward_advantages needs at least one reward component")
    if set(components) != set(weights):
        raise ValueError(f"components {sorted(components)} and weights {sorted(weights)} must name the same rewards")
    total = None
    for name, r in components.items():
        a = weights[name] * grpo_advantages(r, group_ids, std=std, clip=None)
        total = a if total is None else total + a
    return total if clip is None else total.clamp(-clip, clip)


def zero_signal_fraction(rewards: Tensor | Sequence[float], group_ids: Tensor | Sequence[int]) -> float:
    """Fraction of groups whose rewards are all (exactly) equal: they carry no GRPO signal.

    Groups of size 1 count as zero-signal (their advantage is 0).
    """
    r = _as_1d(rewards, "rewards").detach().to(torch.float32)
    inverse, num_groups = _group_index(r, group_ids)
    gmax = torch.full((num_groups,), -torch.inf, device=r.device).scatter_reduce(0, inverse, r, "amax")
    gmin = torch.full((num_groups,), torch.inf, device=r.device).scatter_reduce(0, inverse, r, "amin")
    return float((gmax == gmin).float().mean())


def ppo_clip_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate.

    ``ρ = exp(log p_θ − log p_old)``, ``ε`` = clip_range::

        L = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))

    ``old_log_prob`` and ``advantages`` are treated as constants (detached).

    Returns:
        ``(loss, metrics)``: 0-dim loss; metrics are detached 0-dim float32 tensors (no host
        sync): ``approx_kl = ½·mean((log p_θ − log p_old)²)``, ``clipfrac`` = fraction with
        ``|ρ − 1| > ε``, ``ratio_mean``, ``ratio_max``.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0; got {clip_range}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            "log_prob, old_log_prob and advantages must have the same shape; got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def flow_grpo_kl(mean_theta: Tensor, mean_ref: Tensor, std_t: float | Tensor) -> Tensor:
    """Flow-GRPO's KL to the reference: per-sample mean of ``‖μ_θ − μ_ref‖² / (2·s_t²)``.

    ``s_t`` is the SDE noise scale *without* ``sqrt(−dt)`` (see
    ``diffalign.sampling.flow_sde_noise_scale``): a float, 0-dim, ``(B,)`` or broadcastable to
    the means. ``μ_ref`` is not detached here; the caller computes it under ``no_grad``.

    Returns:
        ``(B,)`` float32.
    """
    diff2 = (mean_theta.float() - mean_ref.float()) ** 2
    s = torch.as_tensor(std_t, dtype=torch.float32, device=diff2.device)
    if s.dim() == 1 and diff2.dim() > 1:
        if s.shape[0] != diff2.shape[0]:
            raise ValueError(f"std_t of shape {tuple(s.shape)} does not match batch {diff2.shape[0]}")
        s = s.reshape(-1, *([1] * (diff2.dim() - 1)))
    kl = diff2 / (2 * s**2)
    return kl.reshape(kl.shape[0], -1).mean(dim=1)
