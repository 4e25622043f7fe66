"""Reward protocol, output container and registry.

A reward scores decoded images against their prompts::

    class Reward(Protocol):
        name: str
        def __call__(self, images, prompts, metadata) -> RewardOutput: ...

``images`` are float ``(B, 3, H, W)`` in [0, 1]; ``metadata`` one dict per image.

A reward whose model takes only some image sizes declares them as ``input_sizes``: the square
sides (pixels) it accepts, e.g. ``(32, 64)``; absent or None accepts any size.
:func:`check_input` enforces the declaration, and :func:`checked_call` (training, evaluation,
the reward server) calls it before scoring.
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


class RewardInputError(RewardError, ValueError):
    """Images a reward does not take (wrong shape, or a size outside its ``input_sizes``)."""


def input_sizes(reward: object) -> tuple[int, ...] | None:
    """The square image sides ``reward`` declares it accepts (None: any size)."""
    sizes = getattr(reward, "input_sizes", None)
    return None if sizes is None else tuple(int(s) for s in sizes)


def check_input(reward: object, images: torch.Tensor) -> None:
    """Raise :class:`RewardInputError`, naming the expected size, when ``images`` are not
    ``(B, 3, S, S)`` with ``S`` among the reward's declared ``input_sizes``."""
    sizes = input_sizes(reward)
    if sizes is None:
        return
    shape = tuple(images.shape)
    if len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3] and shape[2] in sizes:
        return
    name = getattr(reward, "name", type(reward).__name__)
    expected = " or ".join(f"{s}×{s}" for s in sizes) or "no size (its parts declare disjoint sizes), so no"
    raise RewardInputError(f"reward {name!r} takes (B, 3, S, S) images of {expected} pixels; got shape {shape}. "
                           "Resize the images or use a reward made for this size.")


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
    """Check the images against the reward's declared ``input_sizes``, call ``reward`` and
    validate its output; any failure becomes a :class:`RewardError` naming the reward, so a
    training run stops with a clear message."""
    name = getattr(reward, "name", type(reward).__name__)
    check_input(reward, images)
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
