"""Plain generation (no log-probs): the Euler ODE sampler with batched CFG."""

from __future__ import annotations

import torch

from diffalign.models.base import with_sampling_weights
from diffalign.sampling.steps import flow_sigmas, ode_step


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One independent ``N(0, I)`` draw of ``shape`` per seed: ``(len(seeds), *shape)``.

    Sample ``i`` depends only on ``seeds[i]``, so results do not depend on batch size."""
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g)
    return out


@torch.no_grad()
@with_sampling_weights
def generate(policy, prompts: list[str], seeds: list[int], *, steps: int = 20, cfg: float = 4.5,
             shift: float = 1.0, batch_size: int = 64, progress=None) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] for ``prompts`` with the Euler ODE sampler.

    ``progress``: optional callable ``progress(n_done)`` called after each batch."""
    size = policy.image_size
    shape = policy.latent_shape(size, size)
    sigmas = flow_sigmas(steps, shift)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
        cond = policy.encode(p)
        x = initial_noise(shape, s)
        for k in range(steps):
            v = policy.predict(x, sigmas[k], cond, guidance_scale=cfg)
            x = ode_step(x, v, sigmas[k], sigmas[k + 1])
        out.append(policy.decode(x))
        if progress is not None:
            progress(len(p))
    return torch.cat(out)
