"""The GRPO family's update step: Flow-GRPO, DanceGRPO and DDPO share it.

One call of :meth:`GRPO.update` trains on a stored rollout::

    for each inner epoch:
        shuffle samples; give every sample its own random order of trainable steps
        for each minibatch of samples:                       (one optimizer step)
            for j in the first ``train_fraction`` of each sample's steps:
                ρ = exp(log p_θ(x_{k+1}|x_k) − log p_old)      (recompute_step)
                L = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))) + β·KL(μ_θ, μ_ref)
                backward(L / n_steps)                        (gradient accumulation)

Trainable steps are the stochastic ones (``traj.sde_mask``): ODE steps have no density.
The KL is Flow-GRPO's ``‖μ_θ − μ_ref‖² / (2·s_t²)`` per-sample mean, with ``s_t`` the SDE
noise scale without ``√(−dt)`` for ``flow_sde`` and the step's std for other samplers;
the reference is the base model (adapters off), run without gradient.

Extra per-step terms (ConsistentRFT's CPGO) plug in as ``regularizers``: callables
``reg(traj, sample_idx, step_idx, x0_pred, generator) -> (loss, metrics)`` added to the
step's loss (one with ``needs_policy`` set also gets ``policy=``, ``cond=`` and
``autocast_bf16=``: CPGO at steps outside the window). A ``granularity`` callable ``(epoch, num_groups, generator) -> (G,) bool | None``
chooses per group whether the rollout shares one initial noise (ConsistentRFT's DGR).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffalign.algorithms.grpo import (
    flow_grpo_kl,
    grpo_advantages,
    per_reward_advantages,
    ppo_clip_loss,
    zero_signal_fraction,
)
from diffalign.config import ranged
from diffalign.errors import ConfigError
from diffalign.sampling.rollout import Trajectory, recompute_step
from diffalign.sampling.steps import flow_sde_noise_scale
from diffalign.sharding import reduce_clip_step

Regularizer = Callable[[Trajectory, Tensor, Tensor, Tensor, torch.Generator], tuple[Tensor, dict[str, float]]]
Granularity = Callable[[int, int, torch.Generator], "Tensor | None"]
Auxiliary = Callable[[object, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass
class GRPOConfig:
    """PPO-clip update settings for the GRPO family."""

    clip_range: float = ranged(1e-4, gt=0)
    """PPO clip ε on the ratio of per-sample mean log-probs (Flow-GRPO: 1e-4)."""
    beta_kl: float = ranged(0.0, ge=0)
    """Weight β of the KL to the reference model (Flow-GRPO: 0.04; 0 skips the reference forward)."""
    adv_std: Literal["group", "global"] = "group"
    """Advantage normalisation: std over the prompt's group or over the whole rollout."""
    adv_clip: float = ranged(5.0, gt=0)
    """Advantages are clipped to ±adv_clip."""
    reward_normalization: Literal["sum", "per_reward"] = "sum"
    """``sum``: normalise the (weighted) reward. ``per_reward`` (needs ``reward: multi``): normalise
    each component reward within its group, then take the weighted sum of those advantages."""
    advantage: Literal["group", "per_prompt_running"] = "group"
    """``group``: GRPO statistics of the current rollout. ``per_prompt_running``: DDPO's
    per-prompt running mean/std over past rollouts."""
    running_buffer: int = ranged(32, ge=1)
    """DDPO stat tracker: rewards kept per prompt."""
    running_min_count: int = ranged(16, ge=0)
    """DDPO stat tracker: below this many rewards for a prompt, use the batch statistics."""
    train_fraction: float = ranged(1.0, gt=0, le=1)
    """Fraction of each sample's stochastic steps trained on per inner epoch (Flow-GRPO: 0.99, DanceGRPO: 0.6)."""
    minibatch_size: int = ranged(32, ge=1)
    """Samples per optimizer step (gradients accumulate over their steps)."""
    micro_batch_size: int = ranged(0, ge=0)
    """Samples per forward pass inside a minibatch (gradients accumulate; a memory knob for
    large models, the update is the same). 0 = the whole minibatch in one forward."""
    inner_epochs: int = ranged(1, ge=1)
    """Passes over each rollout."""
    max_grad_norm: float = ranged(1.0, gt=0)
    """Gradient-norm clip."""

    def __post_init__(self) -> None:
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.clip_range <= 0:
            raise ConfigError(f"clip_range must be positive, got {self.clip_range}")
        if self.micro_batch_size < 0:
            raise ConfigError(f"micro_batch_size must be >= 0 (0 = whole minibatch), got {self.micro_batch_size}")
        if self.minibatch_size < 1 or self.inner_epochs < 1:
            raise ConfigError("minibatch_size and inner_epochs must be at least 1")
        if self.reward_normalization not in ("sum", "per_reward"):
            raise ConfigError(f"reward_normalization must be sum or per_reward, got {self.reward_normalization!r}")


