"""Low-level hallucination metrics on images (after ConsistentRFT's evaluator).

ShapesWorld renders flat-colour shapes with hard edges on a plain white background, so
every bit of texture, noise, high-frequency energy or edge ringing in a generated image is
over-optimised detail: a *low-level* hallucination. The four metrics below measure it on
the grayscale luma image, per image, batched, in pure torch:

============== ================================================================================
name           definition (``g`` = luma ``0.299 R + 0.587 G + 0.114 B`` of an image in [0, 1])
============== ================================================================================
laplacian_var  ``Var(L * g)`` with the 4-neighbour 3×3 Laplacian ``L = [[0,1,0],[1,-4,1],[0,1,0]]``
highpass       ``mean |g - G_1 * g|`` with ``G_1`` a Gaussian blur, sigma 1 px (7 taps)
edge_spread    mean, over the edge band, of the 3×3 local standard deviation of ``g``; the edge
               band is the 3×3 dilation of the pixels where the Sobel gradient magnitude of
               ``G_1 * g`` (scaled by 1/4) exceeds ``EDGE_THRESHOLD`` = 0.05
flat_noise     mean ``|g - B_3 * g|`` (``B_3`` the 3×3 box blur) over the ``fraction`` of pixels
               with the lowest 5×5 local variance of ``g``
============== ================================================================================

All filters use replicate padding, so every image pixel has a response and statistics are
taken over exactly the ``H × W`` image pixels (never over padding). A renderer image has
``flat_noise ≈ 0`` and moderate values of the other three (its hard edges). Noise and texture
raise all four; ringing (over-sharpened halos) raises ``edge_spread`` and ``laplacian_var``;
blur lowers ``laplacian_var``, ``highpass`` and ``edge_spread``. Compare a model's images with
the renderer's own through :func:`relative_to`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.errors import DiffalignError

__all__ = [
    "EDGE_THRESHOLD",
    "ImageInputError",
    "edge_spread",
    "flat_region_noise",
    "highpass_energy",
    "laplacian_variance",
    "low_level_metrics",
    "relative_to",
    "summarize",
    "to_gray",
]

EDGE_THRESHOLD = 0.05
"""Edge threshold of :func:`edge_spread`, on ``¼·|Sobel|`` of the sigma-1 Gaussian-smoothed luma
(gray units). Unsmoothed, ``¼·|Sobel|`` reads exactly ``h`` beside a hard step of height ``h``;
after the smoothing the peak reads ``≈ 0.64 h``, so steps of luma contrast above ``≈ 0.08`` are
edges: every ShapesWorld palette colour on white (the palest, pure yellow, differs by 0.114 and
reads ≈ 0.075). The smoothing (as in Canny) keeps pixel noise from being taken for edges:
i.i.d. noise of std 0.05 per channel on a flat region peaks at ≈ 0.045 on a 32×32 image."""

_LUMA = (0.299, 0.587, 0.114)
_RANGE_TOL = 1e-3


class ImageInputError(DiffalignError, ValueError):
    """Images that are not float tensors of shape (B, 3, H, W) with values in [0, 1]."""


def _check_images(images: Tensor) -> Tensor:
    """Validate ``images`` (B, 3, H, W) in [0, 1] and return them as a float tensor clamped to [0, 1]."""
    if not isinstance(images, Tensor):
        raise ImageInputError(
            f"images must be a torch.Tensor of shape (B, 3, H, W) in [0, 1]; got {type(images).__name__}. "
            "Convert with torch.as_tensor(...)."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        if images.ndim == 3:
            hint = "add a batch dimension with images.unsqueeze(0)"
        elif images.ndim == 4 and images.shape[-1] == 3:
            hint = "move channels to dim 1 with images.permute(0, 3, 1, 2)"
        else:
            hint = "pass RGB images of shape (B, 3, H, W)"
        raise ImageInputError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}: {hint}.")
    if not images.is_floating_point():
        raise ImageInputError(
            f"images must be a floating-point tensor in [0, 1]; got dtype {images.dtype}. "
            "Convert 8-bit images with images.float() / 255."
        )
    if images.numel() > 0:
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            if not (math.isfinite(lo) and math.isfinite(hi)):
                fix = "remove NaN/inf values"
            elif lo < -_RANGE_TOL:
                fix = "map [-1, 1] images with (images + 1) / 2"
            else:
                fix = "divide 0-255 images by 255"
            raise ImageInputError(
                f"images must lie in [0, 1] (tolerance {_RANGE_TOL}); got values in [{lo:.4g}, {hi:.4g}]: {fix}."
            )
    images = images if images.dtype in (torch.float32, torch.float64) else images.float()
    return images.clamp(0.0, 1.0)


def to_gray(images: Tensor) -> Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` of validated images (B, 3, H, W) -> (B, 1, H, W)."""
    images = _check_images(images)
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _filter(gray: Tensor, kernel: Tensor) -> Tensor:
    """Correlate (B, 1, H, W) with a 2-D odd-sized kernel, replicate padding -> (B, 1, H, W)."""
    kh, kw = kernel.shape
    padded = F.pad(gray, (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    return F.conv2d(padded, kernel.to(gray).view(1, 1, kh, kw))


def _gaussian_blur(gray: Tensor, sigma: float = 1.0) -> Tensor:
    """Separable Gaussian blur with radius ``ceil(3 sigma)``, normalised taps, replicate padding."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=gray.dtype, device=gray.device)
    taps = torch.exp(-(x**2) / (2 * sigma**2))
    taps = taps / taps.sum()
    return _filter(_filter(gray, taps.view(1, -1)), taps.view(-1, 1))


def _box_blur(gray: Tensor, size: int = 3) -> Tensor:
    return _filter(gray, torch.full((size, size), 1.0 / size**2))


def _local_var(gray: Tensor, size: int) -> Tensor:
    """Population variance of ``gray`` in a ``size × size`` window (replicate padding) -> (B, H*W)."""
    r = size // 2
    padded = F.pad(gray, (r, r, r, r), mode="replicate")
    windows = F.unfold(padded, kernel_size=size)  # (B, size*size, H*W)
    return windows.var(dim=1, unbiased=False)


def laplacian_variance(images: Tensor) -> Tensor:
    """Variance of the 3×3 Laplacian of the luma image, per image.

    ``Var_p[(L * g)(p)]`` over the ``H × W`` pixels ``p`` (population variance), with
    ``L = [[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` (OpenCV's ``cv2.Laplacian`` default) and
    replicate padding. High for sharp edges, noise and texture; lowered by blur.

    Args:
        images: (B, 3, H, W) in [0, 1].

    Returns:
        (B,) Laplacian variance in gray² units.
    """
    gray = to_gray(images)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return _filter(gray, kernel).flatten(1).var(dim=1, unbiased=False)


def highpass_energy(images: Tensor, sigma: float = 1.0) -> Tensor:
    """Mean absolute high-pass response ``mean_p |g - G_sigma * g|`` per image.

    ``G_sigma`` is a Gaussian blur (sigma 1 px by default, radius ``ceil(3 sigma)``,
    replicate padding) of the luma image ``g``.

    Args:
        images: (B, 3, H, W) in [0, 1].
        sigma: Gaussian standard deviation in pixels.

    Returns:
        (B,) mean |high-pass| in gray units.
    """
    gray = to_gray(images)
    return (gray - _gaussian_blur(gray, sigma)).abs().flatten(1).mean(dim=1)


def edge_spread(images: Tensor, threshold: float = EDGE_THRESHOLD) -> Tensor:
    """Intensity spread inside dilated edges: ringing and fuzzy, over-detailed edges.

    1. Edge pixels: ``¼·sqrt(Sx² + Sy²) > threshold``, with ``Sx``, ``Sy`` the 3×3 Sobel
       responses of the Gaussian-smoothed luma ``G_1 * g`` (sigma 1 px; the smoothing keeps
       pixel noise from being taken for edges, see :data:`EDGE_THRESHOLD`).
    2. The edge band is that mask dilated by 1 px (3×3 max-pool).
    3. Result: mean over band pixels of the 3×3 local standard deviation of the *unsmoothed*
       ``g`` (population, replicate padding). An image without edge pixels gives 0.

    On a hard step of height ``h`` the local std is ``h·√2/3 ≈ 0.47 h`` on the two pixels
    beside it and 0 elsewhere in the band. Noise in the band and ringing (over-sharpened
    overshoot) raise the value; blur lowers it (it spreads the step into smaller local
    differences), so this is a measure of over-detail around edges, not of sharpness.
    Noise strong enough to create edge pixels in flat regions (gray std ≳ 0.05) pulls the
    mean towards the noise level; ``highpass`` and ``flat_noise`` carry that signal.

    Args:
        images: (B, 3, H, W) in [0, 1].
        threshold: edge threshold on ``¼·|Sobel|`` of the smoothed luma (gray units).

    Returns:
        (B,) mean local std in the edge band, in gray units.
    """
    gray = to_gray(images)
    smooth = _gaussian_blur(gray, 1.0)
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx, gy = _filter(smooth, sx), _filter(smooth, sx.T)
    magnitude = 0.25 * torch.sqrt(gx**2 + gy**2)
    edges = (magnitude > threshold).to(gray.dtype)
    band = F.max_pool2d(edges, kernel_size=3, stride=1, padding=1).flatten(1)
    var = _local_var(gray, 3)
    local_std = torch.where(var > 0, var.clamp_min(1e-30).sqrt(), torch.zeros_like(var))  # finite grads at 0
    count = band.sum(dim=1)
    return (local_std * band).sum(dim=1) / count.clamp_min(1)


def flat_region_noise(images: Tensor, fraction: float = 0.5) -> Tensor:
    """Residual noise in the smoothest regions of each image.

    The ``k = max(1, round(fraction · H · W))`` pixels with the lowest 5×5 local variance of
    the luma image ``g`` (stable sort: ties keep raster order) are the flat regions; the
    result is the mean of ``|g - B_3 * g|`` over them, ``B_3`` being the 3×3 box blur. The
    box's support lies inside the 5×5 variance window, so on a flat-colour render (whose
    smoothest half is exactly constant) the result is 0 up to float rounding.

    Args:
        images: (B, 3, H, W) in [0, 1].
        fraction: share of pixels, in (0, 1], treated as the flat regions.

    Returns:
        (B,) mean |high-pass| over the flat regions, in gray units.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}.")
    gray = to_gray(images)
    n = gray.shape[-2] * gray.shape[-1]
    k = min(n, max(1, round(fraction * n)))
    order = torch.sort(_local_var(gray, 5), dim=1, stable=True).indices[:, :k]
    residual = (gray - _box_blur(gray)).abs().flatten(1)
    return residual.gather(1, order).mean(dim=1)


def low_level_metrics(images: Tensor) -> dict[str, Tensor]:
    """All four low-level hallucination metrics, each (B,), keyed
    ``"laplacian_var"``, ``"highpass"``, ``"edge_spread"``, ``"flat_noise"`` (defaults)."""
    images = _check_images(images)
    return {
        "laplacian_var": laplacian_variance(images),
        "highpass": highpass_energy(images),
        "edge_spread": edge_spread(images),
        "flat_noise": flat_region_noise(images),
    }


def _mean(value: Tensor | float) -> float:
    return float(torch.as_tensor(value, dtype=torch.float64).detach().cpu().mean())


def summarize(metrics: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean of each per-image metric: ``{name: mean over the batch}`` (NaN for an empty batch)."""
    return {name: _mean(values) for name, values in metrics.items()}


def relative_to(
    metrics: Mapping[str, Tensor | float],
    reference: Mapping[str, Tensor | float],
    eps: float = 1e-8,
) -> dict[str, float]:
    """How a model's images compare with reference (renderer) images: ratio of means.

    ``ratio[name] = mean(metrics[name]) / max(mean(reference[name]), eps)``; 1 means "as
    clean as the renderer", above 1 more low-level hallucination. When both means are below
    ``eps`` the ratio is 1. Renderer images have ``flat_noise ≈ 0``, so that ratio is
    dominated by ``eps``: read the absolute ``flat_noise`` from :func:`summarize` instead.

    Args:
        metrics: per-image metrics (B,) of the model's images, or their means.
        reference: the same names for reference images (e.g. the renderer's for the same
            prompts), per image or already averaged.
        eps: floor of the denominator.
    """
    missing = sorted(set(metrics) - set(reference))
    if missing:
        raise KeyError(f"reference lacks metrics {missing}; compute both with low_level_metrics().")
    ratios = {}
    for name, values in metrics.items():
        num, den = _mean(values), _mean(reference[name])
        ratios[name] = 1.0 if abs(num) < eps and abs(den) < eps else num / max(den, eps)
    return ratios
