"""The forward-process family's update step: CRD and DiffusionNFT (ALGORITHMS.md §3).

Forward-process methods need no trajectories or log-probabilities. Rollouts come from a
snapshot of the policy with any sampler, and only the clean samples are stored
(:func:`~diffalign.sampling.clean.sample_clean`). One call of :meth:`ForwardProcess.update`::

    r01 = clip(A, ±5)/10 + 0.5                                  (A: group advantages)
    for each inner epoch:
        shuffle the prompt groups; split them into optimizer steps of whole groups
        for each optimizer step:
            for each micro-batch of whole groups, for each of the T fresh draws:
                σ ~ time-shifted U(0, 1), ε ~ N(0, I)           (per sample)
                x_σ = (1−σ)·x0 + σ·ε,  v* = ε − x0
                v_θ (grad), v_old ("old" snapshot), v_ref^cfg (adapters off, CFG w)
                CRD:  L = crd_loss(r̂_θ(v_θ, v_old, v*), r01) + reward_adaptive_kl(v_θ, v_ref^cfg)
                NFT:  L = nft_loss(v_θ, v_old, x_σ, x0, σ, r01) + β_KL·mean‖v_θ − v_ref‖²
                backward(L · share of the step's samples / T)   (gradient accumulation)
            clip the gradient norm; optimizer step
            old ← d_old(n)·old + (1 − d_old(n))·θ;  sampler ← d_s(n)·sampler + (1 − d_s(n))·θ

``n`` is the 0-based index of the optimizer step just taken (kept in :meth:`state_dict`, so a
resumed run continues the decay schedules exactly). With ``tie_snapshots`` one snapshot,
``old``, both samples and serves the implicit reward (DiffusionNFT's choice; CRD's ablation).

Micro-batches hold whole prompt groups, so CRD's within-group centring never needs a gather;
in multi-process runs each rank holds whole groups as well (DESIGN.md), and the gradients of
each optimizer step are averaged over ranks before clipping. Every rank must then take the same
number of optimizer steps: give each the same number of groups. All random draws come from
the caller's generator.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor

from diffalign.algorithms.crd import crd_implicit_reward, crd_loss, reward_adaptive_kl, rewards_to_unit
from diffalign.algorithms.decay import make_decay_schedule
from diffalign.algorithms.forward_config import CRDConfig, ForwardConfig, NFTConfig
from diffalign.algorithms.grpo import grpo_advantages, zero_signal_fraction
from diffalign.algorithms.nft import forward_noising, nft_loss, sample_training_sigmas
from diffalign.errors import ConfigError
from diffalign.sampling.clean import CleanSamples, sample_clean
from diffalign.sampling.rollout import RolloutConfig
from diffalign.sharding import reduce_clip_step

__all__ = ["CRDConfig", "ForwardConfig", "ForwardProcess", "NFTConfig"]


class ForwardProcess:
    """Forward-process update (``loss="crd"`` or ``"nft"``) on clean samples."""

    def __init__(self, loss: Literal["crd", "nft"], config: CRDConfig | NFTConfig, *,
                 autocast_bf16: bool = False):
        if loss not in ("crd", "nft"):
            raise ConfigError(f"forward-process loss must be 'crd' or 'nft'; got {loss!r}")
        want = CRDConfig if loss == "crd" else NFTConfig
        if not isinstance(config, want):
            raise ConfigError(f"loss {loss!r} needs a {want.__name__}; got {type(config).__name__}")
        self.name = loss
        self.config = config
        self.autocast_bf16 = autocast_bf16
        self.old_schedule = make_decay_schedule(config.old_decay)
        self.sampler_schedule = make_decay_schedule(config.sampler_decay)
        self.step = 0
        """Optimizer steps taken so far (indexes the decay schedules)."""

    @property
    def sampler_snapshot(self) -> str:
        """Name of the snapshot that makes the rollouts."""
        return "old" if self.config.tie_snapshots else "sampler"

    def ensure_snapshots(self, policy) -> None:
        """Create the ``old`` (and ``sampler``) snapshots from the current policy if absent."""
        for name in dict.fromkeys(("old", self.sampler_snapshot)):
            if not policy.has_snapshot(name):
                policy.save_snapshot(name)

    # -- rollout -----------------------------------------------------------------------
    def shared_groups(self, epoch: int, num_groups: int, generator: torch.Generator) -> Tensor | None:
        """No per-group noise schedule: the rollout config decides."""
        return None

    def rollout(self, policy, prompts: list[str], group_ids: Tensor, config: RolloutConfig, *,
                generator: torch.Generator, shared_groups: Tensor | None = None) -> CleanSamples:
        """Clean samples from the sampler snapshot with any sampler (no trajectory is kept)."""
        self.ensure_snapshots(policy)
        with policy.use_snapshot(self.sampler_snapshot):
            return sample_clean(policy, prompts, group_ids, config, generator=generator,
                                shared_groups=shared_groups)

    @staticmethod
    def cat_rollouts(parts: list[CleanSamples]) -> CleanSamples:
        return CleanSamples.cat(parts)

    # -- advantages --------------------------------------------------------------------
    def advantages(self, rewards: Tensor, group_ids: Tensor, prompts: list[str], *,
                   components: dict[str, Tensor] | None = None,
                   weights: dict[str, float] | None = None) -> tuple[Tensor, dict]:
        """Group advantages of the (summed) reward; ``r01`` is derived from them in :meth:`update`."""
        c = self.config
        if components is not None or weights is not None:
            raise ConfigError("per-reward normalisation is a GRPO option; crd / diffusion_nft normalise the "
                              "summed reward: set grpo.reward_normalization=sum")
        adv = grpo_advantages(rewards, group_ids, std=c.adv_std, clip=c.adv_clip)
        return adv, {"zero_signal_groups": zero_signal_fraction(rewards, group_ids)}

    # -- update ------------------------------------------------------------------------
    def update(self, policy, optimizer: torch.optim.Optimizer, samples: CleanSamples, advantages: Tensor,
               generator: torch.Generator) -> dict[str, float]:
        """Train on ``samples`` (see the module docstring); returns batch-mean metrics."""
        c = self.config
        self.ensure_snapshots(policy)
        device = samples.latents.device
        r01 = rewards_to_unit(advantages, clip=c.adv_clip).to(device=device, dtype=torch.float32)
        group_index = samples.group_index().cpu()
        num_groups = int(group_index.max()) + 1
        members = [torch.nonzero(group_index == g).flatten() for g in range(num_groups)]
        per_step = c.groups_per_step or num_groups
        params = [p for g in optimizer.param_groups for p in g["params"]]
        conds = policy.encode(samples.prompts)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)

        def log(metrics: dict[str, float]) -> None:
            for k, v in metrics.items():
                sums[k] += float(v)
                counts[k] += 1

        for _ in range(c.inner_epochs):
            order = torch.randperm(num_groups, generator=generator)
            for s in range(0, num_groups, per_step):
                step_groups = order[s : s + per_step]
                idx = torch.cat([members[int(g)] for g in step_groups])
                n = len(idx)
                sigmas = torch.stack([sample_training_sigmas(n, c.time_shift, generator, sigma_min=c.sigma_min)
                                      for _ in range(c.timesteps_per_sample)])  # (T, n)
                noise = torch.randn((c.timesteps_per_sample, n, *samples.latents.shape[1:]), generator=generator)
                optimizer.zero_grad(set_to_none=True)
                for m in range(0, len(step_groups), c.groups_per_microbatch):
                    mb_idx = torch.cat([members[int(g)] for g in step_groups[m : m + c.groups_per_microbatch]])
                    pos = torch.arange(len(mb_idx)) + sum(len(members[int(g)]) for g in step_groups[:m])
                    for t in range(c.timesteps_per_sample):
                        loss, metrics = self._loss(policy, samples, mb_idx, conds.index(mb_idx.to(device)),
                                                   r01, sigmas[t, pos].to(device), noise[t, pos].to(device))
                        (loss * (len(mb_idx) / n) / c.timesteps_per_sample).backward()
                        log(metrics)
                # multi-process: gradients averaged over ranks before clipping (sharded or not)
                log({"grad_norm": reduce_clip_step(optimizer, params, c.max_grad_norm)})
                if c.snapshot_update == "step":
                    log(self._update_snapshots(policy, self.step))
                self.step += 1
        if c.snapshot_update == "epoch":
            log(self._update_snapshots(policy, self.step - 1))
        return {k: v / counts[k] for k, v in sums.items()}

    def _loss(self, policy, samples: CleanSamples, idx: Tensor, cond, r01_all: Tensor, sigma: Tensor,
              noise: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The loss of one micro-batch ``idx`` at one draw ``(σ, ε)``: policy term + KL anchor."""
        c = self.config
        dev_idx = idx.to(samples.latents.device)
        x0, r01 = samples.latents[dev_idx], r01_all[dev_idx]
        x_t, v_target = forward_noising(x0, sigma, noise)
        autocast = torch.autocast(x_t.device.type, dtype=torch.bfloat16) if self.autocast_bf16 else nullcontext()
        with torch.no_grad(), autocast:
            with policy.use_snapshot("old"):
                v_old = policy.predict(x_t, sigma, cond).float()
            v_ref = None
            if c.beta_kl > 0:
                with policy.reference():
                    v_ref = policy.predict(x_t, sigma, cond, guidance_scale=c.kl_guidance).float()
        with autocast:
            v_theta = policy.predict(x_t, sigma, cond).float()

        if self.name == "crd":
            r_hat = crd_implicit_reward(v_theta, v_old, v_target, adaptive=c.adaptive_weight)
            loss, m = crd_loss(r_hat, r01, samples.group_ids[dev_idx], c.beta, centering=c.centering, form=c.form)
            beta_min = c.beta_min
        else:
            loss, m = nft_loss(v_theta, v_old, x_t, x0, sigma, r01, c.beta)
            beta_min = c.beta_kl
        metrics = {f"{self.name}/{k}": float(v) for k, v in m.items() if k != "loss"}
        metrics["policy_loss"] = float(loss.detach())
        if v_ref is not None:
            kl_loss, km = reward_adaptive_kl(v_theta, v_ref, r01, c.beta_kl, beta_min)
            loss = loss + kl_loss
            metrics |= {"kl": float(km["kl_mean"]), "kl_loss": float(kl_loss.detach()),
                        "kl_coef_mean": float(km["kl_coef_mean"])}
        metrics["loss"] = float(loss.detach())
        metrics["train_sigma_mean"] = float(sigma.mean())
        return loss, metrics

    def _update_snapshots(self, policy, step: int) -> dict[str, float]:
        """EMA the snapshots towards θ with the decays of optimizer step ``step``."""
        d_old = self.old_schedule(max(step, 0))
        policy.ema_snapshot("old", d_old)
        out = {"old_decay": d_old}
        if not self.config.tie_snapshots:
            d_s = self.sampler_schedule(max(step, 0))
            policy.ema_snapshot("sampler", d_s)
            out["sampler_decay"] = d_s
        return out

    # -- checkpoint state --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
