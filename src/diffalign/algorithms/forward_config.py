"""Configs of the forward-process updates (CRD, DiffusionNFT): flat dataclasses, checked early.

:class:`ForwardConfig` holds the settings both share (training noise draw, batching, advantage
map, KL anchor, snapshot schedules); :class:`CRDConfig` and :class:`NFTConfig` add each loss's
own. Published values are in brackets (ALGORITHMS.md §3). :mod:`~diffalign.algorithms.forward`
re-exports all three beside the update step that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffalign.algorithms.decay import make_decay_schedule
from diffalign.config import ranged
from diffalign.errors import ConfigError

__all__ = ["CRDConfig", "ForwardConfig", "NFTConfig"]


@dataclass
class ForwardConfig:
    """Settings shared by the forward-process updates (CRD, DiffusionNFT)."""

    time_shift: float = ranged(3.0, gt=0)
    """Shift ``s`` of the training noise levels ``σ = s·u/(1 + (s−1)·u)``, ``u ~ U(0, 1)``
    (dimensionless; > 1 favours high noise) [3]."""
    sigma_min: float = ranged(0.0, ge=0, lt=1)
    """Lowest training noise level: the shifted ``σ`` is mapped onto ``[sigma_min, 1]``. Own
    samples differ from the training data most at low noise (residual pixel noise, ragged
    edges: ``benchmarks/sampler_gap.py --fm-loss``), and fitting them there feeds those
    artifacts back into the next rollout; ``0.5`` leaves them out (docs/results.md, tenth
    round). 0 = the published draw."""
    timesteps_per_sample: int = ranged(1, ge=1)
    """Fresh ``(σ, ε)`` draws per clean sample per optimizer step (gradients accumulate)."""
    groups_per_step: int = ranged(0, ge=0)
    """Prompt groups per optimizer step (0 = every group of the rollout: one step per inner epoch)."""
    groups_per_microbatch: int = ranged(4, ge=1)
    """Prompt groups per forward pass (whole groups; a memory knob, gradients accumulate)."""
    inner_epochs: int = ranged(1, ge=1)
    """Passes over each rollout."""
    max_grad_norm: float = ranged(1.0, gt=0)
    """Gradient-norm clip."""
    adv_std: Literal["group", "global"] = "group"
    """Advantage normalisation before the ``[0, 1]`` map: std over the prompt's group or the rollout."""
    adv_clip: float = ranged(5.0, gt=0)
    """Advantages are clipped to ±adv_clip and mapped to ``r01 = A/(2·adv_clip) + 0.5``."""
    beta_kl: float = ranged(0.1, ge=0)
    """KL-anchor strength ``β_KL`` on the per-sample mean ``‖v_θ − v_ref‖²`` (0 skips the
    reference forward)."""
    kl_guidance: float = ranged(4.5, ge=0)
    """CFG weight ``w`` of the reference velocity in the KL anchor
    (``v_ref,u + w·(v_ref,c − v_ref,u)``, adapters off; 1 = the CFG-free base)."""
    old_decay: str = "crd_old"
    """EMA decay schedule of the ``old`` snapshot (the implicit reward's baseline): a preset
    (crd_old, crd_sampler, nft), ``constant:D`` or ``linear:START,SLOPE,START_STEP,MAX``;
    indexed by optimizer step."""
    sampler_decay: str = "crd_sampler"
    """EMA decay schedule of the ``sampler`` snapshot (makes the rollouts); same forms.
    Unused when ``tie_snapshots``."""
    tie_snapshots: bool = False
    """Sample with the ``old`` snapshot instead of a separate ``sampler`` snapshot
    (DiffusionNFT; for CRD the "tied" ablation)."""
    snapshot_update: Literal["step", "epoch"] = "step"
    """EMA-update the snapshots after each optimizer step, or once after each update call
    (DiffusionNFT's code; decay at the last step's index)."""

    def __post_init__(self) -> None:
        if not self.time_shift > 0:
            raise ConfigError(f"time_shift must be > 0 (1 = no shift); got {self.time_shift}")
        if not 0 <= self.sigma_min < 1:
            raise ConfigError(f"sigma_min must be in [0, 1) (the lowest training noise level); got {self.sigma_min}")
        if self.timesteps_per_sample < 1 or self.inner_epochs < 1:
            raise ConfigError("timesteps_per_sample and inner_epochs must be at least 1")
        if self.groups_per_step < 0:
            raise ConfigError(f"groups_per_step must be >= 0 (0 = all groups); got {self.groups_per_step}")
        if self.groups_per_microbatch < 1:
            raise ConfigError(f"groups_per_microbatch must be >= 1; got {self.groups_per_microbatch}")
        if not self.adv_clip > 0:
            raise ConfigError(f"adv_clip must be > 0; got {self.adv_clip}")
        if self.beta_kl < 0:
            raise ConfigError(f"beta_kl must be >= 0; got {self.beta_kl}")
        if self.adv_std not in ("group", "global"):
            raise ConfigError(f"adv_std must be 'group' or 'global'; got {self.adv_std!r}")
        if self.snapshot_update not in ("step", "epoch"):
            raise ConfigError(f"snapshot_update must be 'step' or 'epoch'; got {self.snapshot_update!r}")
        make_decay_schedule(self.old_decay)  # raises ConfigError listing the valid forms
        make_decay_schedule(self.sampler_decay)


