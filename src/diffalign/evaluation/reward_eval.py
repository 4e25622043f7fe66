"""Evaluation of a policy with a reward model (for models outside ShapesWorld).

Fixed prompts (the first ``num_images`` of the evaluation prompt file, cycled) and a fixed
noise seed; the deterministic sampler of the policy's kind (Euler ODE for flow models, DDIM
with η = 0 for ε-models, also when they are trained through a flow view); the mean score is
reported as ``score``.
"""

from __future__ import annotations

import torch

from diffalign.rewards import checked_call
from diffalign.sampling.rollout import RolloutConfig, rollout

__all__ = ["evaluate_with_reward"]


@torch.no_grad()
def evaluate_with_reward(policy, prompts: list[str], reward, *, num_images: int, steps: int,
                         guidance_scale: float, shift: float = 1.0, batch_size: int = 8,
                         seed: int = 0) -> tuple[dict[str, float], torch.Tensor, list[str]]:
    """Score ``num_images`` deterministic samples; returns ``(metrics, images, prompts)``.

    ``metrics``: ``score`` (mean reward), ``score_std`` and the mean of each reward detail."""
    chosen = [prompts[i % len(prompts)] for i in range(num_images)]
    # DDIM for ε-models (also behind a flow view: their native sampler), Euler ODE for flow models
    native_eps = getattr(policy, "prediction", "flow") == "epsilon" or hasattr(policy, "alphas_cumprod")
    sampler = "ddim" if native_eps else "ode"
    cfg = RolloutConfig(sampler=sampler, steps=steps, shift=shift, guidance_scale=guidance_scale, noise_level=0.0,
                        batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    images, scores, details = [], [], {}
    for s in range(0, len(chosen), batch_size):
        part = chosen[s : s + batch_size]
        traj = rollout(policy, part, torch.arange(len(part)), cfg, generator=gen)
        out = checked_call(reward, traj.images, part, [{"group": i} for i in range(len(part))])
        images.append(traj.images.cpu())
        scores.append(out.scores.float().cpu())
        for k, v in out.details.items():
            details.setdefault(k, []).append(v.float().cpu())
    score = torch.cat(scores)
    metrics = {"score": float(score.mean()), "score_std": float(score.std(correction=0))}
    metrics |= {f"reward/{k}": float(torch.cat(v).mean()) for k, v in details.items()}
    return metrics, torch.cat(images), chosen
