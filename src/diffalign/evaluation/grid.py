"""Image grids: small ShapesWorld images upscaled (nearest) with optional captions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def make_grid(images: torch.Tensor, ncol: int | None = None, *, scale: int = 4, captions: list[str] | None = None,
              marks: list[bool] | None = None, pad: int = 2) -> Image.Image:
    """Tile ``(B, 3, H, W)`` images in [0, 1] into one PIL image.

    captions: one short line under each tile. marks: True → green border, False → red
    (e.g. the verifier's verdict)."""
    b, _, h, w = images.shape
    ncol = ncol or min(b, 8)
    nrow = math.ceil(b / ncol)
    th, tw = h * scale, w * scale
    cap_h = 12 if captions else 0
    cell_w, cell_h = tw + 2 * pad, th + 2 * pad + cap_h
    canvas = Image.new("RGB", (ncol * cell_w, nrow * cell_h), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    u8 = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, ncol)
        x, y = c * cell_w, r * cell_h
        if marks is not None:
            draw.rectangle([x, y, x + cell_w - 1, y + th + 2 * pad - 1], fill=(40, 170, 60) if marks[i] else (210, 40, 40))
        tile = Image.fromarray(np.ascontiguousarray(u8[i])).resize((tw, th), Image.NEAREST)
        canvas.paste(tile, (x + pad, y + pad))
        if captions:
            text = captions[i]
            while len(text) > 3 and draw.textlength(text, font=font) > cell_w - 2:
                text = text[:-2]
            draw.text((x + pad, y + th + 2 * pad), text, fill=(0, 0, 0), font=font)
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, **kwargs).save(path)
    return path
