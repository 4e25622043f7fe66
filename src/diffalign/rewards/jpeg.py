"""DDPO's JPEG compressibility / incompressibility rewards (file size of the JPEG encoding)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from diffalign.rewards.base import RewardOutput, register_reward


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image ``(B, 3, H, W)`` in [0, 1] saved as JPEG at ``quality``."""
    u8 = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for im in u8:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
class JpegCompressibility:
    """Reward = −(JPEG size in kB): smaller files score higher (DDPO)."""

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        kb = jpeg_sizes_kb(images, self.quality)
        return RewardOutput(-kb, {"jpeg_kb": kb})


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """Reward = +(JPEG size in kB): larger files score higher (DDPO)."""

    name = "jpeg_incompressibility"

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        kb = jpeg_sizes_kb(images, self.quality)
        return RewardOutput(kb, {"jpeg_kb": kb})
