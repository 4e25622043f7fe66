"""ConsistentRFT = GRPO + Dynamic Granularity Rollout (DGR) + Consistent Policy Gradient
Optimization (CPGO). ALGORITHMS.md §2; details follow the authors' code.

DGR schedules the rollout's noise sources. A *fine-grained* group shares one initial noise
``x_1`` (its images differ only by SDE noise: local-detail exploration); a *coarse-grained*
group draws an independent ``x_1`` per image (global-semantics exploration). Per epoch:
epoch ``e`` is coarse when ``(e mod P)/P ≥ 1 − ρ``; or per group: a fraction ``ρ`` of each
epoch's groups is coarse.

CPGO pulls the current policy's clean estimate at ``x_k`` towards the rollout policy's
estimate one step later, a more stable prior::

    L_c = λ · mean_i ‖x̂0_θ(x_k)_i − sg(x̂0_old(x_{k+1}))_i‖₂

(or, with ``distance: mse``, the per-dimension mean of the squared difference) applied only at steps with ``σ_k ≤ gate``, each time with probability ``p``.

Where (``cpgo.steps``): ``trained`` evaluates it on the step GRPO is training (a stochastic step
inside the SDE window, reusing that forward pass); ``gated`` draws, for each sample chosen with
probability ``p``, a stored step with ``σ_k ≤ gate`` (ODE steps included) and runs the policy
there (one extra forward on the chosen samples). With the SDE on the early, high-σ steps only
``gated`` can reach the authors' gate (σ ≤ 0.6); it also keeps the injected SDE noise out of the
target: after an ODE step ``x̂0_old(x_{k+1})`` is a deterministic function of ``x_k``, after an
SDE step it carries ``∂x̂0/∂x · s_k·ε_k``, white noise the loss pulls the prediction towards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffalign.config import ranged
from diffalign.errors import ConfigError
from diffalign.sampling.rollout import Trajectory, predict_x0

CPGO_DISTANCES = ("l2", "mse")


def cpgo_loss(x0_pred: Tensor, x0_target: Tensor, weight: float | Tensor,
              distance: str = "l2") -> tuple[Tensor, dict[str, Tensor]]:
    """CPGO consistency loss ``L_c = λ·mean_i d(x̂0_θ,i, sg(target_i))``.

    ``distance``:

    - ``l2`` (ALGORITHMS.md): the L2 norm per sample, ``‖x̂0_θ − target‖₂``. It grows with the
      number of dimensions D (√D for the same per-pixel error) and its gradient is a unit
      vector per sample, ``λ·(x̂0_θ − target)/‖·‖``, whatever the distance.
    - ``mse``: the per-dimension mean of the squared difference, ``mean_d (x̂0_θ − target)²``
      (``F.mse_loss`` per sample). Independent of D for the same per-pixel error; its gradient,
      ``2λ·(x̂0_θ − target)/D``, shrinks with the distance. This is the normalisation under
      which a weight like the authors' 0.1 is read per pixel.

    Args:
        x0_pred: ``(B, ...)`` current policy's clean estimate ``x̂0_θ(x_k)`` (with gradient).
        x0_target: ``(B, ...)`` the stored ``x̂0_old(x_{k+1})`` (detached here).
        weight: ``λ``, a scalar or a per-sample ``(B,)`` weight (0 masks a sample out).
        distance: ``l2`` or ``mse``.

    Returns:
        ``(loss, metrics)`` with ``cpgo_dist`` (the mean per-sample distance, detached).
    """
    if x0_pred.shape != x0_target.shape:
        raise ValueError(f"x0_pred {tuple(x0_pred.shape)} and x0_target {tuple(x0_target.shape)} differ in shape")
    if distance not in CPGO_DISTANCES:
        raise ConfigError(f"cpgo.distance={distance!r}; choose one of {', '.join(CPGO_DISTANCES)}")
    diff = (x0_pred.float() - x0_target.detach().float()).flatten(1)
    dist = diff.norm(dim=1) if distance == "l2" else diff.pow(2).mean(dim=1)
    w = torch.as_tensor(weight, dtype=dist.dtype, device=dist.device)
    loss = (w * dist).mean()
    return loss, {"cpgo_dist": dist.detach().mean(), "cpgo_loss": loss.detach()}


@dataclass
class DGRConfig:
    """Dynamic Granularity Rollout."""

    mode: Literal["off", "epoch", "group"] = "off"
    """off: the rollout's own init_noise for every group; epoch: whole epochs coarse on a
    period; group: a fraction of every epoch's groups coarse."""
    period: int = ranged(40, ge=1)
    """P: schedule period in epochs (mode epoch)."""
    rate: float = ranged(0.25, ge=0, le=1)
    """ρ: fraction of each period (mode epoch) or of each epoch's groups (mode group) that is coarse."""

    def __post_init__(self) -> None:
        if self.mode not in ("off", "epoch", "group"):
            raise ConfigError(f"dgr.mode={self.mode!r}; choose off, epoch or group")
        if self.period < 1 or not 0 <= self.rate <= 1:
            raise ConfigError(f"dgr.period must be >= 1 and dgr.rate in [0, 1]; got {self.period}, {self.rate}")


def dgr_epoch_is_coarse(epoch: int, period: int, rate: float) -> bool:
    """Epoch ``e`` is coarse-grained when ``(e mod P)/P ≥ 1 − ρ``."""
    return (epoch % period) / period >= 1 - rate - 1e-12


