"""An ε-prediction view of a flow policy, and diffusers-style DDPM / DDIM schedules.

The variance-preserving (VP, DDPM) path ``x_vp = √ᾱ·x0 + √(1−ᾱ)·ε`` and the rectified-flow
path ``x_σ = (1−σ)·x0 + σ·ε`` are the same path up to a per-time rescaling. With
``c = √ᾱ + √(1−ᾱ)``::

    x_σ = x_vp / c,        σ = √(1−ᾱ) / c        (so 1 − σ = √ᾱ / c)

and, since ``v = ε − x0`` and ``x_σ = (1−σ)·x0 + σ·ε``, the noise is recovered exactly as::

    ε̂ = x_σ + (1−σ)·v̂(x_σ, σ)

:class:`EpsilonView` wraps a flow policy (``prediction == "flow"``) so that DDIM / DDPO code,
written for ε-prediction models in diffusers' ``alphas_cumprod`` convention, runs on it. The
clean estimates agree: ``(x_vp − √(1−ᾱ)·ε̂)/√ᾱ = x_σ − σ·v̂``. Classifier-free guidance commutes
with the view because ``ε̂`` is affine in ``v̂`` with condition-independent coefficients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffalign.errors import ConfigError

__all__ = [
    "EpsilonView",
    "ddim_timesteps",
    "ddpm_alphas_cumprod",
    "flow_sigma_from_alpha_bar",
    "flow_to_vp",
    "vp_to_flow",
]


def ddpm_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> Tensor:
    """diffusers' DDPM ``alphas_cumprod`` ``ᾱ_t = ∏_{s≤t} (1 − β_s)``, float32, shape ``(N,)``.

    ``scaled_linear`` (SD1.5's default): ``β = linspace(√β_start, √β_end, N)²``;
    ``linear``: ``β = linspace(β_start, β_end, N)``.
    """
    if num_train_timesteps < 1:
        raise ConfigError(f"num_train_timesteps must be >= 1; got {num_train_timesteps}")
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ConfigError(f"beta_schedule must be 'scaled_linear' or 'linear'; got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def flow_sigma_from_alpha_bar(alpha_bar: Tensor | float) -> Tensor:
    """Rectified-flow noise level of a VP state: ``σ = √(1−ᾱ) / (√ᾱ + √(1−ᾱ))`` (float32)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float32)
    sb = torch.sqrt(1 - ab)
    return sb / (torch.sqrt(ab) + sb)


def _scale(alpha_bar: Tensor | float, x: Tensor) -> Tensor:
    """``c = √ᾱ + √(1−ᾱ)`` as float32, broadcastable to ``x`` (``ᾱ`` scalar or ``(B,)``)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x.device)
    c = torch.sqrt(ab) + torch.sqrt(1 - ab)
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() == 1 else c


def vp_to_flow(x_vp: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``x_σ = x_vp / (√ᾱ + √(1−ᾱ))``; ``ᾱ`` a scalar or per-sample ``(B,)``. Float32."""
    return x_vp.float() / _scale(alpha_bar, x_vp)