class PerPromptStatTracker:
    """DDPO's per-prompt running reward statistics (a bounded buffer per prompt)."""

    def __init__(self, buffer: int, min_count: int):
        self.buffer, self.min_count = buffer, min_count
        self.history: dict[str, list[float]] = {}

    def advantages(self, rewards: Tensor, prompts: list[str], clip: float) -> Tensor:
        out = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(correction=0)
        for p in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            hist = self.history.setdefault(p, [])
            hist.extend(rewards[idx].tolist())
            del hist[: max(0, len(hist) - self.buffer)]
            if len(hist) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                h = torch.tensor(hist)
                mean, std = h.mean(), h.std(correction=0)
            out[idx] = (rewards[idx] - mean) / (std + 1e-4)
        return out.clamp(-clip, clip)

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}


def _kl(step, ref_step, traj: Trajectory, k: Tensor) -> Tensor:
    if traj.sampler == "flow_sde":
        sigma = traj.sigmas[k]
        std_t = flow_sde_noise_scale(sigma, traj.noise_level, sigma_max=traj.sigmas[1])
        return flow_grpo_kl(step.mean, ref_step.mean, std_t.view(-1, *[1] * (step.mean.ndim - 1)))
    std = step.std.detach().clamp_min(1e-8)
    return ((step.mean - ref_step.mean) ** 2 / (2 * std**2)).flatten(1).mean(1)