def dgr_shared_groups(config: DGRConfig, epoch: int, num_groups: int, generator: torch.Generator) -> Tensor | None:
    """``(G,)`` bool: True = fine-grained (shared initial noise), False = coarse. None when DGR is off.

    mode ``group`` marks ``round(ρ·G)`` groups coarse, chosen at random (from ``generator``)."""
    if config.mode == "off":
        return None
    if config.mode == "epoch":
        return torch.full((num_groups,), not dgr_epoch_is_coarse(epoch, config.period, config.rate))
    n_coarse = round(config.rate * num_groups)
    shared = torch.ones(num_groups, dtype=torch.bool)
    shared[torch.randperm(num_groups, generator=generator)[:n_coarse]] = False
    return shared


@dataclass
class CPGOConfig:
    """Consistent Policy Gradient Optimization."""

    weight: float = ranged(0.0, ge=0)
    """λ (0 = off: no extra forward work and no random draws, so the update is plain GRPO)."""
    sigma_gate: float = ranged(0.6, ge=0, le=1)
    """Apply only at steps with σ_k ≤ this."""
    prob: float = ranged(0.2, ge=0, le=1)
    """Probability of applying it at a given (sample, step)."""
    distance: Literal["l2", "mse"] = "l2"
    """l2: per-sample L2 norm (ALGORITHMS.md); mse: per-dimension mean of the squared difference."""
    steps: Literal["trained", "gated"] = "trained"
    """trained: on the SDE step being trained (its forward reused); gated: on a stored step with
    σ ≤ sigma_gate drawn per chosen sample, ODE steps included (an extra forward)."""

    def __post_init__(self) -> None:
        if self.weight < 0 or not 0 <= self.prob <= 1:
            raise ConfigError(f"cpgo.weight must be >= 0 and cpgo.prob in [0, 1]; got {self.weight}, {self.prob}")
        if self.distance not in CPGO_DISTANCES:
            raise ConfigError(f"cpgo.distance={self.distance!r}; choose one of {', '.join(CPGO_DISTANCES)}")
        if self.steps not in ("trained", "gated"):
            raise ConfigError(f"cpgo.steps={self.steps!r}; choose trained (the SDE step being trained) or "
                              "gated (any stored step with sigma <= sigma_gate)")


class CPGORegularizer:
    """GRPO regularizer adding ``cpgo_loss`` on the gated, randomly selected (sample, step) pairs.

    With ``steps: gated`` it needs the policy (``needs_policy``): the GRPO update then passes
    ``policy``, the minibatch's ``cond`` and ``autocast_bf16``."""

    def __init__(self, config: CPGOConfig):
        self.config = config
        self.needs_policy = config.steps == "gated"

    def __call__(self, traj: Trajectory, idx: Tensor, k: Tensor, x0_pred: Tensor, generator: torch.Generator,
                 *, policy=None, cond=None, autocast_bf16: bool = False):
        if self.needs_policy:
            return self._gated(traj, idx, generator, policy, cond, autocast_bf16)
        c = self.config
        sigma = traj.sigmas.cpu()[k.cpu()]
        draw = torch.rand(len(idx), generator=generator)
        mask = (sigma <= c.sigma_gate + 1e-6) & (draw < c.prob)
        target = traj.next_x0_pred()[idx.to(traj.latents.device), k.to(traj.latents.device)]
        loss, metrics = cpgo_loss(x0_pred, target, c.weight * mask.to(x0_pred.device).float(), c.distance)
        metrics["cpgo_applied"] = mask.float().mean()
        return loss, metrics

    def gated_steps(self, traj: Trajectory) -> Tensor:
        """``(S,)`` the stored steps ``k < T`` with ``σ_k ≤ sigma_gate``."""
        steps = (traj.sigmas.cpu()[: traj.num_steps] <= self.config.sigma_gate + 1e-6).nonzero().flatten()
        if len(steps) == 0:
            raise ConfigError(f"cpgo.sigma_gate={self.config.sigma_gate} is below every step's sigma "
                              f"(smallest {float(traj.sigmas[traj.num_steps - 1]):.3f}); raise the gate")
        return steps

    def draw(self, traj: Trajectory, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``steps: gated``'s draw for a minibatch of ``n``: the positions chosen (each with
        probability ``prob``) and, for each, a step uniform over :meth:`gated_steps`."""
        steps = self.gated_steps(traj)
        chosen = (torch.rand(n, generator=generator) < self.config.prob).nonzero().flatten()
        return chosen, steps[torch.randint(len(steps), (len(chosen),), generator=generator)]

    def _gated(self, traj, idx, generator, policy, cond, autocast_bf16):
        c = self.config
        if policy is None:
            raise ValueError("cpgo.steps=gated needs the policy: call with policy=, cond=")
        chosen, kk = self.draw(traj, len(idx), generator)
        device = traj.latents.device
        metrics = {"cpgo_applied": torch.tensor(len(chosen) / max(len(idx), 1))}
        if len(chosen) == 0:
            zero = traj.latents.new_zeros(())
            return zero, {**metrics, "cpgo_loss": zero}
        sub_cond = None if cond is None else cond.index(chosen)
        sel = idx.cpu()[chosen]
        x0 = predict_x0(policy, traj, sel, kk, cond=sub_cond, autocast_bf16=autocast_bf16)
        target = traj.next_x0_pred()[sel.to(device), kk.to(device)]
        loss, m = cpgo_loss(x0, target, c.weight, c.distance)
        loss = loss * (len(chosen) / len(idx))  # a mean over the minibatch, 0 for samples not chosen
        return loss, {**metrics, "cpgo_dist": m["cpgo_dist"], "cpgo_loss": loss.detach()}
