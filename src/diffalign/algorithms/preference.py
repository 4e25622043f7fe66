"""Preference-family losses (Diffusion-DPO, SFT on winners, SePPO). ALGORITHMS.md §4.

Every loss works on per-sample prediction errors ``(B,)`` measured under one shared
``(t, ε)`` draw for the policy and the reference::

    flow models:  err(x) = mean (v̂ − v*)²     (v* = ε − x0)
    ε-models:     err(x) = mean (ε̂ − ε)²
    Δ_x = err_θ(x) − err_ref(x)

A negative ``Δ_x`` means the policy explains ``x`` better than the reference does, i.e. it
gives ``x`` a higher implicit reward ``r(x) = −β/2·Δ_x``.

All functions are pure: tensors in, ``(loss, metrics)`` out; metrics are detached 0-dim
tensors (no host sync). Reference errors are treated as constants (detached here; callers
compute them under ``no_grad`` anyway). Losses are means over the batch. Math runs in at
least float32 (bf16/fp16 inputs are upcast, float64 is kept).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.errors import ConfigError

__all__ = [
    "SEPPO_FLIPPERS",
    "diffusion_dpo_loss",
    "epsilon_error",
    "flow_matching_error",
    "seppo_flip",
    "seppo_loss",
    "sft_loss",
]

Flipper = Literal["sign", "indicator", "off"]
SEPPO_FLIPPERS: tuple[str, ...] = ("sign", "indicator", "off")


def _upcast(t: Tensor) -> Tensor:
    """``t`` in at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_sample_sq_error(pred: Tensor, target: Tensor, names: tuple[str, str]) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.dim() == 0:
        raise ValueError(f"{names[0]} must have a batch dimension; got a 0-dim tensor")
    sq = (_upcast(pred) - _upcast(target)) ** 2
    return sq.reshape(sq.shape[0], -1).mean(dim=1)


