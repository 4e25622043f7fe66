"""DiffusionNFT: forward-process negative-aware fine-tuning, plus the forward-noising helpers.

The forward-process family (ALGORITHMS.md §3) re-noises each clean sample ``x0`` at a fresh
``σ`` with fresh ``ε`` and learns from velocity predictions there; any sampler may produce the
clean samples. :func:`forward_noising` and :func:`sample_training_sigmas` are shared with CRD.

:func:`nft_loss` reads as the paper's equation, with :func:`implicit_policies` (``v±``) and
:func:`clean_estimate_error` (``x̂0± − x0``) for its parts and the adaptive weighting of
:mod:`~diffalign.algorithms.per_sample`. When ``v_θ == v_old`` in value and ``r01 = 1`` the loss
is ``(5/β)·mean_i σ_i·mean(v_θ − v*)²_i / mean|v_θ − v*|_i``, an adaptively weighted
flow-matching loss whose gradient in ``v_θ`` does not depend on ``β``; with ``r01 = ½`` the two
branches' gradients cancel there.

All functions are pure: tensors in, tensors (and detached metrics) out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.algorithms.per_sample import (
    adaptive_weight,
    check_1d,
    check_same_shape,
    weighted_sq_error,
    work_dtype,
)
from diffalign.sampling.steps import time_shift

__all__ = [
    "clean_estimate_error",
    "forward_noising",
    "implicit_policies",
    "nft_loss",
    "sample_training_sigmas",
]

SIGMA_MIN = 1e-3
SIGMA_MAX = 1.0 - 1e-3

NFT_LOSS_SCALE = 5.0
"""DiffusionNFT multiplies its policy loss by ``adv_clip_max`` (5), the advantage clip."""


def _bcast_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` (float, 0-dim or ``(B,)``) shaped to broadcast against ``x`` ``(B, ...)``."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() == 0:
        return s
    if s.dim() == 1 and s.shape[0] == x.shape[0]:
        return s.reshape(-1, *([1] * (x.dim() - 1)))
    raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},); got {tuple(s.shape)}")


def forward_noising(x0: Tensor, sigma: Tensor | float, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Forward process at ``σ`` (SD3 convention): ``x_σ = (1−σ)·x0 + σ·ε``, ``v* = ε − x0``.

    Args:
        x0: ``(B, ...)`` clean samples.
        sigma: noise level, a float, 0-dim or ``(B,)`` (per sample).
        noise: ``(B, ...)`` standard normal ``ε``.

    Returns:
        ``(x_t, v_target)``, both ``(B, ...)``. ``x_t − σ·v_target == x0`` (up to rounding).
    """
    check_same_shape(x0=x0, noise=noise)
    dtype = work_dtype(x0)
    x0, noise = x0.to(dtype), noise.to(dtype)
    s = _bcast_sigma(sigma, x0)
    return (1.0 - s) * x0 + s * noise, noise - x0


