"""A control reward: mean pixel value. Every image's noise moves it the same way, so any working
policy-gradient loop climbs it within a few epochs (tests and ``benchmarks/fixed_prompts.py``)."""

from __future__ import annotations

from diffalign.rewards.base import RewardOutput, register_reward


@register_reward("mean_brightness")
class MeanBrightness:
    """Reward = ``sign`` × mean pixel value in [0, 1] (``sign=-1``: darkness)."""

    name = "mean_brightness"

    def __init__(self, sign: float = 1.0):
        self.sign = float(sign)

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(self.sign * images.float().mean(dim=(1, 2, 3)))
