"""Snapshot decay schedules: the EMA decay of a snapshot as a pure function of the training step.

The forward-process update (:mod:`~diffalign.algorithms.forward`) keeps EMA snapshots of the
policy, ``snap ← d(step)·snap + (1 − d(step))·θ``: CRD's ``old`` (the implicit reward's
baseline) and ``sampler`` (makes the rollouts), DiffusionNFT's single ``old``. ALGORITHMS.md §3
gives the published schedules; :func:`make_decay_schedule` parses a config string into one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from diffalign.errors import ConfigError

__all__ = [
    "CRD_OLD",
    "CRD_SAMPLER",
    "DECAY_PRESETS",
    "NFT_OLD",
    "DecaySchedule",
    "make_decay_schedule",
    "old_decay",
    "sampler_decay",
]


@dataclass(frozen=True)
class DecaySchedule:
    """EMA decay of a snapshot as a pure function of the training step.

    ::

        d(step) = 0                                             if step < start_step
        d(step) = clamp(start + slope·(step − start_step), 0, maximum)   otherwise

    The snapshot update is ``snap ← d·snap + (1 − d)·θ``: ``d = 0`` copies the policy,
    ``d = 1`` freezes the snapshot.
    """

    start: float
    """Decay at ``start_step``, in ``[0, 1]``."""
    slope: float
    """Change of the decay per step."""
    start_step: int = 0
    """Steps before this one have decay 0 (snapshot = policy)."""
    maximum: float = 0.999
    """Cap of the decay, in ``[0, 1]``."""

    def __post_init__(self) -> None:
        values = (self.start, self.slope, self.maximum)
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"decay schedule values must be finite; got {self}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.maximum <= 1.0):
            raise ConfigError(f"decay start and maximum must lie in [0, 1]; got {self}")
        if self.start_step < 0:
            raise ConfigError(f"decay start_step must be >= 0; got {self.start_step}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        if step < self.start_step:
            return 0.0
        return min(max(self.start + self.slope * (step - self.start_step), 0.0), self.maximum)


CRD_OLD = DecaySchedule(start=0.25, slope=0.005, start_step=0, maximum=0.999)
CRD_SAMPLER = DecaySchedule(start=0.0, slope=0.0075, start_step=75, maximum=0.999)
NFT_OLD = DecaySchedule(start=0.0, slope=0.001, start_step=0, maximum=0.5)

DECAY_PRESETS: dict[str, DecaySchedule] = {"crd_old": CRD_OLD, "crd_sampler": CRD_SAMPLER, "nft": NFT_OLD}

_DECAY_GRAMMAR = (
    "valid decay schedules: a preset name ('crd_old' = min(0.25 + 0.005·step, 0.999); "
    "'crd_sampler' = 0 before step 75, then min(0.0075·(step − 75), 0.999); "
    "'nft' = min(0.001·step, 0.5)), 'constant:D' with D in [0, 1] (e.g. 'constant:0.9'), or "
    "'linear:START,SLOPE,START_STEP,MAX' meaning 0 before START_STEP, then "
    "min(START + SLOPE·(step − START_STEP), MAX) (e.g. 'linear:0.25,0.005,0,0.999')"
)


def old_decay(step: int) -> float:
    """CRD's ``old``-snapshot decay ``min(0.25 + 0.005·step, 0.999)``."""
    return CRD_OLD(step)


def sampler_decay(step: int) -> float:
    """CRD's ``sampler``-snapshot decay: 0 before step 75, then ``min(0.0075·(step − 75), 0.999)``."""
    return CRD_SAMPLER(step)


def make_decay_schedule(spec: str) -> Callable[[int], float]:
    """Parse a decay-schedule spec into a :class:`DecaySchedule` (a callable ``step → decay``).

    Grammar (whitespace and case are ignored)::

        crd_old                          min(0.25 + 0.005·step, 0.999)           (CRD, old)
        crd_sampler                      0 if step < 75 else min(0.0075·(step−75), 0.999)
                                                                                 (CRD, sampler)
        nft                              min(0.001·step, 0.5)
        constant:D                       D, with 0 ≤ D ≤ 1
        linear:START,SLOPE,START_STEP,MAX
                                         0 if step < START_STEP
                                         else clamp(START + SLOPE·(step − START_STEP), 0, MAX)

    ``nft`` is DiffusionNFT's ``decay_type = 1``, the default of its public training configs
    (``return_decay``: ``flat = 0, uprate = 0.001, uphold = 0.5``); ``crd_sampler`` equals its
    ``decay_type = 2``. ``START_STEP`` is a non-negative integer; ``START`` and ``MAX`` lie in
    ``[0, 1]``.

    Raises:
        ConfigError: for anything else, listing the valid forms.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"decay schedule must be a string; got {spec!r}. {_DECAY_GRAMMAR}")
    text = "".join(spec.split()).lower()
    if text in DECAY_PRESETS:
        return DECAY_PRESETS[text]
    kind, sep, args = text.partition(":")
    if not sep or kind not in ("constant", "linear"):
        raise ConfigError(f"unknown decay schedule {spec!r}; {_DECAY_GRAMMAR}")
    try:
        values = [float(v) for v in args.split(",")]
    except ValueError:
        raise ConfigError(f"decay schedule {spec!r} has a non-numeric value; {_DECAY_GRAMMAR}") from None
    try:
        if kind == "constant":
            if len(values) != 1:
                raise ConfigError(f"'constant:' takes one value; got {spec!r}. {_DECAY_GRAMMAR}")
            return DecaySchedule(start=values[0], slope=0.0, start_step=0, maximum=values[0])
        if len(values) != 4:
            raise ConfigError(f"'linear:' takes four values; got {spec!r}. {_DECAY_GRAMMAR}")
        start, slope, start_step, maximum = values
        if not start_step.is_integer():
            raise ConfigError(f"START_STEP must be an integer; got {spec!r}. {_DECAY_GRAMMAR}")
        return DecaySchedule(start=start, slope=slope, start_step=int(start_step), maximum=maximum)
    except ConfigError as err:
        if _DECAY_GRAMMAR in str(err):
            raise
        raise ConfigError(f"invalid decay schedule {spec!r}: {err}. {_DECAY_GRAMMAR}") from None