def flow_matching_error(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """Per-sample flow-matching error ``err = mean (v̂ − v*)²`` over all non-batch dims.

    Args:
        v_pred: ``(B, ...)`` predicted velocity (policy or reference).
        v_target: ``(B, ...)`` target velocity ``v* = ε − x0`` (SD3 convention).

    Returns:
        ``(B,)`` in at least float32; carries ``v_pred``'s gradient.
    """
    return _per_sample_sq_error(v_pred, v_target, ("v_pred", "v_target"))


def epsilon_error(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Per-sample denoising error ``err = mean (ε̂ − ε)²`` over all non-batch dims (ε-models).

    Args:
        eps_pred: ``(B, ...)`` predicted noise.
        eps: ``(B, ...)`` the noise that was added.

    Returns:
        ``(B,)`` in at least float32; carries ``eps_pred``'s gradient.
    """
    return _per_sample_sq_error(eps_pred, eps, ("eps_pred", "eps"))


def _check_errors(**errs: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in errs.items()}
    first = next(iter(errs.values()))
    if first.dim() != 1 or first.numel() == 0:
        raise ValueError(f"per-sample errors must be non-empty 1-D tensors (B,); got shapes {shapes}")
    if any(t.shape != first.shape for t in errs.values()):
        raise ValueError(f"per-sample errors must all have the same shape (B,); got shapes {shapes}")


def _check_beta(beta: float) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"beta must be a positive number; got {beta!r}") from exc
    if not (b > 0 and b < float("inf")):
        raise ConfigError(
            f"beta must be a positive, finite number (e.g. 5000 for SD1.5 Diffusion-DPO); got {beta}"
        )
    return b


def diffusion_dpo_loss(
    err_w: Tensor, ref_err_w: Tensor, err_l: Tensor, ref_err_l: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss (Wallace et al., 2023)::

        Δ_w = err_θ(x_w) − err_ref(x_w),   Δ_l = err_θ(x_l) − err_ref(x_l)
        L   = mean −log σ(−β/2 · (Δ_w − Δ_l))

    The ½ is not in the paper's equation (which folds constants into ``β·T·ω(λ_t)``); it
    follows the original Diffusion-DPO training code (``inside_term = -0.5 * beta * (...)``),
    so published β values (5000 for SD1.5) carry over unchanged.

    Args:
        err_w, ref_err_w: ``(B,)`` policy and reference errors on the winners.
        err_l, ref_err_l: ``(B,)`` policy and reference errors on the losers, under the same
            ``(t, ε)`` as the policy's. Reference errors are detached here.
        beta: ``β > 0``.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached metrics ``accuracy`` (fraction of pairs with
        ``Δ_w < Δ_l``, i.e. implicit reward of the winner strictly higher), ``delta_w`` and
        ``delta_l`` (means of ``Δ_w``, ``Δ_l``), ``reward_margin`` (mean of the logit
        ``−β/2·(Δ_w − Δ_l)``, the implicit reward margin ``r_w − r_l`` with ``r = −β/2·Δ``).
    """
    _check_errors(err_w=err_w, ref_err_w=ref_err_w, err_l=err_l, ref_err_l=ref_err_l)
    b = _check_beta(beta)
    delta_w = _upcast(err_w) - _upcast(ref_err_w.detach())
    delta_l = _upcast(err_l) - _upcast(ref_err_l.detach())
    logit = -0.5 * b * (delta_w - delta_l)
    loss = -F.logsigmoid(logit).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (delta_w < delta_l).float().mean(),
            "delta_w": delta_w.mean(),
            "delta_l": delta_l.mean(),
            "reward_margin": logit.mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def seppo_flip(err_w: Tensor, ref_err_w: Tensor, flipper: Flipper = "sign") -> Tensor:
    """SePPO's anchor-based adaptive flipper ``s`` per pair, ``(B,)``, without gradient.

    The winner is the anchor: ``s = sign(err_ref(x_w) − err_θ(x_w))``.

    - ``sign``: ``s ∈ {−1, +1}``; ``−1`` where the reference explains the winner strictly
      better (``err_ref(x_w) < err_θ(x_w)``), ``+1`` otherwise — **ties give ``+1``** (the
      reference sample stays a loser; at the first step, policy = reference, every pair ties
      and SePPO starts as self-play DPO).
    - ``indicator``: ``s ∈ {0, 1}``; ``0`` where ``sign`` gives ``−1``, else ``1``.
    - ``off``: ``s = +1`` everywhere.
    """
    if flipper not in SEPPO_FLIPPERS:
        raise ConfigError(f"unknown SePPO flipper {flipper!r}; choose one of {', '.join(SEPPO_FLIPPERS)}")
    with torch.no_grad():
        ew = _upcast(err_w.detach())
        ref_better = _upcast(ref_err_w.detach()) < ew
        one = torch.ones_like(ew)
        if flipper == "sign":
            return torch.where(ref_better, -one, one)
        if flipper == "indicator":
            return torch.where(ref_better, torch.zeros_like(ew), one)
        return one


def seppo_loss(
    err_w: Tensor,
    ref_err_w: Tensor,
    err_s: Tensor,
    ref_err_s: Tensor,
    beta: float,
    flipper: Flipper = "sign",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SePPO loss with the anchor-based adaptive flipper (AAF), winner as the anchor::

        Δ_w = err_θ(x_w) − err_ref(x_w),   Δ_s = err_θ(x_s) − err_ref(x_s)
        s   = sg(sign(err_ref(x_w) − err_θ(x_w)))
        L   = mean −log σ(−β/2 · (Δ_w − s·Δ_s))

    ``x_s ~ π_ref(·|c)`` is the reference sample that replaces the loser. Where the reference
    explains the winner better than the policy (``s = −1``) the reference sample is probably
    good and is learned as a second winner; otherwise (``s = +1``) it is the loser. ``s`` is a
    constant for autograd. See :func:`seppo_flip` for the three ``flipper`` modes and the
    tie rule (a tie gives ``s = +1``). With ``indicator`` a pair with ``s = 0`` contributes
    ``−log σ(−β/2·Δ_w)`` (SFT-like on the winner); with ``off`` the loss is exactly
    :func:`diffusion_dpo_loss` with the reference sample as the loser (self-play DPO). The ½
    follows the Diffusion-DPO code, as in :func:`diffusion_dpo_loss`.

    Args:
        err_w, ref_err_w: ``(B,)`` policy and reference errors on the (off-policy) winners.
        err_s, ref_err_s: ``(B,)`` policy and reference errors on the reference samples, under
            the same ``(t, ε)`` as the policy's. Reference errors are detached here.
        beta: ``β > 0``.
        flipper: ``"sign"`` (the paper's AAF), ``"indicator"`` or ``"off"``.

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached metrics:
        ``flip_fraction`` — the fraction of flipped pairs, i.e. pairs whose reference sample
        was *not* treated as a loser (``s ≠ +1``: ``s = −1`` for ``sign``, ``s = 0`` for
        ``indicator``; always 0 for ``off``);
        ``ref_better_fraction`` — fraction of pairs with ``err_ref(x_w) < err_θ(x_w)`` (the AAF
        criterion, reported whatever the flipper, so ``off`` runs can be compared);
        ``accuracy`` (fraction with ``Δ_w < Δ_s``), ``delta_w``, ``delta_s`` (means) and
        ``reward_margin`` (mean of the logit ``−β/2·(Δ_w − s·Δ_s)``).
    """
    _check_errors(err_w=err_w, ref_err_w=ref_err_w, err_s=err_s, ref_err_s=ref_err_s)
    b = _check_beta(beta)
    s = seppo_flip(err_w, ref_err_w, flipper)
    delta_w = _upcast(err_w) - _upcast(ref_err_w.detach())
    delta_s = _upcast(err_s) - _upcast(ref_err_s.detach())
    logit = -0.5 * b * (delta_w - s * delta_s)
    loss = -F.logsigmoid(logit).mean()
    with torch.no_grad():
        metrics = {
            "flip_fraction": (s != 1).float().mean(),
            "ref_better_fraction": (_upcast(ref_err_w.detach()) < _upcast(err_w.detach())).float().mean(),
            "accuracy": (delta_w < delta_s).float().mean(),
            "delta_w": delta_w.mean(),
            "delta_s": delta_s.mean(),
            "reward_margin": logit.mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def sft_loss(err_w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """SFT on winners: the plain flow-matching / denoising loss ``L = mean_i err_θ(x_w,i)``.

    Args:
        err_w: ``(B,)`` per-sample policy errors on the winners (see
            :func:`flow_matching_error`, :func:`epsilon_error`).

    Returns:
        ``(loss, metrics)`` with ``err_w`` (the detached loss value) and ``err_w_max``.
    """
    _check_errors(err_w=err_w)
    e = _upcast(err_w)
    loss = e.mean()
    with torch.no_grad():
        metrics = {"err_w": loss.detach().clone(), "err_w_max": e.max()}
    return loss, {k: v.detach() for k, v in metrics.items()}
