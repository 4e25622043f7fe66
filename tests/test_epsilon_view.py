"""The ε-view of a flow policy: exact change of variables VP ↔ rectified flow, DDIM on top."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_policy
from torch import nn

from diffalign.models.epsilon_view import (
    EpsilonView,
    ddim_timesteps,
    ddpm_alphas_cumprod,
    flow_sigma_from_alpha_bar,
    flow_to_vp,
    vp_to_flow,
)
from diffalign.sampling.rollout import RolloutConfig, recompute_step, rollout

SHAPE = (4, 3, 5, 5)
PROMPTS = ["a red circle"] * 3 + ["two blue squares"] * 3
GROUPS = [0, 0, 0, 1, 1, 1]




class KnownVelocity(nn.Module):
    """A flow "policy" that knows the true ``x0`` and ``ε`` and returns ``v = ε − x0``; it records
    its inputs so the test can check the state and σ it was asked about."""

    prediction = "flow"

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor):
        super().__init__()
        self.x0, self.eps = x0, eps
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def predict(self, x, t, cond, guidance_scale=1.0):
        self.seen = (x, torch.as_tensor(t))
        return self.eps - self.x0


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    return x0, eps, t


def test_view_returns_the_true_noise_for_the_true_velocity():
    x0, eps, t = _data()
    inner = KnownVelocity(x0, eps)
    view = EpsilonView(inner)
    ab = view.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_vp = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eps_hat = view.predict(x_vp, t, cond=None)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)
    # the flow model was asked about the matching flow state x_σ = (1−σ)·x0 + σ·ε
    x_sigma, sigma = inner.seen
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_sigma, (1 - s) * x0 + s * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma, flow_sigma_from_alpha_bar(view.alphas_cumprod[t]))
    # clean estimates agree: (x_vp − √(1−ᾱ)·ε̂)/√ᾱ = x_σ − σ·v
    torch.testing.assert_close((x_vp - (1 - ab).sqrt() * eps_hat) / ab.sqrt(), x_sigma - s * (eps - x0),
                               atol=1e-4, rtol=1e-4)


def test_scalar_timestep_and_sigma_formula():
    x0, eps, _ = _data(1)
    view = EpsilonView(KnownVelocity(x0, eps))
    ab = float(view.alphas_cumprod[500])
    x_vp = ab**0.5 * x0 + (1 - ab) ** 0.5 * eps
    torch.testing.assert_close(view.predict(x_vp, 500, None), eps, atol=1e-5, rtol=1e-5)
    expected = (1 - ab) ** 0.5 / (ab**0.5 + (1 - ab) ** 0.5)
    assert abs(float(flow_sigma_from_alpha_bar(ab)) - expected) < 1e-6
    assert float(flow_sigma_from_alpha_bar(1.0)) == 0.0 and float(flow_sigma_from_alpha_bar(0.0)) == 1.0


def test_vp_flow_mapping_round_trips():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g)
    ab = torch.rand(SHAPE[0], generator=g) * 0.98 + 0.01
    torch.testing.assert_close(flow_to_vp(vp_to_flow(x, ab), ab), x)
    torch.testing.assert_close(vp_to_flow(flow_to_vp(x, ab), ab), x)
    c = (ab.sqrt() + (1 - ab).sqrt()).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(flow_to_vp(x, ab), c * x)


def test_alphas_cumprod_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(ddpm_alphas_cumprod(), sched.alphas_cumprod.float())


def test_ddim_timesteps_leading_spacing():
    t, ab, ab_prev = ddim_timesteps(10)
    assert t.dtype == torch.long and t.tolist() == list(range(900, -1, -100))
    ac = ddpm_alphas_cumprod()
    torch.testing.assert_close(ab, ac[t])
    torch.testing.assert_close(ab_prev[:-1], ab[1:])
    assert float(ab_prev[-1]) == 1.0
    t1, _, _ = ddim_timesteps(10, steps_offset=1)
    assert t1.tolist() == list(range(901, 0, -100))
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == t1.tolist()


def test_view_delegates_to_the_policy():
    policy = tiny_policy()
    view = EpsilonView(policy)
    assert view.prediction == "epsilon" and view.image_size == policy.image_size
    assert view.latent_shape(32, 32) == (3, 32, 32)
    assert view.trainable_parameters() == policy.trainable_parameters()
    with view.reference():
        pass
    with pytest.raises(ValueError):
        EpsilonView(view)


def test_ddim_rollout_through_the_view_and_ratio_one():
    policy = tiny_policy()
    cfg = RolloutConfig(sampler="ddim", steps=4, noise_level=1.0, guidance_scale=2.0)
    traj = rollout(policy, PROMPTS, GROUPS, cfg, generator=torch.Generator().manual_seed(0))
    t, ab, _ = ddim_timesteps(4)
    assert torch.equal(traj.timesteps, t)
    assert traj.alpha_bars.shape == (5,) and float(traj.alpha_bars[-1]) == 1.0
    torch.testing.assert_close(traj.alpha_bars[:-1], ab)
    assert float(traj.sigmas[-1]) == 0.0 and bool((traj.sigmas[:-1] > 0).all())
    assert bool((traj.log_probs[:, :-1] != 0).all()) and bool((traj.log_probs[:, -1] == 0).all())
    assert bool(torch.isfinite(traj.latents).all()) and traj.images.shape == (6, 3, 32, 32)
    b = len(PROMPTS)
    policy.zero_grad()
    for k in range(4):
        out, eps, x0 = recompute_step(policy, traj, torch.arange(b), torch.full((b,), k))
        ratio = torch.exp(out.log_prob - traj.log_probs[:, k])
        assert float((ratio.detach() - 1).abs().max()) < 1e-6
        torch.testing.assert_close(x0, traj.x0_pred[:, k], atol=1e-5, rtol=1e-5)
        ratio.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in policy.trainable_parameters())
    # the view's x̂0 is the flow policy's x_σ − σ·v̂ at the matching flow state
    k = 1
    ab_k = traj.alpha_bars[k]
    x_sigma = vp_to_flow(traj.latents[:, k], ab_k)
    with torch.no_grad():
        v = policy.predict(x_sigma, traj.sigmas[k], policy.encode(PROMPTS), guidance_scale=2.0)
    torch.testing.assert_close(traj.x0_pred[:, k], x_sigma - traj.sigmas[k] * v, atol=1e-4, rtol=1e-4)