@dataclass
class CRDConfig(ForwardConfig):
    """Centered Reward Distillation (ALGORITHMS.md §3); published values in brackets."""

    beta: float = ranged(1.0, gt=0)
    """KL strength ``β`` of the target ``p* ∝ p_ref·exp(r/β)`` in the reward-matching loss [1]."""
    centering: Literal["group", "batch"] = "group"
    """Centre rewards and implicit rewards within each prompt's group (the paper) or over the
    whole micro-batch (the public port)."""
    form: Literal["mse", "bce"] = "mse"
    """Reward-matching loss: ``(5/β)·mean((β·R̂ − R)²)`` or ``BCE_with_logits(β·R̂, σ(R))``."""
    adaptive_weight: bool = True
    """Divide each squared velocity error by ``sg(per-sample mean |v − v*|)`` in ``r̂_θ``."""
    beta_min: float = ranged(1e-4, ge=0)
    """Reward-adaptive KL floor: the per-sample KL weight runs from ``β_min`` (reward 0) to
    ``β_KL`` (reward 1); ``beta_min = beta_kl`` is the constant-KL ablation [1e-4]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"crd.beta must be > 0; got {self.beta}")
        if self.centering not in ("group", "batch"):
            raise ConfigError(f"crd.centering must be 'group' or 'batch'; got {self.centering!r}")
        if self.form not in ("mse", "bce"):
            raise ConfigError(f"crd.form must be 'mse' or 'bce'; got {self.form!r}")
        if not 0 <= self.beta_min <= self.beta_kl:
            raise ConfigError(f"need 0 <= crd.beta_min <= crd.beta_kl; got beta_min={self.beta_min}, "
                              f"beta_kl={self.beta_kl} (beta_min = beta_kl gives a constant KL)")


@dataclass
class NFTConfig(ForwardConfig):
    """DiffusionNFT (ALGORITHMS.md §3); published values in brackets."""

    beta: float = ranged(1.0, gt=0)
    """Mixing strength ``β`` of the implicit positive / negative policies [1]."""
    beta_kl: float = ranged(1e-4, ge=0)
    """Weight ``β_KL`` of ``mean‖v_θ − v_ref‖²`` [1e-4]."""
    kl_guidance: float = ranged(1.0, ge=0)
    """CFG weight of the reference velocity in the KL term (1 = the plain base, as published)."""
    old_decay: str = "nft"
    """EMA decay schedule of the ``old`` snapshot [nft: min(0.001·step, 0.5)]."""
    tie_snapshots: bool = True
    """DiffusionNFT samples with its ``old`` snapshot (one snapshot for both roles)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"nft.beta must be > 0; got {self.beta}")
