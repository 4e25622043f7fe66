"""Weighted sum of several named rewards.

Config (YAML)::

    reward: multi
    reward_kwargs:
      rewards:
        text:  {reward: ocr, weight: 1.0}
        pick:  {reward: remote, weight: 0.5, kwargs: {url: "http://gpu-box:8000"}}
        small: {reward: jpeg_compressibility, weight: 0.01}

``scores = Σ_i weight_i · r_i``. ``details`` holds each component's raw scores under its
name and the component's own details as ``"<name>/<key>"``. With
``grpo.reward_normalization: per_reward`` the trainer normalises each component within its
group before weighting (:func:`diffalign.algorithms.grpo.per_reward_advantages`).
"""

from __future__ import annotations

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

_SPEC_KEYS = {"reward", "weight", "kwargs"}


@register_reward("multi")
class MultiReward:
    """Weighted sum of named component rewards (each built from the registry).

    Args:
        rewards: ``{name: {"reward": registered name (default: name), "weight": float
            (default 1), "kwargs": dict of the component's arguments}}``.
    """

    def __init__(self, rewards: dict[str, dict]):
        if not isinstance(rewards, dict) or not rewards:
            raise ConfigError("multi reward: give rewards={name: {reward: ..., weight: ..., kwargs: {...}}, ...} "
                              "with at least one component")
        self.components: dict[str, object] = {}
        self.weights: dict[str, float] = {}
        for cname, spec in rewards.items():
            spec = {} if spec is None else spec
            if not isinstance(spec, dict) or set(spec) - _SPEC_KEYS:
                raise ConfigError(f"multi reward: component {cname!r} must be a mapping with keys among "
                                  f"{sorted(_SPEC_KEYS)}; got {spec!r}")
            if "/" in cname:
                raise ConfigError(f"multi reward: component name {cname!r} may not contain '/'")
            weight = float(spec.get("weight", 1.0))
            if not torch.isfinite(torch.tensor(weight)):
                raise ConfigError(f"multi reward: component {cname!r} has a non-finite weight {weight}")
            self.components[cname] = build_reward(spec.get("reward", cname), **dict(spec.get("kwargs") or {}))
            self.weights[cname] = weight
        self.name = "multi[" + ",".join(f"{k}×{w:g}" for k, w in self.weights.items()) + "]"

    @property
    def input_sizes(self) -> tuple[int, ...] | None:
        """The image sides every component takes (None: any size)."""
        declared = [set(s) for s in map(input_sizes, self.components.values()) if s is not None]
        return None if not declared else tuple(sorted(set.intersection(*declared)))

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        total = torch.zeros(len(prompts), dtype=torch.float32)
        details: dict[str, torch.Tensor] = {}
        for cname, reward in self.components.items():
            try:
                out = checked_call(reward, images, prompts, metadata)
            except DiffalignError as e:  # name the failing component
                raise RewardError(f"multi reward part {cname!r}: {type(e).__name__}: {e}") from e
            total += self.weights[cname] * out.scores.cpu()
            details[cname] = out.scores.cpu()
            details.update({f"{cname}/{k}": v.cpu() for k, v in out.details.items()})
        return RewardOutput(total, details)

    def component_scores(self, details: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each component's raw scores, taken from this reward's ``details``."""
        return {cname: details[cname] for cname in self.components}


def per_reward_inputs(reward, details: dict[str, torch.Tensor], normalization: str) -> dict:
    """Keyword arguments for ``algo.advantages``: the multi reward's components and weights when
    ``normalization`` is ``per_reward``, else nothing (the algorithm normalises the summed reward)."""
    if normalization != "per_reward":
        return {}
    if not isinstance(reward, MultiReward):
        raise ConfigError(f"reward_normalization=per_reward needs reward: multi, got {getattr(reward, 'name', reward)!r}")
    return {"components": reward.component_scores(details), "weights": dict(reward.weights)}
