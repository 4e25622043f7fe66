"""Pretraining-data replay in the policy-gradient update ("PPO-ptx", Ouyang et al. 2022, §3.5).

Every optimizer step of the GRPO family adds ``weight · L_FM`` to the policy loss, where
``L_FM`` is the base model's own flow-matching loss on a fresh batch of pretraining data:
ShapesWorld renders of training-split prompts, ``x_σ = (1−σ)·x0 + σ·ε``, target ``ε − x0``,
σ from the pretraining distribution, captions dropped to the empty prompt with the
pretraining probability (so the unconditional branch that CFG uses keeps its training).

Why: the RL objective only sees what the policy samples, so it can move the model away from
what pretraining taught (counts, colours) with nothing pulling it back but the KL to a frozen
reference; the replay term keeps the data distribution in every gradient. On ShapesWorld the
base is also under-trained (docs/results.md, round 17), so the term adds data the RL loop
cannot produce: its contribution is measured by a renders-only control with the same budget.

``extra_steps`` adds replay-only optimizer steps after each epoch's update (no rollouts, so
about a second each on the ShapesWorld model): inside the update the term gets only the policy
gradient's few steps per epoch (docs/results.md, round 18).

Multi-process: each process draws its own renders from its own update generator; the
gradients are averaged over processes with the policy gradient's, so ``batch_size`` counts
renders per optimizer step per process, like ``grpo.minibatch_size`` counts samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.algorithms.nft import forward_noising
from diffalign.config import ranged
from diffalign.errors import ConfigError

PTX_TIMESTEPS = ("logit_normal", "uniform")


@dataclass
class PTXConfig:
    """Pretraining-data replay added to each policy-gradient step (weight 0 = off)."""

    weight: float = ranged(0.0, ge=0)
    """Weight of the flow-matching loss on the replayed renders (0 = off)."""
    batch_size: int = ranged(64, ge=1)
    """Renders per optimizer step, per process."""
    split: str = "train"
    """Prompt split the rendered captions come from (each task type of the split equally, as in
    pretraining)."""
    timesteps: str = "logit_normal"
    """σ distribution of the replay loss: ``logit_normal`` (σ = sigmoid(N(0,1)), pretraining's) or ``uniform``."""
    cond_dropout: float = ranged(0.1, ge=0, le=1)
    """Probability of replacing a caption by the empty prompt (pretraining's 0.1 keeps CFG's branch trained)."""
    extra_steps: int = ranged(0, ge=0)
    """Replay-only optimizer steps after each epoch's policy-gradient update (each on its own
    ``batch_size`` renders, loss ``weight · L_FM``, the same gradient clip). Replay inside the
    update gets only the policy gradient's few steps; these cheap steps (no rollouts) add more."""

    def __post_init__(self) -> None:
        if self.timesteps not in PTX_TIMESTEPS:
            raise ConfigError(f"ptx.timesteps must be one of {', '.join(PTX_TIMESTEPS)}, got {self.timesteps!r}")
        if self.split not in ("train", "test", "ood"):
            raise ConfigError(f"ptx.split must be train, test or ood, got {self.split!r}")
        if self.weight < 0 or self.batch_size < 1 or not 0 <= self.cond_dropout <= 1 or self.extra_steps < 0:
            raise ConfigError("ptx.weight must be >= 0, ptx.batch_size >= 1, ptx.cond_dropout in [0, 1] and "
                              "ptx.extra_steps >= 0")


def render_replay_batch(split: str, n: int, image_size: int, generator: torch.Generator,
                        ) -> tuple[list[str], list[int], Tensor]:
    """``n`` captions of ``split`` (task type uniform, then prompt uniform), their render seeds
    and renders ``(n, 3, H, W)`` in [0, 1], every draw from ``generator``."""
    from diffalign.world.grammar import TASKS, prompt_splits
    from diffalign.world.render import render_batch

    pools = [ps for t in TASKS if (ps := prompt_splits()[split][t])]
    task = torch.randint(len(pools), (n,), generator=generator).tolist()
    pick = torch.rand(n, generator=generator).tolist()
    prompts = [pools[t][min(int(u * len(pools[t])), len(pools[t]) - 1)] for t, u in zip(task, pick, strict=True)]
    seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()
    return prompts, seeds, render_batch(prompts, seeds, image_size)


def flow_matching_loss(policy, x0: Tensor, prompts: list[str], generator: torch.Generator, *,
                       timesteps: str = "logit_normal", cond_dropout: float = 0.0,
                       autocast_bf16: bool = False) -> Tensor:
    """The policy's mean flow-matching loss ``mean (v̂(x_σ, σ) − (ε − x0))²`` on clean latents
    ``x0`` with captions ``prompts``; σ, ε and the caption dropout drawn from ``generator``."""
    b = x0.shape[0]
    if timesteps == "logit_normal":
        sigma = torch.sigmoid(torch.randn(b, generator=generator))
    else:
        sigma = torch.rand(b, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    drop = torch.rand(b, generator=generator) < cond_dropout
    cond = policy.encode([("" if d else p) for p, d in zip(prompts, drop.tolist(), strict=True)])
    sigma = sigma.to(x0.device)
    x_t, v_target = forward_noising(x0, sigma, noise.to(x0.device))
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        v = policy.predict(x_t, sigma, cond)
    return ((v.float() - v_target.float()) ** 2).mean()


class RenderReplay:
    """``(policy, generator) → (weighted loss, metrics)``: the replay term of one optimizer step."""

    def __init__(self, config: PTXConfig, *, autocast_bf16: bool = False):
        self.config = config
        self.autocast_bf16 = autocast_bf16

    def __call__(self, policy, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        size = getattr(policy, "image_size", None)
        if size is None or not hasattr(policy, "encode_images"):
            raise ConfigError("ptx replays ShapesWorld renders and needs the tiny model (model_family: tiny); "
                              "set ptx.weight: 0 for other model families")
        prompts, _, images = render_replay_batch(c.split, c.batch_size, size, generator)
        device = next(iter(policy.trainable_parameters())).device
        x0 = policy.encode_images(images.to(device))
        loss = flow_matching_loss(policy, x0, prompts, generator, timesteps=c.timesteps,
                                  cond_dropout=c.cond_dropout, autocast_bf16=self.autocast_bf16)
        return c.weight * loss, {"ptx/loss": float(loss.detach())}

    def extra_steps(self, policy, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    max_grad_norm: float, n: int | None = None) -> dict[str, float]:
        """``n`` (default ``config.extra_steps``) replay-only optimizer steps (gradients averaged
        over processes, then clipped); returns their mean loss and gradient norm (empty when
        there are none)."""
        from diffalign.sharding import reduce_clip_step

        n = self.config.extra_steps if n is None else n
        if n == 0:
            return {}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        loss_sum = norm_sum = 0.0
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss, m = self(policy, generator)
            loss.backward()
            norm_sum += reduce_clip_step(optimizer, params, max_grad_norm)
            loss_sum += m["ptx/loss"]
        return {"ptx/extra_loss": loss_sum / n, "ptx/extra_grad_norm": norm_sum / n}