class GRPO:
    """PPO-clip policy-gradient update on stored SDE trajectories."""

    name = "grpo"

    def __init__(self, config: GRPOConfig, regularizers: list[Regularizer] | None = None, *,
                 granularity: Granularity | None = None, autocast_bf16: bool = False,
                 auxiliary: Auxiliary | None = None):
        """``auxiliary(policy, generator) → (loss, metrics)``: a loss added once to every
        optimizer step's gradient, before the gradients are averaged over processes and clipped
        (e.g. :class:`~diffalign.algorithms.ptx.RenderReplay`, pretraining-data replay)."""
        self.config = config
        self.auxiliary = auxiliary
        self.regularizers = list(regularizers or [])
        self.granularity = granularity
        self.autocast_bf16 = autocast_bf16
        self.tracker = PerPromptStatTracker(config.running_buffer, config.running_min_count)

    def shared_groups(self, epoch: int, num_groups: int, generator: torch.Generator) -> Tensor | None:
        """Per-group initial-noise sharing for this epoch's rollout (None: the rollout config decides)."""
        return None if self.granularity is None else self.granularity(epoch, num_groups, generator)

    # -- advantages --------------------------------------------------------------------
    def advantages(self, rewards: Tensor, group_ids: Tensor, prompts: list[str], *,
                   components: dict[str, Tensor] | None = None,
                   weights: dict[str, float] | None = None) -> tuple[Tensor, dict]:
        """``components``/``weights``: the multi reward's parts, used when ``reward_normalization`` is ``per_reward``."""
        c = self.config
        if c.reward_normalization == "per_reward":
            if components is None or weights is None or c.advantage != "group":
                raise ConfigError("grpo.reward_normalization=per_reward needs reward: multi (its components) and "
                                  "grpo.advantage=group")
            adv = per_reward_advantages(components, weights, group_ids, std=c.adv_std, clip=c.adv_clip)
        elif c.advantage == "per_prompt_running":
            adv = self.tracker.advantages(rewards, prompts, c.adv_clip)
        else:
            adv = grpo_advantages(rewards, group_ids, std=c.adv_std, clip=c.adv_clip)
        return adv, {"zero_signal_groups": zero_signal_fraction(rewards, group_ids)}

    # -- update ------------------------------------------------------------------------
    def update(self, policy, optimizer: torch.optim.Optimizer, traj: Trajectory, advantages: Tensor,
               generator: torch.Generator) -> dict[str, float]:
        c = self.config
        trainable = traj.sde_mask.nonzero().flatten().cpu()
        if len(trainable) == 0:
            raise ConfigError("the rollout has no stochastic step to train on; set a sampler with noise "
                              "(noise_level > 0) or widen sde_window")
        n_steps = max(1, round(len(trainable) * c.train_fraction))
        b = len(traj)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sums: dict[str, float] = defaultdict(float)
        count = 0
        conds = policy.encode(traj.prompts)
        for _ in range(c.inner_epochs):
            perm = torch.randperm(b, generator=generator)
            order = torch.stack([trainable[torch.randperm(len(trainable), generator=generator)[:n_steps]]
                                 for _ in range(b)])
            for start in range(0, b, c.minibatch_size):
                idx = perm[start : start + c.minibatch_size]
                optimizer.zero_grad(set_to_none=True)
                micro = c.micro_batch_size or len(idx)
                for j in range(n_steps):
                    for s0 in range(0, len(idx), micro):
                        sub = idx[s0 : s0 + micro]
                        k = order[sub, j]
                        loss, m = self._step_loss(policy, traj, sub, k, advantages[sub], conds.index(sub), generator)
                        if len(sub) < len(idx):  # a mean over the minibatch, accumulated by parts
                            loss = loss * (len(sub) / len(idx))
                        (loss / n_steps).backward()
                        for key, v in m.items():
                            sums[key] += float(v)
                        count += 1
                parts = n_steps * -(-len(idx) // micro)  # loss evaluations in this minibatch
                if self.auxiliary is not None:  # once per optimizer step, weighted like grad_norm
                    extra, m = self.auxiliary(policy, generator)
                    extra.backward()
                    for key, v in m.items():
                        sums[key] += float(v) * parts
                # multi-process: gradients averaged over ranks before clipping (sharded or not)
                sums["grad_norm"] += reduce_clip_step(optimizer, params, c.max_grad_norm) * parts
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _step_loss(self, policy, traj: Trajectory, idx: Tensor, k: Tensor, adv: Tensor, cond, generator):
        c = self.config
        step, _, x0 = recompute_step(policy, traj, idx, k, cond=cond, autocast_bf16=self.autocast_bf16)
        loss, metrics = ppo_clip_loss(step.log_prob, traj.log_probs[idx, k], adv, c.clip_range)
        metrics = {key: float(v) for key, v in metrics.items()}
        metrics["policy_loss"] = float(loss.detach())
        if c.beta_kl > 0:
            with torch.no_grad(), policy.reference():
                ref_step, _, _ = recompute_step(policy, traj, idx, k, cond=cond, autocast_bf16=self.autocast_bf16)
            kl = _kl(step, ref_step, traj, k).mean()
            loss = loss + c.beta_kl * kl
            metrics["kl"] = float(kl.detach())
        for reg in self.regularizers:
            if getattr(reg, "needs_policy", False):
                extra, m = reg(traj, idx, k, x0, generator, policy=policy, cond=cond,
                               autocast_bf16=self.autocast_bf16)
            else:
                extra, m = reg(traj, idx, k, x0, generator)
            loss = loss + extra
            metrics.update({key: float(v) for key, v in m.items()})
        return loss, metrics

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
