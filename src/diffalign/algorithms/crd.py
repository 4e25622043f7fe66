"""CRD — Centered Reward Distillation: implicit reward, centred reward matching, adaptive KL.

KL-regularised reward maximisation has the optimum ``p* ∝ p_ref·exp(r/β)``, so
``β·log(p_θ/p_ref)(x|c) = r(x, c) − β·log Z(c)``. ``Z(c)`` is unknown but shared by every image
of prompt ``c``: centring both sides within the prompt's group cancels it and leaves a
reward-matching regression. See ALGORITHMS.md §3 and ``seeds/crd-abstract.md``.

The loss reads top to bottom as the paper's equation: :func:`crd_implicit_reward` (``r̂_θ``),
:func:`center_within_groups` (``R``, ``R̂``), :func:`reward_matching_loss` (``L_CRD``), and the
KL anchor :func:`reward_adaptive_kl` (:func:`velocity_kl` weighted by :func:`kl_coefficients`).
Also here: the advantage → ``[0, 1]`` map shared with DiffusionNFT. The snapshot decay schedules
live in :mod:`~diffalign.algorithms.decay` and are re-exported from here.

All losses are pure: tensors in, ``(loss, metrics)`` out, metrics detached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.algorithms.decay import (  # re-exported: the decay schedules lived here
    CRD_OLD,
    CRD_SAMPLER,
    DECAY_PRESETS,
    NFT_OLD,
    DecaySchedule,
    make_decay_schedule,
    old_decay,
    sampler_decay,
)
from diffalign.algorithms.grpo import _group_index, _group_mean
from diffalign.algorithms.per_sample import (
    WEIGHT_MIN,
    adaptive_weight,
    check_1d,
    check_same_shape,
    pearson,
    per_sample_mean,
    weighted_sq_error,
    work_dtype,
)

__all__ = [
    "CRD_OLD",
    "CRD_SAMPLER",
    "DECAY_PRESETS",
    "NFT_OLD",
    "WEIGHT_MIN",
    "DecaySchedule",
    "center_within_groups",
    "crd_implicit_reward",
    "crd_loss",
    "kl_coefficients",
    "make_decay_schedule",
    "old_decay",
    "reward_adaptive_kl",
    "reward_matching_loss",
    "rewards_to_unit",
    "sampler_decay",
    "velocity_kl",
]


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
    a = a.to(work_dtype(a))
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
    check_same_shape(v_theta=v_theta, v_old=v_old, v_target=v_target)
    dtype = work_dtype(v_theta)
    v_theta = v_theta.to(dtype)
    v_old = v_old.detach().to(dtype)
    v_target = v_target.detach().to(dtype)
    err_theta = v_theta - v_target
    err_old = v_old - v_target
    if adaptive:
        w_theta, w_old = adaptive_weight(err_theta), adaptive_weight(err_old)
    else:
        w_theta = w_old = torch.ones(v_theta.shape[0], dtype=dtype, device=v_theta.device)
    return -(weighted_sq_error(err_theta, w_theta) - weighted_sq_error(err_old, w_old))


# --------------------------------------------------------------------------- losses


def center_within_groups(
    reward01: Tensor, implicit_reward: Tensor, group_ids: Tensor | Sequence[int], centering: str
) -> tuple[Tensor, Tensor]:
    """Centred rewards ``R`` and centred implicit rewards ``R̂`` (``log Z(c)`` cancels).

    ::

        R_i = r01_i − mean_{j∈g} r01_j
        R̂_i = r̂_i − sg(mean_{j∈g} r̂_j)

    ``g`` is the sample's prompt group (``centering="group"``, the paper's) or the whole
    micro-batch (``"batch"``, the public port's). Because the mean of ``r̂`` is a stop-gradient,
    each sample's gradient comes only from its own, non-centred ``r̂_i``.

    Returns:
        ``(R, R̂)``, both ``(B,)``; ``R̂`` is differentiable in ``implicit_reward``.
    """
    if centering == "group":
        inverse, num_groups = _group_index(reward01, group_ids)
        R = reward01 - _group_mean(reward01, inverse, num_groups)
        R_hat = implicit_reward - _group_mean(implicit_reward.detach(), inverse, num_groups)
        return R, R_hat
    batch = implicit_reward.shape[0]
    if len(group_ids) != batch:
        raise ValueError(f"group_ids must have one id per sample: got {len(group_ids)} for {batch}")
    return reward01 - reward01.mean(), implicit_reward - implicit_reward.detach().mean()


def reward_matching_loss(R: Tensor, R_hat: Tensor, beta: float, form: str) -> Tensor:
    """Regression of ``β·R̂`` onto ``R``.

    ``form="mse"``: ``L = (5/β) · mean_i (β·R̂_i − R_i)²``.

    ``form="bce"``: binary cross-entropy with logits ``β·R̂_i`` and *soft* targets ``σ(R_i)``,
    averaged over the batch, with no further scale::

        L = mean_i [ softplus(β·R̂_i) − σ(R_i)·β·R̂_i ] = mean_i BCE_with_logits(β·R̂_i, σ(R_i))

    Its minimiser is the same (``β·R̂ = R``) but its minimum is the mean entropy of the targets,
    not 0, and near the optimum its gradient in ``R̂`` is ``β·(σ(βR̂) − σ(R)) ≈ β/4·(βR̂ − R)``
    per sample, about ``β/40`` of the mse form's ``10·(βR̂ − R)``: retune the learning rate.
    """
    logits = beta * R_hat
    if form == "mse":
        return (5.0 / beta) * ((logits - R) ** 2).mean()
    return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(R))


def _check_crd_options(beta: float, centering: str, form: str) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the loss divides by it); got {beta}")
    if centering not in ("group", "batch"):
        raise ValueError(f"centering must be 'group' or 'batch'; got {centering!r}")
    if form not in ("mse", "bce"):
        raise ValueError(f"form must be 'mse' or 'bce'; got {form!r}")


@torch.no_grad()
def _crd_metrics(loss: Tensor, r_hat: Tensor, R: Tensor, R_hat: Tensor) -> dict[str, Tensor]:
    return {
        "loss": loss.detach(),
        "implicit_reward_mean": r_hat.detach().mean(),
        "implicit_reward_std": R_hat.detach().std(correction=0),
        "reward_corr": pearson(R_hat.detach(), R),
    }


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

    ::

        R_i = r01_i − mean_{j∈g} r01_j                 (g: the sample's prompt group)
        R̂_i = r̂_i − sg(mean_{j∈g} r̂_j)
        L   = (5/β) · mean_i (β·R̂_i − R_i)²             form="mse" (default)
        L   = mean_i BCE_with_logits(β·R̂_i, σ(R_i))    form="bce"

    :func:`center_within_groups` computes ``R`` and ``R̂`` (``centering="batch"``: means over
    the whole micro-batch, the public port's choice); :func:`reward_matching_loss` the
    regression (see it for how the bce form's scale differs from the mse form's).

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
    _check_crd_options(beta, centering, form)
    check_1d(implicit_reward, "implicit_reward")
    reward01 = torch.as_tensor(reward01, device=implicit_reward.device)
    check_1d(reward01, "reward01", implicit_reward.shape[0])
    dtype = work_dtype(implicit_reward)
    r_hat = implicit_reward.to(dtype)
    R, R_hat = center_within_groups(reward01.detach().to(dtype), r_hat, group_ids, centering)
    loss = reward_matching_loss(R, R_hat, beta, form)
    return loss, _crd_metrics(loss, r_hat, R, R_hat)


# --------------------------------------------------------------------------- KL anchor


def velocity_kl(v_theta: Tensor, v_ref: Tensor) -> Tensor:
    """``KL_i = per-sample mean ‖v_θ − v_ref‖²``, shape ``(B,)``; ``v_ref`` is a constant."""
    dtype = work_dtype(v_theta)
    return per_sample_mean((v_theta.to(dtype) - v_ref.detach().to(dtype)) ** 2)


def kl_coefficients(reward01: Tensor, beta_kl: float, beta_min: float, dtype: torch.dtype) -> Tensor:
    """Reward-adaptive KL weights ``c_i = m + r01_i·(1 − m)``, ``m = β_min/β_KL`` (``m = 1`` if ``β_KL = 0``)."""
    m = beta_min / beta_kl if beta_kl > 0 else 1.0
    return m + reward01.detach().to(dtype) * (1.0 - m)


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
    check_same_shape(v_theta=v_theta, v_ref_cfg=v_ref_cfg)
    reward01 = torch.as_tensor(reward01, device=v_theta.device)
    check_1d(reward01, "reward01", v_theta.shape[0])
    kl = velocity_kl(v_theta, v_ref_cfg)
    coef = kl_coefficients(reward01, beta_kl, beta_min, kl.dtype)
    loss = beta_kl * (coef * kl).mean()
    with torch.no_grad():
        metrics = {"loss": loss.detach(), "kl_mean": kl.detach().mean(), "kl_coef_mean": (beta_kl * coef).mean()}
    return loss, metrics
