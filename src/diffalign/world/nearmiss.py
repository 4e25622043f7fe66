"""Near-miss images: renders that break exactly one thing a prompt asks for.

Used to check that the verifier cannot be fooled, and later as hard negatives for learned
rewards. Each kind returns ``None`` when it does not apply to the prompt (e.g. a wrong
relation for a prompt without one).
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from diffalign.world.grammar import COLORS, SHAPES, ObjectSpec, PromptSpec, parse_prompt
from diffalign.world.render import draw, layout

NEAR_MISS_KINDS = ("object_removed", "wrong_color", "wrong_shape", "wrong_relation", "extra_object")


def near_miss(prompt: str | PromptSpec, seed: int, kind: str, size: int = 32) -> np.ndarray | None:
    """A uint8 ``(H, W, 3)`` image that fails ``prompt`` in the way ``kind`` names."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = random.Random(seed * 7919 + NEAR_MISS_KINDS.index(kind))
    objects = layout(spec, seed, size, avoid_held_out=False)
    if kind == "object_removed":
        drop = rng.randrange(len(objects))
        return draw(objects[:drop] + objects[drop + 1 :], size)
    if kind == "wrong_color":
        i = rng.randrange(len(objects))
        others = [c for c in COLORS if c != objects[i].color]
        if spec.objects[i].color is None:
            return None  # a free colour cannot be wrong
        objects[i] = replace(objects[i], color=rng.choice(others))
        return draw(objects, size)
    if kind == "wrong_shape":
        i = rng.randrange(len(objects))
        taken = {o.shape for o in spec.objects}
        options = [s for s in SHAPES if s not in taken] or [s for s in SHAPES if s != objects[i].shape]
        objects[i] = replace(objects[i], shape=rng.choice(options))
        return draw(objects, size)
    if kind == "wrong_relation":
        if spec.relation is None:
            return None
        img = draw(objects, size)
        # Mirror across the relation's axis: left↔right (triangles are left-right symmetric),
        # above↔below (an upside-down triangle is still a triangle to the verifier).
        return img[:, ::-1].copy() if spec.relation in ("left of", "right of") else img[::-1].copy()
    if kind == "extra_object":
        extra = ObjectSpec(rng.choice(SHAPES), rng.choice(list(COLORS)))
        bigger = PromptSpec(spec.task, (*spec.objects, extra), spec.relation, spec.text)
        return draw(layout(bigger, seed, size, avoid_held_out=False), size)
    raise ValueError(f"unknown near-miss kind {kind!r}; choose from {', '.join(NEAR_MISS_KINDS)}")
