"""Control rewards: mean pixel value, globally or with a sign chosen by the prompt.

Every image's noise moves the mean pixel value the same way, so any working policy-gradient
loop climbs ``mean_brightness`` within a few epochs (tests and ``benchmarks/fixed_prompts.py``).
``prompt_brightness`` asks for opposite moves on two sets of prompts at once: a loop that mixes
up which prompt a trajectory belongs to between rollout and re-scoring (conditioning, group
order, cached encodings) averages the two and climbs neither.
"""

from __future__ import annotations

import torch

from diffalign.errors import ConfigError
from diffalign.rewards.base import RewardOutput, register_reward


@register_reward("mean_brightness")
class MeanBrightness:
    """Reward = ``sign`` × mean pixel value in [0, 1] (``sign=-1``: darkness)."""

    name = "mean_brightness"

    def __init__(self, sign: float = 1.0):
        self.sign = float(sign)

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(self.sign * images.float().mean(dim=(1, 2, 3)))


@register_reward("prompt_brightness")
class PromptBrightness:
    """Reward = ``s(prompt)`` × mean pixel value: ``s = +1`` for prompts containing a word of
    ``up``, ``−1`` for a word of ``down``, 0 for neither (a prompt may not contain both)."""

    name = "prompt_brightness"

    def __init__(self, up: list[str] | tuple[str, ...] = ("red",), down: list[str] | tuple[str, ...] = ("blue",)):
        self.up, self.down = {w.lower() for w in up}, {w.lower() for w in down}
        if not self.up or not self.down or self.up & self.down:
            raise ConfigError(f"prompt_brightness needs two disjoint, non-empty word lists; got up={sorted(self.up)}, "
                              f"down={sorted(self.down)}")

    def sign(self, prompt: str) -> float:
        words = set(prompt.lower().split())
        up, down = bool(words & self.up), bool(words & self.down)
        if up and down:
            raise ConfigError(f"prompt {prompt!r} contains words of both up={sorted(self.up)} and "
                              f"down={sorted(self.down)}: its brightness sign is ambiguous")
        return 1.0 if up else -1.0 if down else 0.0

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        signs = torch.tensor([self.sign(p) for p in prompts], dtype=torch.float32, device=images.device)
        return RewardOutput(signs * images.float().mean(dim=(1, 2, 3)))
