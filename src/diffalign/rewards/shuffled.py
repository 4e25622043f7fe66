"""Control reward: another reward's scores, dealt out at random among the images of each prompt.

Config (YAML)::

    reward: shuffled
    reward_kwargs: {reward: shapes_verifier, kwargs: {mode: partial}}

Within each set of images that share a prompt and a group (the trainer passes each image's
group id in ``metadata``; without it, the images of one prompt form a set), the scores are dealt out again
by a permutation that is independent of the images' quality: the k-th image in rollout order
gives its score to the k-th image in an order fixed by a hash of the pixels (so a run and its
resume see the same permutation). Each group keeps exactly the multiset of scores it had, so
the advantages have the same sizes, the same zero-signal groups and the same distribution as
with the real reward, but carry no information about which image earned them. (A permutation
without fixed points would not do: under a derangement each image's expected score is the
mean of the *others*, which is anti-correlated with its own, and the control would teach the
reverse of the reward at 1/(n−1) of its strength.)

A policy-gradient run on this reward measures what the update does with no signal: if the
model drifts as far under it as under the real reward, the drift comes from the update's noise
(its size, the optimizer, the number of steps), not from what the reward asks for.

``details`` keep the wrapped reward's real, unshuffled per-image figures (so the training log
still shows how good the samples are) and add ``unshuffled``: the real scores.
"""

from __future__ import annotations

import hashlib

import torch

from diffalign.errors import ConfigError, DiffalignError
from diffalign.rewards.base import (
    RewardError,
    RewardOutput,
    build_reward,
    checked_call,
    input_sizes,
    register_reward,
)


def pixel_key(image: torch.Tensor) -> bytes:
    """A hash of one image's pixel values: an order for images that is unrelated to their content."""
    return hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()


def shuffle_within_prompts(scores: torch.Tensor, prompts: list[str], keys: list[bytes],
                           groups: list | None = None) -> torch.Tensor:
    """Deal each set's scores out again, a set being the images of one prompt (and of one group,
    where ``groups`` gives each image's group id): the k-th image of the set in batch order gives
    its score to the k-th in ``keys`` order. When the keys are unrelated to the scores this is a
    uniformly random permutation within each set, fixed points included."""
    out = scores.clone()
    by_prompt: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault((None if groups is None else groups[i], p), []).append(i)
    for idx in by_prompt.values():
        for src, dst in zip(idx, sorted(idx, key=lambda i: (keys[i], i)), strict=True):
            out[dst] = scores[src]
    return out


@register_reward("shuffled")
class ShuffledReward:
    """``reward``'s scores, dealt out again within each prompt's images (see the module doc).

    Args:
        reward: the registered name of the reward to wrap.
        kwargs: its arguments.
    """

    def __init__(self, reward: str, kwargs: dict | None = None):
        if not isinstance(reward, str) or reward == "shuffled":
            raise ConfigError(f"shuffled reward: give reward=<a registered reward other than 'shuffled'>, got {reward!r}")
        self.inner = build_reward(reward, **dict(kwargs or {}))
        self.name = f"shuffled[{getattr(self.inner, 'name', reward)}]"

    @property
    def input_sizes(self) -> tuple[int, ...] | None:
        return input_sizes(self.inner)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        try:
            out = checked_call(self.inner, images, prompts, metadata)
        except DiffalignError as e:
            raise RewardError(f"shuffled reward: the wrapped reward failed: {type(e).__name__}: {e}") from e
        real = out.scores.float().cpu()
        keys = [pixel_key(im) for im in images]
        details = {k: v.cpu() for k, v in out.details.items()}
        details["unshuffled"] = real
        groups = [m.get("group") if isinstance(m, dict) else None for m in metadata]
        return RewardOutput(shuffle_within_prompts(real, prompts, keys, groups), details)
