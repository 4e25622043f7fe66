"""Reward protocol, output container and registry.

A reward scores decoded images against their prompts::

    class Reward(Protocol):
        name: str
        def __call__(self, images, prompts, metadata) -> RewardOutput: ...

``images`` are float ``(B, 3, H, W)`` in [0, 1]; ``metadata`` one dict per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from diffalign.errors import ConfigError, DiffalignError


@dataclass
class RewardOutput:
    """scores: (B,) float32. details: name → (B,) float32 per-image breakdowns."""

    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput: ...


class RewardError(DiffalignError):
    """A reward failed (raised, or returned NaN / wrong shapes); names the reward."""


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str):
    """Decorator: make a reward factory available by ``name`` (configs and the reward server)."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def build_reward(name: str, **kwargs) -> Reward:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def checked_call(reward: Reward, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
    """Call ``reward`` and validate its output; any failure becomes a :class:`RewardError`
    naming the reward, so a training run stops with a clear message."""
    name = getattr(reward, "name", type(reward).__name__)
    try:
        out = reward(images, prompts, metadata)
    except DiffalignError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the reward's name
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(out, RewardOutput):
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, expected RewardOutput")
    scores = torch.as_tensor(out.scores, dtype=torch.float32)
    if scores.shape != (len(prompts),):
        raise RewardError(f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected ({len(prompts)},)")
    bad = ~torch.isfinite(scores)
    if bad.any():
        idx = bad.nonzero().flatten()[:3].tolist()
        raise RewardError(
            f"reward {name!r} returned {int(bad.sum())} non-finite score(s) (NaN/inf), e.g. for prompt "
            f"{prompts[idx[0]]!r}; fix the reward or filter its inputs"
        )
    return RewardOutput(scores, {k: torch.as_tensor(v, dtype=torch.float32) for k, v in out.details.items()})
