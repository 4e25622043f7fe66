"""Rewards: protocol, registry and the built-in rewards."""

from diffalign.rewards import brightness as _brightness  # noqa: F401  (registers mean_brightness, prompt_brightness)
from diffalign.rewards import clip as _clip  # noqa: F401  (registers pickscore, clipscore)
from diffalign.rewards import jpeg as _jpeg  # noqa: F401  (registers the JPEG rewards)
from diffalign.rewards import multi as _multi  # noqa: F401  (registers multi)
from diffalign.rewards import ocr as _ocr  # noqa: F401  (registers ocr)
from diffalign.rewards import remote as _remote  # noqa: F401  (registers remote)
from diffalign.rewards import shapes_score as _shapes_score  # noqa: F401  (registers shapes_score)
from diffalign.rewards import shuffled as _shuffled  # noqa: F401  (registers shuffled)
from diffalign.rewards import verifier as _verifier  # noqa: F401  (registers shapes_verifier)
from diffalign.rewards.base import (
    Reward,
    RewardError,
    RewardInputError,
    RewardOutput,
    available_rewards,
    build_reward,
    check_input,
    checked_call,
    register_reward,
)

__all__ = ["Reward", "RewardError", "RewardInputError", "RewardOutput", "available_rewards", "build_reward",
           "check_input", "checked_call", "register_reward"]
