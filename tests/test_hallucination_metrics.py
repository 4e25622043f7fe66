"""Low-level hallucination metrics: hand-checked values on synthetic ShapesWorld-like images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.evaluation.hallucination import (
    ImageInputError,
    edge_spread,
    flat_region_noise,
    highpass_energy,
    laplacian_variance,
    low_level_metrics,
    relative_to,
    summarize,
)

NAMES = ("laplacian_var", "highpass", "edge_spread", "flat_noise")
RED, YELLOW, BLUE, ORANGE = (1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.5, 0.0)


def white(size: int = 32, batch: int = 1) -> torch.Tensor:
    return torch.ones(batch, 3, size, size)


def square(
    colour: tuple[float, float, float] = RED, size: int = 32, lo: int = 12, side: int = 8
) -> torch.Tensor:
    """A hard-edged flat-colour ``side × side`` square at rows/cols ``lo:lo+side`` on white, (1, 3, H, W)."""
    image = white(size)
    image[0, :, lo : lo + side, lo : lo + side] = torch.tensor(colour).view(3, 1, 1)
    return image


def noisy(image: torch.Tensor, std: float = 0.05, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (image + std * torch.randn(image.shape, generator=generator)).clamp(0, 1)


def box_blur(image: torch.Tensor) -> torch.Tensor:
    """3×3 box blur per channel with replicate padding (independent of the module's filters)."""
    b, c, h, w = image.shape
    padded = F.pad(image.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(padded, 3, stride=1).reshape(b, c, h, w)


def luma(colour: tuple[float, float, float]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def test_flat_white_image_gives_zero_for_every_metric():
    metrics = low_level_metrics(white(batch=2))
    for name in NAMES:
        assert metrics[name].shape == (2,)
        assert torch.all(metrics[name].abs() < 1e-6), (name, metrics[name])
    assert torch.all(edge_spread(white()) == 0)  # no edge pixels: exactly 0


def test_square_on_white_hand_checked_laplacian_variance():
    # Contrast d = 1 - luma(red) = 0.701. With the 4-neighbour Laplacian an s×s square gives
    # +d on its 4(s-2) inner edge pixels, +2d on its 4 corners, -d on the 4s pixels outside
    # its sides, 0 elsewhere: mean 0, sum of squares d²(4(s-2) + 16 + 4s) = d²(8s + 8).
    d, s, n = 1 - luma(RED), 8, 32 * 32
    expected = d**2 * (8 * s + 8) / n  # 72 d² / 1024 = 0.0345516
    measured = laplacian_variance(square(RED))
    assert measured.item() == pytest.approx(expected, rel=1e-5)
    assert measured.item() == pytest.approx(0.0345516, abs=1e-6)


def test_square_on_white_values():
    metrics = low_level_metrics(square(RED))
    assert metrics["flat_noise"].abs().item() < 1e-6  # the smoothest half is exactly flat
    assert metrics["highpass"].item() == pytest.approx(0.01520, abs=1e-4)
    # A hard step of height d has local std d·√2/3 beside it and 0 elsewhere in the band:
    # the band mean lies strictly between 0 and that peak.
    peak = (1 - luma(RED)) * math.sqrt(2) / 3
    assert 0.1 * peak < metrics["edge_spread"].item() < peak
    assert metrics["edge_spread"].item() == pytest.approx(0.1066, abs=1e-3)


@pytest.mark.parametrize("colour", [RED, YELLOW, BLUE])
def test_gaussian_noise_increases_every_metric(colour):
    clean, dirty = low_level_metrics(square(colour)), low_level_metrics(noisy(square(colour)))
    for name in NAMES:
        assert dirty[name].item() > clean[name].item(), (name, clean[name], dirty[name])
    assert dirty["flat_noise"].item() > 0.005  # noise std 0.05 (half of it clipped on white)


def test_blur_lowers_detail_and_keeps_flat_regions_clean():
    # Blur is a local average: it lowers the Laplacian and high-pass energy, and it spreads
    # the step into smaller 3×3 differences, so the edge band's local std falls too
    # (edge_spread measures over-detail around edges, not sharpness). Flat regions stay flat.
    sharp, blurred = low_level_metrics(square(RED)), low_level_metrics(box_blur(square(RED)))
    assert blurred["laplacian_var"].item() < 0.5 * sharp["laplacian_var"].item()
    assert blurred["highpass"].item() < sharp["highpass"].item()
    assert blurred["edge_spread"].item() < sharp["edge_spread"].item()
    assert blurred["flat_noise"].abs().item() < 1e-6


def test_ringing_from_oversharpening_raises_edge_spread():
    clean = square(ORANGE)  # G = 0.5 inside leaves room for over- and undershoot
    ringing = (clean + 1.0 * (clean - box_blur(clean))).clamp(0, 1)  # unsharp mask: halos
    assert edge_spread(ringing).item() > 1.1 * edge_spread(clean).item()
    assert laplacian_variance(ringing).item() > laplacian_variance(clean).item()
    assert flat_region_noise(ringing).abs().item() < 1e-6  # halos stay near the edges


def test_batch_equals_per_image_and_64px_works():
    images = torch.cat([white(), square(RED), noisy(square(BLUE)), box_blur(square(YELLOW))])
    batched = low_level_metrics(images)
    for i in range(images.shape[0]):
        single = low_level_metrics(images[i : i + 1])
        for name in NAMES:
            assert torch.allclose(batched[name][i : i + 1], single[name], rtol=1e-5, atol=1e-7), (name, i)
    big = low_level_metrics(square(RED, size=64, lo=20, side=16))
    assert big["laplacian_var"].item() == pytest.approx((1 - luma(RED)) ** 2 * (8 * 16 + 8) / 64**2, rel=1e-5)
    assert big["flat_noise"].abs().item() < 1e-6


def test_float64_and_tolerated_overshoot():
    image = square(RED).double()
    assert laplacian_variance(image).dtype == torch.float64
    slightly_out = square(RED) * (1 + 5e-4)  # within the 1e-3 tolerance: clamped, not rejected
    assert highpass_energy(slightly_out).item() == pytest.approx(
        highpass_energy(square(RED)).item(), abs=1e-4
    )


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.ones(3, 8, 8), r"got \(3, 8, 8\).*unsqueeze"),
        (torch.ones(1, 8, 8, 3), r"got \(1, 8, 8, 3\).*permute"),
        (torch.ones(1, 1, 8, 8), r"\(B, 3, H, W\)"),
        (torch.full((1, 3, 8, 8), 255, dtype=torch.uint8), r"uint8.*/ 255"),
        (torch.full((1, 3, 8, 8), -1.0), r"\[-1, -1\].*\(images \+ 1\) / 2"),
        (torch.full((1, 3, 8, 8), 2.0), r"\[2, 2\].*255"),
        (torch.full((1, 3, 8, 8), float("nan")), r"\[0, 1\]"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(images, match):
    with pytest.raises(ValueError, match=match):
        low_level_metrics(images)
    with pytest.raises(ImageInputError):
        laplacian_variance(images)


def test_bad_fraction_rejected():
    with pytest.raises(ValueError, match="fraction"):
        flat_region_noise(white(), fraction=0.0)


def test_summarize_and_relative_to():
    reference = low_level_metrics(torch.cat([square(RED), square(BLUE)]))
    model = low_level_metrics(torch.cat([noisy(square(RED)), noisy(square(BLUE), seed=1)]))
    means = summarize(reference)
    assert set(means) == set(NAMES)
    assert means["laplacian_var"] == pytest.approx(reference["laplacian_var"].double().mean().item())
    assert all(value == pytest.approx(1.0) for value in relative_to(reference, reference).values())
    ratios = relative_to(model, means)  # reference may be already averaged
    assert all(ratios[name] > 1.0 for name in ("laplacian_var", "highpass", "edge_spread"))
    assert ratios["flat_noise"] > 1e3  # the renderer has no flat-region noise: huge ratio
    with pytest.raises(KeyError, match="flat_noise"):
        relative_to(model, {k: v for k, v in reference.items() if k != "flat_noise"})
