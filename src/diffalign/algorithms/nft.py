"""DiffusionNFT: forward-process negative-aware fine-tuning, plus the forward-noising helpers.

The forward-process family (ALGORITHMS.md §3) re-noises each clean sample ``x0`` at a fresh
``σ`` with fresh ``ε`` and learns from velocity predictions there; any sampler may produce the
clean samples. :func:`forward_noising` and :func:`sample_training_sigmas` are shared with CRD.

All functions are pure: tensors in, tensors (and detached metrics) out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.algorithms.crd import WEIGHT_MIN, _check_1d, _check_same_shape, _per_sample_mean, _work_dtype
from diffalign.sampling.steps import time_shift

__all__ = ["forward_noising", "nft_loss", "sample_training_sigmas"]

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
    _check_same_shape(x0=x0, noise=noise)
    dtype = _work_dtype(x0)
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

    ``‖·‖²_i`` is read as the **per-sample mean** of the squared error over all non-batch
    dimensions (not the sum): that is what the authors' code computes
    (``((x0_pred − x0)**2 / w).mean(dim=1..)``), it matches the denominator ``w`` (also a
    per-sample mean) so the ratio is resolution-independent, and it is the reduction every
    other per-sample error in this package uses. The factor 5 is DiffusionNFT's
    ``adv_clip_max``.

    ``v_old`` is a constant (detached). When ``v_θ == v_old`` in value and ``r01 = 1`` the loss is
    ``(5/β)·mean_i σ_i·mean(v_θ − v*)²_i / mean|v_θ − v*|_i``, an adaptively weighted
    flow-matching loss whose gradient in ``v_θ`` does not depend on ``β``; with ``r01 = ½`` the
    two branches' gradients cancel there.

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
    _check_same_shape(v_theta=v_theta, v_old=v_old, x_t=x_t, x0=x0)
    batch = v_theta.shape[0]
    reward01 = torch.as_tensor(reward01, device=v_theta.device)
    _check_1d(reward01, "reward01", batch)
    dtype = _work_dtype(v_theta)
    v_theta = v_theta.to(dtype)
    v_old = v_old.detach().to(dtype)
    x_t, x0 = x_t.detach().to(dtype), x0.detach().to(dtype)
    r = reward01.detach().to(dtype)
    s = _bcast_sigma(sigma, x0)

    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    err_pos = x_t - s * v_pos - x0
    err_neg = x_t - s * v_neg - x0
    with torch.no_grad():
        w_pos = _per_sample_mean(err_pos.abs()).clamp_min(WEIGHT_MIN)
        w_neg = _per_sample_mean(err_neg.abs()).clamp_min(WEIGHT_MIN)
    pos = _per_sample_mean(err_pos**2) / w_pos
    neg = _per_sample_mean(err_neg**2) / w_neg
    loss = NFT_LOSS_SCALE * (r * pos / beta + (1.0 - r) * neg / beta).mean()

    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "positive_loss": pos.detach().mean(),
            "negative_loss": neg.detach().mean(),
            "old_deviation": ((v_theta.detach() - v_old) ** 2).mean(),
        }
    return loss, metrics
