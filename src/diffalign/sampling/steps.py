"""Pure, batched, stateless sampler steps with Gaussian log-probabilities.

Conventions (see DESIGN.md, ALGORITHMS.md §1):

- Flow matching in the SD3 convention: ``x_σ = (1−σ)·x0 + σ·ε``, velocity ``v = ε − x0``,
  clean estimate ``x̂0 = x − σ·v``. A step goes from ``σ`` to ``σ_next < σ``,
  ``dt = σ_next − σ`` (negative).
- ``sigma``, ``sigma_next``, ``alpha_bar``, ``noise_level``, ``eta`` may each be a python float,
  a 0-dim tensor or a per-sample tensor of shape ``(B,)``; they are broadcast to ``x``.
- All math runs in float32 whatever the input dtype; every returned tensor is float32.
- ``log_prob`` is the Gaussian log-density **averaged over all non-batch dims** with every
  constant kept, ``mean(−(x'−μ)²/(2s²) − log s − ½·log 2π)``, shape ``(B,)``. It is computed
  on a detached ``x'`` so its gradient flows through ``μ`` and ``s`` only (as in Flow-GRPO).
- Where a sample's std is 0 (``noise_level = 0``, ``eta = 0``, or the CPS step to ``σ_next = 0``)
  the step is deterministic: ``x' = μ`` and the density is undefined; ``log_prob`` is then 0
  for that sample by convention.
- ``prev_sample`` given: the step scores it instead of drawing (the trainer's recompute path).
  ``noise`` given: it fixes the draw, ``x' = μ + s·noise``. Otherwise ``noise ~ N(0, I)`` from
  torch's global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "StepOutput",
    "cps_step",
    "dance_sde_step",
    "ddim_step",
    "flow_sde_noise_scale",
    "flow_sde_step",
    "flow_sigmas",
    "gaussian_log_prob",
    "block_coordinates",
    "block_noise_step",
    "block_project",
    "ode_step",
    "time_shift",
]

Scalar = float | Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """Result of one stochastic sampler step.

    Attributes:
        prev_sample: ``(B, ...)`` float32, the state at ``sigma_next`` (sampled, or the given one).
        mean: ``(B, ...)`` float32, the transition mean ``μ``.
        std: float32, broadcastable to ``x`` (0-dim or ``(B, 1, ..., 1)``), the transition std
            ``s``; includes ``sqrt(|dt|)`` where the SDE has it.
        log_prob: ``(B,)`` float32, per-sample mean over non-batch dims of the Gaussian
            log-density of ``prev_sample``, constants kept; 0 where ``std == 0``.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


# --------------------------------------------------------------------------- helpers


