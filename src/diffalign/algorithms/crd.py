"""CRD — Centered Reward Distillation: implicit reward, centred reward matching, adaptive KL.

KL-regularised reward maximisation has the optimum ``p* ∝ p_ref·exp(r/β)``, so
``β·log(p_θ/p_ref)(x|c) = r(x, c) − β·log Z(c)``. ``Z(c)`` is unknown but shared by every image
of prompt ``c``: centring both sides within the prompt's group cancels it and leaves a
reward-matching regression. See ALGORITHMS.md §3 and ``seeds/crd-abstract.md``.

Also here: the reward-adaptive KL anchor, the advantage → ``[0, 1]`` map shared with
DiffusionNFT, and the snapshot decay schedules (pure functions of the step).

All losses are pure: tensors in, ``(loss, metrics)`` out, metrics detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.algorithms.grpo import _group_index, _group_mean
from diffalign.errors import ConfigError

__all__ = [
    "DecaySchedule",
    "crd_implicit_reward",
    "crd_loss",
    "make_decay_schedule",
    "old_decay",
    "reward_adaptive_kl",
    "rewards_to_unit",
    "sampler_decay",
]

WEIGHT_MIN = 1e-5
"""Lower clamp of the adaptive weights ``w`` (DiffusionNFT's ``clip(min=0.00001)``)."""


def _work_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bf16/int inputs, float64 kept (so tests can check exact values)."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def _per_sample_mean(t: Tensor) -> Tensor:
    """Mean over all non-batch dimensions, shape ``(B,)``."""
    return t.reshape(t.shape[0], -1).mean(dim=1)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one shape; got {shapes}")
    if next(iter(shapes.values())) == ():
        raise ValueError(f"tensors need a batch dimension; got 0-dim {list(shapes)}")


def _check_1d(t: Tensor, name: str, batch: int | None = None) -> None:
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        want = "(B,)" if batch is None else f"({batch},)"
        raise ValueError(f"{name} must have shape {want} (one value per sample); got {tuple(t.shape)}")


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of two ``(B,)`` tensors; 0 where either is constant (no host sync)."""
    a = a - a.mean()
    b = b - b.mean()
    denom = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return torch.where(denom > 0, (a * b).sum() / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0)


# --------------------------------------------------------------------------- rewards


def rewards_to_unit(advantages: Tensor | Sequence[float], clip: float = 5.0) -> Tensor:
    """Map advantages to ``[0, 1]``: ``r01 = clip(A, ±clip) / (2·clip) + 0.5``.

    With the default ``clip = 5`` this is ALGORITHMS.md's ``r01 = clip(A, ±5)/10 + 0.5``
    (DiffusionNFT's ``A / clip_max / 2 + 0.5``). ``A = 0`` maps to ``0.5``.

    Returns:
        float32 (float64 kept) tensor shaped like ``advantages``, detached.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0; got {clip}")
    a = torch.as_tensor(advantages).detach()
    a = a.to(_work_dtype(a))
    return a.clamp(-clip, clip) / (2.0 * clip) + 0.5


def crd_implicit_reward(v_theta: Tensor, v_old: Tensor, v_target: Tensor, *, adaptive: bool = True) -> Tensor:
    """Forward-process estimate of the log-ratio of the policy against the ``old`` snapshot.

    ::

        r̂_θ = −per-sample mean[(v_θ − v*)² / w_θ − (v_old − v*)² / w_old]
        w   = sg(per-sample mean |v − v*|) clamped ≥ 1e-5          (adaptive=True)
        w   = 1                                                  (adaptive=False)

    A sample whose velocity error the policy reduced relative to ``old`` gets a positive
    implicit reward. ``v_old`` and ``v_target`` are constants (detached); the gradient flows
    through ``v_θ`` only, and ``w_θ`` is a stop-gradient weight.

    Args:
        v_theta: ``(B, ...)`` policy velocity at ``(x_σ, σ, c)``.
        v_old: ``(B, ...)`` velocity of the ``old`` snapshot at the same inputs.
        v_target: ``(B, ...)`` flow-matching target ``v* = ε − x0``.
        adaptive: per-sample adaptive weighting (default) or plain squared errors.

    Returns:
        ``(B,)`` implicit rewards (float32, float64 kept), differentiable in ``v_theta``.
        Exactly 0 where ``v_theta == v_old``.
    """
    _check_same_shape(v_theta=v_theta, v_old=v_old, v_target=v_target)
    dtype = _work_dtype(v_theta)
    v_theta = v_theta.to(dtype)
    v_old = v_old.detach().to(dtype)
    v_target = v_target.detach().to(dtype)
    err_theta = v_theta - v_target
    err_old = v_old - v_target
    if adaptive:
        with torch.no_grad():
            w_theta = _per_sample_mean(err_theta.abs()).clamp_min(WEIGHT_MIN)
            w_old = _per_sample_mean(err_old.abs()).clamp_min(WEIGHT_MIN)
    else:
        w_theta = w_old = torch.ones(v_theta.shape[0], dtype=dtype, device=v_theta.device)
    return -(_per_sample_mean(err_theta**2) / w_theta - _per_sample_mean(err_old**2) / w_old)


# --------------------------------------------------------------------------- losses


def crd_loss(
    implicit_reward: Tensor,
    reward01: Tensor,
    group_ids: Tensor | Sequence[int],
    beta: float,
    *,
    centering: Literal["group", "batch"] = "group",
    form: Literal["mse", "bce"] = "mse",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Centred reward-matching loss of CRD (policy term only; the update adds the KL anchor).

    Centring (``centering="group"``, the paper's; ``g`` = the sample's prompt group)::

        R_i = r01_i − mean_{j∈g} r01_j
        R̂_i = r̂_i − sg(mean_{j∈g} r̂_j)

    ``centering="batch"`` takes both means over the whole micro-batch instead (the public
    port's choice). Because the mean of ``r̂`` is a stop-gradient, each sample's gradient
    comes only from its own, non-centred ``r̂_i``.

    ``form="mse"`` (default)::

        L = (5/β) · mean_i (β·R̂_i − R_i)²

    ``form="bce"``: binary cross-entropy with logits ``β·R̂_i`` and *soft* targets ``σ(R_i)``,
    averaged over the batch, with no further scale::

        L = mean_i [ softplus(β·R̂_i) − σ(R_i)·β·R̂_i ]
          = mean_i BCE_with_logits(β·R̂_i, σ(R_i))

    Its minimiser is the same (``β·R̂ = R``) but its minimum is the mean entropy of the targets,
    not 0, and near the optimum its gradient in ``R̂`` is ``β·(σ(βR̂) − σ(R)) ≈ β/4·(βR̂ − R)``
    per sample, about ``β/40`` of the mse form's ``10·(βR̂ − R)``: retune the learning rate.

    Args:
        implicit_reward: ``(B,)`` ``r̂_θ`` from :func:`crd_implicit_reward` (with gradient).
        reward01: ``(B,)`` rewards in ``[0, 1]`` (:func:`rewards_to_unit`), constants.
        group_ids: ``(B,)`` prompt-group id of each sample (any integers).
        beta: KL strength ``β > 0`` of the target ``p* ∝ p_ref·exp(r/β)`` [1].
        centering: ``"group"`` or ``"batch"``.
        form: ``"mse"`` or ``"bce"``.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached 0-dim metrics ``loss``,
        ``implicit_reward_mean`` (of the raw ``r̂``), ``implicit_reward_std`` (of ``R̂``) and
        ``reward_corr`` (Pearson correlation of ``R̂`` and ``R``; 0 when either is constant).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the loss divides by it); got {beta}")
    if centering not in ("group", "batch"):
        raise ValueError(f"centering must be 'group' or 'batch'; got {centering!r}")
    if form not in ("mse", "bce"):
        raise ValueError(f"form must be 'mse' or 'bce'; got {form!r}")
    _check_1d(implicit_reward, "implicit_reward")
    batch = implicit_reward.shape[0]
    reward01 = torch.as_tensor(reward01, device=implicit_reward.device)
    _check_1d(reward01, "reward01", batch)
    dtype = _work_dtype(implicit_reward)
    r_hat = implicit_reward.to(dtype)
    r01 = reward01.detach().to(dtype)

    if centering == "group":
        inverse, num_groups = _group_index(r01, group_ids)
        R = r01 - _group_mean(r01, inverse, num_groups)
        R_hat = r_hat - _group_mean(r_hat.detach(), inverse, num_groups)
    else:
        if len(group_ids) != batch:
            raise ValueError(f"group_ids must have one id per sample: got {len(group_ids)} for {batch}")
        R = r01 - r01.mean()
        R_hat = r_hat - r_hat.detach().mean()

    logits = beta * R_hat
    if form == "mse":
        loss = (5.0 / beta) * ((logits - R) ** 2).mean()
    else:
        loss = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(R))

    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "implicit_reward_mean": r_hat.detach().mean(),
            "implicit_reward_std": R_hat.detach().std(correction=0),
            "reward_corr": _pearson(R_hat.detach(), R),
        }
    return loss, metrics


def reward_adaptive_kl(
    v_theta: Tensor, v_ref_cfg: Tensor, reward01: Tensor, beta_kl: float, beta_min: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-adaptive KL anchor to the CFG-guided base model (CRD's (ii) + (iii)).

    ::

        KL_i = per-sample mean ‖v_θ − v_ref^cfg‖²,   v_ref^cfg = v_ref,u + w·(v_ref,c − v_ref,u)
        c_i  = m + r01_i·(1 − m),                    m = β_min / β_KL
        L    = β_KL · mean_i(c_i · KL_i)

    The per-sample coefficient ``β_KL·c_i = β_min + r01_i·(β_KL − β_min)`` runs from ``β_min``
    (reward 0) to ``β_KL`` (reward 1): weak anchoring early, when rewards are low, strong
    anchoring late, when high rewards invite reward-model exploitation. ``beta_min == beta_kl``
    gives the constant-KL ablation ``β_KL·mean(KL_i)``; ``beta_kl == 0`` gives a zero loss.

    Args:
        v_theta: ``(B, ...)`` policy velocity (with gradient).
        v_ref_cfg: ``(B, ...)`` CFG-guided base velocity (adapters off), a constant.
        reward01: ``(B,)`` rewards in ``[0, 1]``, constants.
        beta_kl: ``β_KL ≥ 0`` [0.1].
        beta_min: ``0 ≤ β_min ≤ β_KL`` [1e-4].

    Returns:
        ``(loss, metrics)``; detached metrics ``loss``, ``kl_mean`` (mean ``KL_i``) and
        ``kl_coef_mean`` (mean ``β_KL·c_i``).
    """
    if beta_kl < 0 or beta_min < 0 or beta_min > beta_kl:
        raise ValueError(f"need 0 <= beta_min <= beta_kl; got beta_min={beta_min}, beta_kl={beta_kl}")
    _check_same_shape(v_theta=v_theta, v_ref_cfg=v_ref_cfg)
    batch = v_theta.shape[0]
    reward01 = torch.as_tensor(reward01, device=v_theta.device)
    _check_1d(reward01, "reward01", batch)
    dtype = _work_dtype(v_theta)
    kl = _per_sample_mean((v_theta.to(dtype) - v_ref_cfg.detach().to(dtype)) ** 2)
    m = beta_min / beta_kl if beta_kl > 0 else 1.0
    coef = m + reward01.detach().to(dtype) * (1.0 - m)
    loss = beta_kl * (coef * kl).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "kl_mean": kl.detach().mean(),
            "kl_coef_mean": (beta_kl * coef).mean(),
        }
    return loss, metrics


# --------------------------------------------------------------------------- snapshot decay


@dataclass(frozen=True)
class DecaySchedule:
    """EMA decay of a snapshot as a pure function of the training step.

    ::

        d(step) = 0                                             if step < start_step
        d(step) = clamp(start + slope·(step − start_step), 0, maximum)   otherwise

    The snapshot update is ``snap ← d·snap + (1 − d)·θ``: ``d = 0`` copies the policy,
    ``d = 1`` freezes the snapshot.
    """

    start: float
    """Decay at ``start_step``, in ``[0, 1]``."""
    slope: float
    """Change of the decay per step."""
    start_step: int = 0
    """Steps before this one have decay 0 (snapshot = policy)."""
    maximum: float = 0.999
    """Cap of the decay, in ``[0, 1]``."""

    def __post_init__(self) -> None:
        values = (self.start, self.slope, self.maximum)
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"decay schedule values must be finite; got {self}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.maximum <= 1.0):
            raise ConfigError(f"decay start and maximum must lie in [0, 1]; got {self}")
        if self.start_step < 0:
            raise ConfigError(f"decay start_step must be >= 0; got {self.start_step}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        if step < self.start_step:
            return 0.0
        return min(max(self.start + self.slope * (step - self.start_step), 0.0), self.maximum)


CRD_OLD = DecaySchedule(start=0.25, slope=0.005, start_step=0, maximum=0.999)
CRD_SAMPLER = DecaySchedule(start=0.0, slope=0.0075, start_step=75, maximum=0.999)
NFT_OLD = DecaySchedule(start=0.0, slope=0.001, start_step=0, maximum=0.5)

DECAY_PRESETS: dict[str, DecaySchedule] = {"crd_old": CRD_OLD, "crd_sampler": CRD_SAMPLER, "nft": NFT_OLD}

_DECAY_GRAMMAR = (
    "valid decay schedules: a preset name ('crd_old' = min(0.25 + 0.005·step, 0.999); "
    "'crd_sampler' = 0 before step 75, then min(0.0075·(step − 75), 0.999); "
    "'nft' = min(0.001·step, 0.5)), 'constant:D' with D in [0, 1] (e.g. 'constant:0.9'), or "
    "'linear:START,SLOPE,START_STEP,MAX' meaning 0 before START_STEP, then "
    "min(START + SLOPE·(step − START_STEP), MAX) (e.g. 'linear:0.25,0.005,0,0.999')"
)


def old_decay(step: int) -> float:
    """CRD's ``old``-snapshot decay ``min(0.25 + 0.005·step, 0.999)``."""
    return CRD_OLD(step)


def sampler_decay(step: int) -> float:
    """CRD's ``sampler``-snapshot decay: 0 before step 75, then ``min(0.0075·(step − 75), 0.999)``."""
    return CRD_SAMPLER(step)


def make_decay_schedule(spec: str) -> Callable[[int], float]:
    """Parse a decay-schedule spec into a :class:`DecaySchedule` (a callable ``step → decay``).

    Grammar (whitespace and case are ignored)::

        crd_old                          min(0.25 + 0.005·step, 0.999)           (CRD, old)
        crd_sampler                      0 if step < 75 else min(0.0075·(step−75), 0.999)
                                                                                 (CRD, sampler)
        nft                              min(0.001·step, 0.5)
        constant:D                       D, with 0 ≤ D ≤ 1
        linear:START,SLOPE,START_STEP,MAX
                                         0 if step < START_STEP
                                         else clamp(START + SLOPE·(step − START_STEP), 0, MAX)

    ``nft`` is DiffusionNFT's ``decay_type = 1``, the default of its public training configs
    (``return_decay``: ``flat = 0, uprate = 0.001, uphold = 0.5``); ``crd_sampler`` equals its
    ``decay_type = 2``. ``START_STEP`` is a non-negative integer; ``START`` and ``MAX`` lie in
    ``[0, 1]``.

    Raises:
        ConfigError: for anything else, listing the valid forms.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"decay schedule must be a string; got {spec!r}. {_DECAY_GRAMMAR}")
    text = "".join(spec.split()).lower()
    if text in DECAY_PRESETS:
        return DECAY_PRESETS[text]
    kind, sep, args = text.partition(":")
    if not sep or kind not in ("constant", "linear"):
        raise ConfigError(f"unknown decay schedule {spec!r}; {_DECAY_GRAMMAR}")
    try:
        values = [float(v) for v in args.split(",")]
    except ValueError:
        raise ConfigError(f"decay schedule {spec!r} has a non-numeric value; {_DECAY_GRAMMAR}") from None
    try:
        if kind == "constant":
            if len(values) != 1:
                raise ConfigError(f"'constant:' takes one value; got {spec!r}. {_DECAY_GRAMMAR}")
            return DecaySchedule(start=values[0], slope=0.0, start_step=0, maximum=values[0])
        if len(values) != 4:
            raise ConfigError(f"'linear:' takes four values; got {spec!r}. {_DECAY_GRAMMAR}")
        start, slope, start_step, maximum = values
        if not start_step.is_integer():
            raise ConfigError(f"START_STEP must be an integer; got {spec!r}. {_DECAY_GRAMMAR}")
        return DecaySchedule(start=start, slope=slope, start_step=int(start_step), maximum=maximum)
    except ConfigError as err:
        if _DECAY_GRAMMAR in str(err):
            raise
        raise ConfigError(f"invalid decay schedule {spec!r}: {err}. {_DECAY_GRAMMAR}") from None