def sample_training_sigmas(
    n: int,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    *,
    sigma_min: float = 0.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` training noise levels: ``u ~ U(0, 1)`` time-shifted, ``σ = s·u / (1 + (s−1)·u)``,
    then mapped onto ``[sigma_min, 1]``: ``σ_min + (1 − σ_min)·σ`` (``sigma_min = 0``: unchanged).

    ``shift > 1`` moves mass towards high noise (the published default is 3). The result is
    clamped to ``[1e-3, 1 − 1e-3]``, away from the endpoints where ``ε`` (at ``σ = 0``) or ``x0``
    (at ``σ = 1``) cannot be read off ``x_σ``.

    Returns:
        ``(n,)`` float32.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    if generator is not None and device is None:
        device = generator.device
    if not 0 <= sigma_min < 1:
        raise ValueError(f"sigma_min must be in [0, 1); got {sigma_min}")
    u = torch.rand(n, generator=generator, dtype=torch.float32, device=device)
    sigma = time_shift(u, shift)
    if sigma_min > 0:
        sigma = sigma_min + (1 - sigma_min) * sigma
    return sigma.clamp(SIGMA_MIN, SIGMA_MAX)


def implicit_policies(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DiffusionNFT's implicit positive and negative policies, ``(v⁺, v⁻)``::

        v⁺ = β·v_θ + (1−β)·v_old        v⁻ = (1+β)·v_old − β·v_θ

    They mirror each other about ``v_old``: ``v⁺ − v_old = β·(v_θ − v_old) = v_old − v⁻``.
    """
    return beta * v_theta + (1.0 - beta) * v_old, (1.0 + beta) * v_old - beta * v_theta


def clean_estimate_error(x_t: Tensor, sigma: Tensor, velocity: Tensor, x0: Tensor) -> Tensor:
    """``x̂0 − x0`` with the clean estimate ``x̂0 = x_σ − σ·v``; ``sigma`` broadcasts against ``x_t``."""
    return x_t - sigma * velocity - x0


@torch.no_grad()
def _nft_metrics(loss: Tensor, pos: Tensor, neg: Tensor, v_theta: Tensor, v_old: Tensor) -> dict[str, Tensor]:
    return {
        "loss": loss.detach(),
        "positive_loss": pos.detach().mean(),
        "negative_loss": neg.detach().mean(),
        "old_deviation": ((v_theta.detach() - v_old) ** 2).mean(),
    }


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    sigma: Tensor | float,
    reward01: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT policy loss (the update step adds the ``β_KL·mean‖v_θ − v_ref‖²`` anchor).

    ::

        v⁺   = β·v_θ + (1−β)·v_old              (implicit positive policy)
        v⁻   = (1+β)·v_old − β·v_θ              (implicit negative policy)
        x̂0±  = x_σ − σ·v±
        w±   = sg(per-sample mean |x̂0± − x0|) clamped ≥ 1e-5
        L    = 5 · mean_i [ r01_i · ‖x̂0⁺ − x0‖²_i / w⁺_i / β + (1 − r01_i) · ‖x̂0⁻ − x0‖²_i / w⁻_i / β ]

    ``‖·‖²_i`` is the **per-sample mean** of the squared error, as in the authors' code and
    like the weight ``w``, so the ratio is resolution-independent. The factor 5 is
    DiffusionNFT's ``adv_clip_max``. ``v_old`` is a constant; see the module docstring for the
    loss at ``v_θ == v_old``.

    Args:
        v_theta: ``(B, ...)`` policy velocity at ``(x_σ, σ, c)`` (with gradient).
        v_old: ``(B, ...)`` ``old``-snapshot velocity at the same inputs.
        x_t: ``(B, ...)`` noised sample ``x_σ``.
        x0: ``(B, ...)`` clean sample.
        sigma: float, 0-dim or ``(B,)`` noise level of ``x_t``.
        reward01: ``(B,)`` rewards in ``[0, 1]`` (``rewards_to_unit``), constants.
        beta: ``β > 0`` [1].

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached metrics ``loss``, ``positive_loss`` and
        ``negative_loss`` (batch means of ``‖x̂0± − x0‖²/w±``), ``old_deviation``
        (mean ``(v_θ − v_old)²``).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the loss divides by it); got {beta}")
    check_same_shape(v_theta=v_theta, v_old=v_old, x_t=x_t, x0=x0)
    reward01 = torch.as_tensor(reward01, device=v_theta.device)
    check_1d(reward01, "reward01", v_theta.shape[0])
    dtype = work_dtype(v_theta)
    v_theta, v_old = v_theta.to(dtype), v_old.detach().to(dtype)
    x_t, x0 = x_t.detach().to(dtype), x0.detach().to(dtype)
    r, s = reward01.detach().to(dtype), _bcast_sigma(sigma, x0)

    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    err_pos, err_neg = clean_estimate_error(x_t, s, v_pos, x0), clean_estimate_error(x_t, s, v_neg, x0)
    pos = weighted_sq_error(err_pos, adaptive_weight(err_pos))
    neg = weighted_sq_error(err_neg, adaptive_weight(err_neg))
    loss = NFT_LOSS_SCALE * (r * pos / beta + (1.0 - r) * neg / beta).mean()
    return loss, _nft_metrics(loss, pos, neg, v_theta, v_old)
