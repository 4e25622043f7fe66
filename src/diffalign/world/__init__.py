"""ShapesWorld: a small text-to-image world with an exact verifier."""

from diffalign.world.grammar import (
    COLORS,
    HELD_OUT_COMBOS,
    SHAPES,
    TASKS,
    ObjectSpec,
    PromptSpec,
    all_prompts,
    eval_prompts,
    format_prompt,
    parse_prompt,
    prompt_splits,
)
from diffalign.world.render import render, render_batch, to_tensor, to_uint8
from diffalign.world.verify import Detection, Verdict, detect, snap_to_palette, verify, verify_batch

__all__ = [
    "COLORS", "HELD_OUT_COMBOS", "SHAPES", "TASKS", "ObjectSpec", "PromptSpec", "all_prompts", "eval_prompts",
    "format_prompt", "parse_prompt", "prompt_splits", "render", "render_batch", "to_tensor", "to_uint8",
    "Detection", "Verdict", "detect", "snap_to_palette", "verify", "verify_batch",
]