def flow_to_vp(x_sigma: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``x_vp = (√ᾱ + √(1−ᾱ))·x_σ``, the inverse of :func:`vp_to_flow`. Float32."""
    return x_sigma.float() * _scale(alpha_bar, x_sigma)


def ddim_timesteps(
    steps: int,
    num_train_timesteps: int = 1000,
    *,
    alphas_cumprod: Tensor | None = None,
    steps_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DDIM schedule with diffusers' "leading" spacing.

    ``r = N // steps``, ``t_k = (steps − 1 − k)·r + steps_offset`` (descending), and the step
    from ``t_k`` goes to ``t_k − r``: ``ᾱ_k = ᾱ[t_k]``, ``ᾱ_prev,k = ᾱ[t_k − r]`` where
    ``t_k − r ≥ 0``, else 1 (the final step lands on the clean sample).

    Args:
        steps: number of sampling steps ``T``.
        num_train_timesteps: ``N``, the DDPM training schedule length.
        alphas_cumprod: ``(N,)`` schedule; default :func:`ddpm_alphas_cumprod` ``(N)`` (SD1.5's).
        steps_offset: diffusers' ``steps_offset`` (SD1.5's scheduler config uses 1).

    Returns:
        ``(timesteps (T,) long, alpha_bar (T,) float32, alpha_bar_prev (T,) float32)``.
    """
    if alphas_cumprod is None:
        alphas_cumprod = ddpm_alphas_cumprod(num_train_timesteps)
    if alphas_cumprod.shape != (num_train_timesteps,):
        raise ConfigError(
            f"alphas_cumprod has shape {tuple(alphas_cumprod.shape)} but num_train_timesteps="
            f"{num_train_timesteps}; pass num_train_timesteps=len(alphas_cumprod)"
        )
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"DDIM steps must be in [1, {num_train_timesteps}]; got {steps}")
    ratio = num_train_timesteps // steps
    timesteps = torch.arange(steps - 1, -1, -1, dtype=torch.long) * ratio + steps_offset
    if int(timesteps[0]) >= num_train_timesteps:
        raise ConfigError(f"steps_offset={steps_offset} pushes the first timestep past {num_train_timesteps - 1}")
    ac = alphas_cumprod.float().cpu()
    prev = timesteps - ratio
    alpha_bar = ac[timesteps]
    alpha_bar_prev = torch.where(prev >= 0, ac[prev.clamp_min(0)], torch.ones(()))
    return timesteps, alpha_bar, alpha_bar_prev


class EpsilonView:
    """ε-prediction view of a flow policy (see the module docstring for the algebra).

    ``predict(x_vp, t, cond, w)`` maps the VP state at integer DDPM timestep ``t`` to the
    flow state ``x_σ = x_vp/c`` at ``σ = √(1−ᾱ_t)/c``, asks the wrapped policy for ``v̂`` (with
    its batched CFG) and returns ``ε̂ = x_σ + (1−σ)·v̂`` in float32. Everything else
    (``encode``, ``decode``, ``latent_shape``, ``image_size``, ``reference()``,
    ``use_snapshot()``, ``trainable_parameters()``, ...) is delegated to the wrapped policy.

    Attributes:
        prediction: ``"epsilon"``.
        policy: the wrapped flow policy.
        alphas_cumprod: ``(N,)`` float32 DDPM schedule ``ᾱ_t`` (default: SD1.5's scaled-linear
            betas 0.00085 → 0.012 over 1000 steps).
    """

    prediction = "epsilon"

    def __init__(self, policy: Any, alphas_cumprod: Tensor | None = None):
        if getattr(policy, "prediction", None) != "flow":
            raise ConfigError(
                f"EpsilonView wraps a flow-prediction policy; got prediction="
                f"{getattr(policy, 'prediction', None)!r} (an ε-model needs no view)"
            )
        self.policy = policy
        ac = ddpm_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
        self.alphas_cumprod = ac.float().cpu()

    @property
    def num_train_timesteps(self) -> int:
        """Length ``N`` of the DDPM schedule."""
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: Tensor | int, device: torch.device | str | None = None) -> Tensor:
        """``ᾱ_t`` (float32) for integer timesteps ``t`` (scalar or ``(B,)``)."""
        idx = torch.as_tensor(t).long().cpu()
        if bool(((idx < 0) | (idx >= self.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must be integers in [0, {self.num_train_timesteps}); got {idx.tolist()}")
        return self.alphas_cumprod[idx].to(device)

    def predict(self, x: Tensor, t: Tensor | int, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """``ε̂(x_vp, t) = x_σ + (1−σ)·v̂(x_σ, σ)``, ``x_σ = x_vp/c``, ``σ = √(1−ᾱ_t)/c``. Float32."""
        ab = self.alpha_bar(t, x.device)
        if ab.dim() == 0:
            ab = ab.expand(x.shape[0])
        sigma = flow_sigma_from_alpha_bar(ab)
        x_sigma = vp_to_flow(x, ab)
        v = self.policy.predict(x_sigma, sigma, cond, guidance_scale=guidance_scale).float()
        return x_sigma + (1 - sigma).reshape(-1, *([1] * (x.dim() - 1))) * v

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; guard "policy" against recursion (copy/pickle).
        if name == "policy":
            raise AttributeError(name)
        return getattr(self.policy, name)

    def __repr__(self) -> str:
        return f"EpsilonView({self.policy.__class__.__name__}, N={self.num_train_timesteps})"
