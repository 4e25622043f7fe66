"""Pure losses of the fine-tuning algorithms, one file per family."""

from __future__ import annotations

from diffalign.algorithms.grpo import flow_grpo_kl, grpo_advantages, ppo_clip_loss, zero_signal_fraction

__all__ = ["flow_grpo_kl", "grpo_advantages", "ppo_clip_loss", "zero_signal_fraction"]
