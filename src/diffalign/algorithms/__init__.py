"""Pure losses of the fine-tuning algorithms, one file per family."""

from __future__ import annotations

from diffalign.algorithms.crd import (
    DecaySchedule,
    crd_implicit_reward,
    crd_loss,
    make_decay_schedule,
    old_decay,
    reward_adaptive_kl,
    rewards_to_unit,
    sampler_decay,
)
from diffalign.algorithms.grpo import flow_grpo_kl, grpo_advantages, ppo_clip_loss, zero_signal_fraction
from diffalign.algorithms.nft import forward_noising, nft_loss, sample_training_sigmas

__all__ = ["flow_grpo_kl", "grpo_advantages", "ppo_clip_loss", "zero_signal_fraction"]
__all__ += [
    "DecaySchedule",
    "crd_implicit_reward",
    "crd_loss",
    "forward_noising",
    "make_decay_schedule",
    "nft_loss",
    "old_decay",
    "reward_adaptive_kl",
    "rewards_to_unit",
    "sample_training_sigmas",
    "sampler_decay",
]

from diffalign.algorithms.consistent_rft import cpgo_loss  # noqa: E402
from diffalign.algorithms.preference import (  # noqa: E402
    diffusion_dpo_loss,
    epsilon_error,
    flow_matching_error,
    seppo_loss,
    sft_loss,
)

__all__ += ["cpgo_loss", "diffusion_dpo_loss", "epsilon_error", "flow_matching_error", "seppo_loss", "sft_loss"]
