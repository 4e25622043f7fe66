"""Per-sample reductions, adaptive weights and input checks shared by the forward-process losses.

CRD (:mod:`~diffalign.algorithms.crd`) and DiffusionNFT (:mod:`~diffalign.algorithms.nft`)
both reduce squared errors to one value per sample and divide them by a stop-gradient
*adaptive weight* (DiffusionNFT's ``clip(min=0.00001)`` normalisation)::

    w   = sg(per-sample mean |err|) clamped ≥ 1e-5
    e_i = per-sample mean (err²) / w

"Per-sample mean" is the mean over all non-batch dimensions (ALGORITHMS.md's notation).
All functions are pure.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "WEIGHT_MIN",
    "adaptive_weight",
    "check_1d",
    "check_same_shape",
    "pearson",
    "per_sample_mean",
    "weighted_sq_error",
    "work_dtype",
]

WEIGHT_MIN = 1e-5
"""Lower clamp of the adaptive weights ``w`` (DiffusionNFT's ``clip(min=0.00001)``)."""


def work_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bf16/int inputs, float64 kept (so tests can check exact values)."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def per_sample_mean(t: Tensor) -> Tensor:
    """Mean over all non-batch dimensions, shape ``(B,)``."""
    return t.reshape(t.shape[0], -1).mean(dim=1)


def adaptive_weight(err: Tensor) -> Tensor:
    """``w = sg(per-sample mean |err|)`` clamped ≥ :data:`WEIGHT_MIN`, shape ``(B,)``, no gradient."""
    with torch.no_grad():
        return per_sample_mean(err.abs()).clamp_min(WEIGHT_MIN)


def weighted_sq_error(err: Tensor, weight: Tensor) -> Tensor:
    """``per-sample mean (err²) / weight``, shape ``(B,)``; differentiable in ``err``."""
    return per_sample_mean(err**2) / weight


def check_same_shape(**tensors: Tensor) -> None:
    """Raise ``ValueError`` unless all ``tensors`` share one shape with a batch dimension."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one shape; got {shapes}")
    if next(iter(shapes.values())) == ():
        raise ValueError(f"tensors need a batch dimension; got 0-dim {list(shapes)}")


def check_1d(t: Tensor, name: str, batch: int | None = None) -> None:
    """Raise ``ValueError`` unless ``t`` is ``(B,)`` (``(batch,)`` when ``batch`` is given)."""
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        want = "(B,)" if batch is None else f"({batch},)"
        raise ValueError(f"{name} must have shape {want} (one value per sample); got {tuple(t.shape)}")


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of two ``(B,)`` tensors; 0 where either is constant (no host sync)."""
    a = a - a.mean()
    b = b - b.mean()
    denom = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return torch.where(denom > 0, (a * b).sum() / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0)