def _bcast(value: Scalar, x: Tensor, name: str) -> Tensor:
    """A float / 0-dim / ``(B,)`` / already-broadcastable value as float32, broadcastable to ``x``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.dim() == 0 or t.dim() == x.dim():
        return t
    if t.dim() == 1 and t.shape[0] == x.shape[0]:
        return t.reshape(-1, *([1] * (x.dim() - 1)))
    raise ValueError(
        f"{name} must be a float, a 0-dim tensor or a per-sample tensor of shape ({x.shape[0]},); "
        f"got shape {tuple(t.shape)} for x of shape {tuple(x.shape)}"
    )


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def _check_nonneg(value: Scalar, name: str) -> None:
    if isinstance(value, int | float) and value < 0:
        raise ValueError(f"{name} must be >= 0 (it scales the noise std); got {value}")


def _per_sample_mean(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).mean(dim=1)


def gaussian_log_prob(value: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample mean of ``−(x'−μ)²/(2s²) − log s − ½·log 2π``, shape ``(B,)``; 0 where ``s == 0``."""
    std = std.expand_as(mean)
    positive = std > 0
    safe = torch.where(positive, std, torch.ones_like(std))
    elem = -((value - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    return _per_sample_mean(torch.where(positive, elem, torch.zeros_like(elem)))


def _finish(mean: Tensor, std: Tensor, noise: Tensor | None, prev_sample: Tensor | None) -> StepOutput:
    """Draw (or take) ``x'`` and score it under ``N(mean, std²)``."""
    if prev_sample is None:
        eps = torch.randn_like(mean) if noise is None else _f32(noise)
        prev_sample = mean + std * eps
    else:
        prev_sample = _f32(prev_sample)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


# --------------------------------------------------------------------------- schedules


def time_shift(sigma: Scalar, shift: float) -> Scalar:
    """Shifted noise level ``σ' = s·σ / (1 + (s−1)·σ)`` (SD3 / FLUX time shift).

    The endpoints are kept exact (``σ = 1 → 1``, ``σ = 0 → 0``) so that the flow SDE's
    ``σ == 1`` branch is hit reliably. Returns a float for a float, a float32 tensor otherwise.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    if isinstance(sigma, int | float):
        if sigma in (0.0, 1.0):
            return float(sigma)
        return shift * sigma / (1 + (shift - 1) * sigma)
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    shifted = shift * sigma / (1 + (shift - 1) * sigma)
    return torch.where((sigma == 0) | (sigma == 1), sigma, shifted)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` float32 sigmas from 1 to 0: ``time_shift(linspace(1, 0, num_steps + 1), shift)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    return time_shift(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32), shift)


# --------------------------------------------------------------------------- flow steps


def ode_step(x: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar) -> Tensor:
    """Deterministic Euler step ``x' = x + dt·v``, ``dt = σ_next − σ``."""
    x, velocity = _f32(x), _f32(velocity)
    dt = _bcast(sigma_next, x, "sigma_next") - _bcast(sigma, x, "sigma")
    return x + dt * velocity


def flow_sde_noise_scale(sigma: Scalar, noise_level: Scalar, *, sigma_max: Scalar | None = None) -> Tensor:
    """Flow-GRPO's ``s_t = a·sqrt(σ / (1 − σ*))`` (no ``sqrt(−dt)``), float32, shaped like ``sigma``.

    ``σ* = σ_max`` where ``σ == 1`` (σ_max = the schedule's second sigma) and ``σ* = σ`` elsewhere.
    This is the ``s_t`` that the Flow-GRPO KL term divides by.
    """
    _check_nonneg(noise_level, "noise_level")
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32)
    device = sigma_t.device
    at_one = sigma_t == 1
    if sigma_max is None:
        if bool(at_one.any()):
            raise ValueError(
                "flow_sde_step at sigma == 1 needs sigma_max (the schedule's second sigma, e.g. "
                "sigmas[1]) because s_t = a*sqrt(sigma/(1-sigma)) is infinite there; pass sigma_max="
            )
        denom_sigma = sigma_t
    else:
        if isinstance(sigma_max, int | float) and not 0 <= sigma_max < 1:
            raise ValueError(f"sigma_max must be in [0, 1) (the schedule's second sigma); got {sigma_max}")
        sigma_max_t = torch.as_tensor(sigma_max, dtype=torch.float32, device=device)
        denom_sigma = torch.where(at_one, sigma_max_t, sigma_t)
    a = torch.as_tensor(noise_level, dtype=torch.float32, device=device)
    return a * torch.sqrt(sigma_t / (1 - denom_sigma))


def flow_sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    sigma_max: Scalar | None = None,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO SDE step.

    ``s_t = a·sqrt(σ/(1−σ*))`` (``σ* = σ_max`` where ``σ == 1``, else ``σ``), ``dt = σ_next − σ``::

        μ  = x·(1 + s_t²/(2σ)·dt) + v·(1 + s_t²·(1−σ)/(2σ))·dt
        s  = s_t·sqrt(−dt)
        x' = μ + s·ε

    With ``a = 0`` this is exactly the Euler ODE step ``x + dt·v`` and ``log_prob`` is 0.
    Raises ``ValueError`` if some ``σ == 1`` and ``sigma_max`` is None.
    """
    x, velocity = _f32(x), _f32(velocity)
    sig = _bcast(sigma, x, "sigma")
    dt = _bcast(sigma_next, x, "sigma_next") - sig
    s_t = _bcast(flow_sde_noise_scale(sigma, noise_level, sigma_max=sigma_max).to(x.device), x, "s_t")
    mean = x * (1 + s_t**2 / (2 * sig) * dt) + velocity * (1 + s_t**2 * (1 - sig) / (2 * sig)) * dt
    std = s_t * torch.sqrt(-dt)
    return _finish(mean, std, noise, prev_sample)


def dance_sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    eta: Scalar,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """DanceGRPO SDE step.

    ``x̂0 = x − σ·v``, ``score = −(x − (1−σ)·x̂0)/σ²``, ``dt = σ_next − σ``::

        μ  = x + dt·v + (−½·η²·score)·dt
        s  = η·sqrt(σ − σ_next)
        x' = μ + s·ε

    With ``η = 0`` this is the Euler ODE step and ``log_prob`` is 0.
    """
    _check_nonneg(eta, "eta")
    x, velocity = _f32(x), _f32(velocity)
    sig = _bcast(sigma, x, "sigma")
    sig_next = _bcast(sigma_next, x, "sigma_next")
    eta_t = _bcast(eta, x, "eta")
    dt = sig_next - sig
    x0_hat = x - sig * velocity
    score = -(x - (1 - sig) * x0_hat) / sig**2
    mean = x + dt * velocity + (-0.5 * eta_t**2 * score) * dt
    std = eta_t * torch.sqrt(sig - sig_next)
    return _finish(mean, std, noise, prev_sample)


def cps_step(
    x: Tensor,
    velocity: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    noise_level: Scalar,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """Coefficients-preserving sampling (CPS) step.

    ``x̂0 = x − σ·v``, ``ε̂ = x + (1−σ)·v``, ``a`` = noise_level::

        s  = σ_next·sin(a·π/2)
        μ  = x̂0·(1−σ_next) + ε̂·sqrt(σ_next² − s²)
        x' = μ + s·ε

    The step to ``σ_next = 0`` (and ``a = 0``) has ``s = 0``: deterministic, ``log_prob`` 0.
    With ``a = 0`` it equals the Euler ODE step up to rounding.
    """
    _check_nonneg(noise_level, "noise_level")
    x, velocity = _f32(x), _f32(velocity)
    sig = _bcast(sigma, x, "sigma")
    sig_next = _bcast(sigma_next, x, "sigma_next")
    a = _bcast(noise_level, x, "noise_level")
    std = sig_next * torch.sin(a * (math.pi / 2))
    x0_hat = x - sig * velocity
    eps_hat = x + (1 - sig) * velocity
    mean = x0_hat * (1 - sig_next) + eps_hat * torch.sqrt((sig_next**2 - std**2).clamp_min(0))
    return _finish(mean, std, noise, prev_sample)


# --------------------------------------------------------------------------- epsilon models


def ddim_step(
    x: Tensor,
    eps: Tensor,
    alpha_bar: Scalar,
    alpha_bar_prev: Scalar,
    eta: Scalar,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """DDIM step for ε-prediction models (DDPO), diffusers' ``alphas_cumprod`` convention.

    ``ᾱ = alpha_bar``, ``ᾱp = alpha_bar_prev``::

        x̂0  = (x − sqrt(1−ᾱ)·ε)/sqrt(ᾱ)
        var = (1−ᾱp)/(1−ᾱ)·(1 − ᾱ/ᾱp)
        s   = η·sqrt(var)
        μ   = sqrt(ᾱp)·x̂0 + sqrt(1 − ᾱp − s²)·ε
        x'  = μ + s·ε'

    With ``η = 0`` this is deterministic DDIM and ``log_prob`` is 0. No clipping of ``x̂0``.
    """
    _check_nonneg(eta, "eta")
    x, eps = _f32(x), _f32(eps)
    ab = _bcast(alpha_bar, x, "alpha_bar")
    ab_prev = _bcast(alpha_bar_prev, x, "alpha_bar_prev")
    eta_t = _bcast(eta, x, "eta")
    x0_hat = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = eta_t * torch.sqrt(var.clamp_min(0))
    mean = torch.sqrt(ab_prev) * x0_hat + torch.sqrt((1 - ab_prev - std**2).clamp_min(0)) * eps
    return _finish(mean, std, noise, prev_sample)


# --------------------------------------------------------------------------- coarse (block) noise


def _check_pool(x: Tensor, pool: int) -> None:
    if pool < 1:
        raise ValueError(f"pool must be >= 1 (1 = the isotropic SDE); got {pool}")
    if x.dim() != 4 or x.shape[-1] % pool or x.shape[-2] % pool:
        raise ValueError(
            f"block noise needs (B, C, H, W) states with H and W divisible by pool={pool}; got shape "
            f"{tuple(x.shape)}: pick a pool that divides the latent size"
        )


def block_coordinates(t: Tensor, pool: int) -> Tensor:
    """``Uᵀt``: orthonormal coordinates of ``t`` ``(B, C, H, W)`` on the images that are constant on
    ``pool × pool`` blocks (per channel), shape ``(B, C, H/pool, W/pool)``: block mean × pool."""
    _check_pool(t, pool)
    return F.avg_pool2d(t, pool) * pool if pool > 1 else t


def block_project(t: Tensor, pool: int) -> Tensor:
    """``P t = U Uᵀ t``: the orthogonal projection of ``t`` onto block-constant images (each
    ``pool × pool`` block replaced by its mean, per channel). ``pool = 1`` is the identity."""
    _check_pool(t, pool)
    if pool == 1:
        return t
    return F.interpolate(F.avg_pool2d(t, pool), scale_factor=pool, mode="nearest")


def block_noise_step(step: StepOutput, ode_next: Tensor, pool: int, *, noise: Tensor | None = None,
                     prev_sample: Tensor | None = None) -> StepOutput:
    """Restrict an SDE step's randomness to coarse, block-constant directions.

    ``step`` is a flow SDE step (``flow_sde_step`` / ``dance_sde_step``) from ``x`` and
    ``ode_next = ode_step(x, v, σ, σ_next)`` the Euler ODE step from the same ``x``. Their
    difference ``μ − x_ode`` is the SDE's score-correction drift ``½·s²·∇log p·dt``. With
    ``P`` the projection onto images constant on ``pool × pool`` blocks (:func:`block_project`)::

        μ_P = x_ode + P(μ − x_ode)
        x'  = μ_P + s·P ε

    i.e. the SDE ``dx = [v − ½ s_t² P ∇log p] dt + s_t P dW``, whose diffusion matrix
    ``s_t² P`` is low-rank; by the Fokker–Planck equation it has the same marginals as the ODE,
    exactly as the isotropic SDE (``pool = 1`` returns ``step`` unchanged). ``x'`` differs from
    ``μ_P`` only along the ``k = C·H·W/pool²`` block directions, so the density lives there:
    ``log_prob`` is the Gaussian log-density of ``u = Uᵀ(x' − μ_P)`` ~ ``N(0, s² I_k)``,
    averaged over the ``k`` coordinates, constants kept (0 where ``s == 0``). The policy gradient
    then carries noise in ``k`` instead of ``C·H·W`` directions.
    """
    if pool == 1:
        return step
    ode_next = _f32(ode_next)
    mean = ode_next + block_project(step.mean - ode_next, pool)
    if prev_sample is None:
        eps = torch.randn_like(mean) if noise is None else _f32(noise)
        prev_sample = mean + step.std * block_project(eps, pool)
    else:
        prev_sample = _f32(prev_sample)
    std = step.std
    if std.dim() == mean.dim() and std.shape[-2:] != (1, 1):  # a per-pixel std (constant on blocks)
        std = F.avg_pool2d(std.expand_as(mean), pool)
    coords_prev = block_coordinates(prev_sample.detach(), pool)
    log_prob = gaussian_log_prob(coords_prev, block_coordinates(mean, pool), std)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=step.std, log_prob=log_prob)
