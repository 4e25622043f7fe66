"""ShapesWorld renderer: prompt + seed → image + ground-truth object list.

Shapes are drawn with hard edges (no anti-aliasing) in flat palette colours on white, so
the verifier is exact on renderer output. Objects never overlap: their bounding boxes keep
a gap of at least ``2·scale`` pixels and a margin of ``scale`` pixel to the border.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from diffalign.errors import DiffalignError
from diffalign.world.grammar import COLORS, HELD_OUT_COMBOS, SHAPES, PromptSpec, parse_prompt

SUPPORTED_SIZES = (32, 64)
#: Side of an object's bounding box, in pixels at 32×32 (scaled with the canvas).
MIN_OBJECT, MAX_OBJECT = 7, 11
#: Minimum centroid offset, in pixels at 32×32, that the renderer leaves on a relation's axis.
RENDER_RELATION_MARGIN = 5


@dataclass(frozen=True)
class RenderedObject:
    """An object on the canvas: top-left ``(x0, y0)`` and side ``size`` of its bounding box."""

    shape: str
    color: str
    x0: int
    y0: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.size / 2, self.y0 + self.size / 2)


def check_size(size: int) -> int:
    if size not in SUPPORTED_SIZES:
        raise DiffalignError(f"image size {size} is not supported; ShapesWorld renders at 32 or 64 pixels")
    return size


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a shape filling its bounding box (pixel centres at i+0.5)."""
    c = np.arange(size) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    half = size / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (xx - half) ** 2 + (yy - half) ** 2 <= half**2
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(xx - half) <= (yy / size) * half
    raise DiffalignError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def _relation_ok(a: RenderedObject, b: RenderedObject, relation: str, margin: float) -> bool:
    (ax, ay), (bx, by) = a.center, b.center
    return {
        "left of": bx - ax >= margin,
        "right of": ax - bx >= margin,
        "above": by - ay >= margin,
        "below": ay - by >= margin,
    }[relation]


def _free_color(rng: random.Random, shape: str, avoid_held_out: bool) -> str:
    options = [c for c in COLORS if not (avoid_held_out and (c, shape) in HELD_OUT_COMBOS)]
    return rng.choice(options)


def layout(spec: PromptSpec, seed: int, size: int = 32, *, avoid_held_out: bool = True) -> list[RenderedObject]:
    """Place the prompt's objects without overlap. Free colours avoid held-out combinations
    when ``avoid_held_out`` (so training data never shows them)."""
    check_size(size)
    scale = size // 32
    rng = random.Random(seed)
    gap, margin = 2 * scale, scale
    colors = [o.color or _free_color(rng, o.shape, avoid_held_out) for o in spec.objects]
    for _attempt in range(2000):
        placed: list[RenderedObject] = []
        for obj, color in zip(spec.objects, colors, strict=True):
            s = rng.randint(MIN_OBJECT * scale, MAX_OBJECT * scale)
            for _try in range(50):
                x0 = rng.randint(margin, size - margin - s)
                y0 = rng.randint(margin, size - margin - s)
                cand = RenderedObject(obj.shape, color, x0, y0, s)
                if all(
                    cand.x0 >= p.x0 + p.size + gap
                    or p.x0 >= cand.x0 + cand.size + gap
                    or cand.y0 >= p.y0 + p.size + gap
                    or p.y0 >= cand.y0 + cand.size + gap
                    for p in placed
                ):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) != len(spec.objects):
            continue
        if spec.relation and not _relation_ok(placed[0], placed[1], spec.relation, RENDER_RELATION_MARGIN * scale):
            continue
        return placed
    raise RuntimeError(f"could not lay out {spec.text!r} (seed {seed}) without overlap")  # pragma: no cover


def draw(objects: list[RenderedObject], size: int = 32) -> np.ndarray:
    """Paint objects on white: uint8 ``(size, size, 3)``."""
    img = np.full((size, size, 3), 255, np.uint8)
    for o in objects:
        m = shape_mask(o.shape, o.size)
        region = img[o.y0 : o.y0 + o.size, o.x0 : o.x0 + o.size]
        region[m] = COLORS[o.color]
    return img


def render(prompt: str | PromptSpec, seed: int, size: int = 32, *, avoid_held_out: bool = True):
    """Render a prompt: returns ``(image uint8 (H, W, 3), objects)``. Deterministic in ``seed``."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    objects = layout(spec, seed, size, avoid_held_out=avoid_held_out)
    return draw(objects, size), objects


def render_batch(prompts: list[str], seeds: list[int], size: int = 32) -> torch.Tensor:
    """Render a batch as float images ``(B, 3, H, W)`` in [0, 1]."""
    imgs = [render(p, s, size)[0] for p, s in zip(prompts, seeds, strict=True)]
    return to_tensor(np.stack(imgs))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` → float ``(B, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in [0, 1] → uint8 ``(B, H, W, 3)`` (clamped, rounded)."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
