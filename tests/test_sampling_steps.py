"""Exact math of the sampler steps (ALGORITHMS.md §1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from diffalign.sampling import (
    StepOutput,
    block_coordinates,
    block_noise_step,
    block_project,
    cps_step,
    dance_sde_step,
    ddim_step,
    flow_sde_noise_scale,
    flow_sde_step,
    flow_sigmas,
    ode_step,
    time_shift,
)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SHAPE = (3, 2, 2, 2)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g))


def _normal_log_prob(out: StepOutput) -> torch.Tensor:
    lp = Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.prev_sample)
    return lp.mean(dim=(1, 2, 3))


# Each entry: a step with its schedule arguments bound, returning StepOutput from (x, model_out, **kw).
STEPS = {
    "flow_sde": lambda x, v, **kw: flow_sde_step(x, v, 0.6, 0.4, 0.7, **kw),
    "flow_sde_at_one": lambda x, v, **kw: flow_sde_step(x, v, 1.0, 0.9, 0.7, sigma_max=0.9, **kw),
    "dance_sde": lambda x, v, **kw: dance_sde_step(x, v, 0.6, 0.4, 0.3, **kw),
    "cps": lambda x, v, **kw: cps_step(x, v, 0.6, 0.4, 0.7, **kw),
    "ddim": lambda x, e, **kw: ddim_step(x, e, 0.4, 0.6, 1.0, **kw),
}


# --------------------------------------------------------------------------- invariants, every step


@pytest.mark.parametrize("name", sorted(STEPS))
def test_log_prob_matches_torch_normal(name: str) -> None:
    x, v, noise = _inputs()
    out = STEPS[name](x, v, noise=noise)
    assert out.log_prob.shape == (SHAPE[0],)
    assert out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * noise)
    torch.testing.assert_close(out.log_prob, _normal_log_prob(out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_rescoring_sample_gives_identical_log_prob(name: str) -> None:
    x, v, _ = _inputs(1)
    torch.manual_seed(123)
    drawn = STEPS[name](x, v)
    scored = STEPS[name](x, v, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.prev_sample, drawn.prev_sample)
    assert torch.equal(scored.log_prob, drawn.log_prob)
    assert torch.equal(torch.exp(scored.log_prob - drawn.log_prob), torch.ones(SHAPE[0]))


@pytest.mark.parametrize("name", sorted(STEPS))
def test_bf16_inputs_give_float32_outputs(name: str) -> None:
    x, v, noise = _inputs(2)
    out = STEPS[name](x.bfloat16(), v.bfloat16(), noise=noise.bfloat16())
    ref = STEPS[name](x.bfloat16().float(), v.bfloat16().float(), noise=noise.bfloat16().float())
    for field in ("prev_sample", "mean", "std", "log_prob"):
        assert getattr(out, field).dtype == torch.float32
        torch.testing.assert_close(getattr(out, field), getattr(ref, field))
    assert ode_step(x.bfloat16(), v.bfloat16(), 0.5, 0.25).dtype == torch.float32


def test_log_prob_gradient_flows_through_mean_only() -> None:
    x, v, noise = _inputs(3)
    v = v.requires_grad_()
    out = flow_sde_step(x, v, 0.6, 0.4, 0.7, noise=noise)
    # d/dv of −(x'−μ)²/(2s²) with x' detached is (x'−μ)/s² · dμ/dv, nonzero.
    (grad,) = torch.autograd.grad(out.log_prob.sum(), v)
    assert grad.abs().sum() > 0


# --------------------------------------------------------------------------- per-sample sigmas


def test_per_sample_sigmas_equal_per_sample_loop() -> None:
    x, v, noise = _inputs(4)
    sigma = torch.tensor([1.0, 0.8, 0.5])
    sigma_next = torch.tensor([0.9, 0.6, 0.2])
    alpha_bar = torch.tensor([0.1, 0.5, 0.9])
    alpha_bar_prev = torch.tensor([0.3, 0.7, 0.95])
    cases = [
        (lambda a, b, s, sn, **kw: flow_sde_step(a, b, s, sn, 0.7, sigma_max=0.9, **kw), sigma, sigma_next),
        (lambda a, b, s, sn, **kw: dance_sde_step(a, b, s, sn, 0.3, **kw), sigma, sigma_next),
        (lambda a, b, s, sn, **kw: cps_step(a, b, s, sn, 0.7, **kw), sigma, sigma_next),
        (lambda a, b, s, sn, **kw: ddim_step(a, b, s, sn, 1.0, **kw), alpha_bar, alpha_bar_prev),
    ]
    for step, s, sn in cases:
        batched = step(x, v, s, sn, noise=noise)
        for i in range(SHAPE[0]):
            single = step(x[i : i + 1], v[i : i + 1], float(s[i]), float(sn[i]), noise=noise[i : i + 1])
            torch.testing.assert_close(batched.prev_sample[i : i + 1], single.prev_sample)
            torch.testing.assert_close(batched.mean[i : i + 1], single.mean)
            torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
    batched_ode = ode_step(x, v, sigma, sigma_next)
    for i in range(SHAPE[0]):
        torch.testing.assert_close(
            batched_ode[i : i + 1],
            ode_step(x[i : i + 1], v[i : i + 1], float(sigma[i]), float(sigma_next[i])),
        )


def test_zero_dim_tensor_sigmas_equal_floats() -> None:
    x, v, noise = _inputs(5)
    a = flow_sde_step(x, v, torch.tensor(0.6), torch.tensor(0.4), 0.7, noise=noise)
    b = flow_sde_step(x, v, 0.6, 0.4, 0.7, noise=noise)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)


def test_bad_sigma_shape_raises() -> None:
    x, v, _ = _inputs()
    with pytest.raises(ValueError, match="per-sample"):
        ode_step(x, v, torch.tensor([0.5, 0.4]), 0.2)


# --------------------------------------------------------------------------- flow SDE


def test_flow_sde_hand_computed() -> None:
    # x=1, v=0.5, σ=0.5, σ_next=0.25, a=0.5: s_t = 0.5·sqrt(0.5/0.5) = 0.5, dt = −0.25
    # μ = 1·(1 + 0.25/1·(−0.25)) + 0.5·(1 + 0.25·0.5/1)·(−0.25) = 0.9375 − 0.140625 = 0.796875
    # s = 0.5·sqrt(0.25) = 0.25; noise 2 → x' = 1.296875
    # log_prob = −0.5²/(2·0.25²) − log 0.25 − ½ log 2π = −2 + 1.3862944 − 0.9189385
    out = flow_sde_step(
        torch.tensor([[1.0]]), torch.tensor([[0.5]]), 0.5, 0.25, 0.5, noise=torch.tensor([[2.0]])
    )
    assert out.mean.item() == pytest.approx(0.796875, abs=1e-7)
    assert out.std.item() == pytest.approx(0.25, abs=1e-7)
    assert out.prev_sample.item() == pytest.approx(1.296875, abs=1e-7)
    assert out.log_prob.item() == pytest.approx(-2.0 + math.log(4.0) - HALF_LOG_2PI, abs=1e-6)


def test_flow_sde_at_sigma_one_uses_sigma_max() -> None:
    # σ=1, σ_max=0.75, a=0.5: s_t = 0.5·sqrt(1/0.25) = 1; dt = −0.25
    # μ = 1·(1 + 1/2·(−0.25)) + 0.5·(1 + 0)·(−0.25) = 0.875 − 0.125 = 0.75; s = 1·0.5
    out = flow_sde_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 1.0, 0.75, 0.5, sigma_max=0.75)
    assert out.mean.item() == pytest.approx(0.75, abs=1e-7)
    assert out.std.item() == pytest.approx(0.5, abs=1e-7)
    assert flow_sde_noise_scale(1.0, 0.5, sigma_max=0.75).item() == pytest.approx(1.0)
    # per-sample: only the sample at σ = 1 uses σ_max
    s_t = flow_sde_noise_scale(torch.tensor([1.0, 0.5]), 0.5, sigma_max=0.75)
    torch.testing.assert_close(s_t, torch.tensor([1.0, 0.5]))


def test_flow_sde_at_sigma_one_without_sigma_max_raises() -> None:
    x, v, _ = _inputs()
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(x, v, 1.0, 0.9, 0.7)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(x, v, torch.tensor([0.5, 1.0, 0.5]), 0.4, 0.7)


def test_flow_sde_noise_level_zero_is_ode_step() -> None:
    x, v, _ = _inputs(6)
    for sigma, sigma_next in [(1.0, 0.9), (0.6, 0.4), (0.2, 0.0)]:
        out = flow_sde_step(x, v, sigma, sigma_next, 0.0, sigma_max=0.9)
        ode = ode_step(x, v, sigma, sigma_next)
        assert torch.equal(out.mean, ode)
        assert torch.equal(out.prev_sample, ode)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        rescored = flow_sde_step(x, v, sigma, sigma_next, 0.0, sigma_max=0.9, prev_sample=ode)
        assert torch.equal(rescored.log_prob, torch.zeros(SHAPE[0]))


def test_ode_step_is_euler() -> None:
    out = ode_step(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), 0.75, 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.875, 2.25]]))


# --------------------------------------------------------------------------- Dance SDE


def test_dance_sde_hand_computed() -> None:
    # x=1, v=0.5, σ=0.5, σ_next=0.25, η=0.5: x̂0 = 0.75, score = −(1 − 0.5·0.75)/0.25 = −2.5
    # μ = 1 − 0.25·0.5 + (−½·0.25·(−2.5))·(−0.25) = 0.875 − 0.078125 = 0.796875; s = 0.5·sqrt(0.25)
    out = dance_sde_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 0.5, 0.25, 0.5)
    assert out.mean.item() == pytest.approx(0.796875, abs=1e-7)
    assert out.std.item() == pytest.approx(0.25, abs=1e-7)


def test_dance_sde_is_flow_sde_with_matching_noise_scale() -> None:
    # Both are Euler–Maruyama steps of the same SDE; they agree when η = s_t = a·sqrt(σ/(1−σ)).
    x, v, noise = _inputs(7)
    sigma, sigma_next, a = 0.6, 0.4, 0.7
    eta = a * math.sqrt(sigma / (1 - sigma))
    flow = flow_sde_step(x, v, sigma, sigma_next, a, noise=noise)
    dance = dance_sde_step(x, v, sigma, sigma_next, eta, noise=noise)
    torch.testing.assert_close(flow.mean, dance.mean)
    torch.testing.assert_close(flow.log_prob, dance.log_prob)


def test_dance_sde_eta_zero_is_ode_step() -> None:
    x, v, _ = _inputs(8)
    out = dance_sde_step(x, v, 0.6, 0.4, 0.0)
    torch.testing.assert_close(out.prev_sample, ode_step(x, v, 0.6, 0.4), rtol=0, atol=1e-6)
    assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))


# --------------------------------------------------------------------------- CPS


def test_cps_std_and_mean_formula() -> None:
    # x=1, v=0.5, σ=0.5, σ_next=0.25, a=0.5: s = 0.25·sin(π/4); x̂0 = 0.75; ε̂ = 1 + 0.5·0.5 = 1.25
    # μ = 0.75·0.75 + 1.25·sqrt(0.0625 − s²)
    out = cps_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), 0.5, 0.25, 0.5)
    s = 0.25 * math.sin(math.pi / 4)
    assert out.std.item() == pytest.approx(s, abs=1e-7)
    assert out.mean.item() == pytest.approx(0.5625 + 1.25 * math.sqrt(0.0625 - s * s), abs=1e-6)
    # per-sample std = σ_next·sin(a·π/2)
    x, v, _ = _inputs()
    sn = torch.tensor([0.5, 0.3, 0.1])
    out = cps_step(x, v, torch.tensor([0.6, 0.4, 0.2]), sn, 0.7)
    torch.testing.assert_close(out.std.flatten(), sn * math.sin(0.7 * math.pi / 2))


def test_cps_deterministic_cases() -> None:
    x, v, _ = _inputs(9)
    # a = 0: equals the ODE step up to rounding
    out = cps_step(x, v, 0.6, 0.4, 0.0)
    torch.testing.assert_close(out.prev_sample, ode_step(x, v, 0.6, 0.4), rtol=0, atol=1e-6)
    assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
    # last step to σ_next = 0: s = 0, x' = x̂0, log_prob 0 by convention
    last = cps_step(x, v, 0.2, 0.0, 0.7)
    torch.testing.assert_close(last.prev_sample, x - 0.2 * v)
    assert torch.equal(last.log_prob, torch.zeros(SHAPE[0]))


# --------------------------------------------------------------------------- DDIM


def test_ddim_hand_computed() -> None:
    ab, abp = 0.5, 0.8
    x0 = (1 - math.sqrt(1 - ab) * 0.5) / math.sqrt(ab)
    var = (1 - abp) / (1 - ab) * (1 - ab / abp)  # 0.4·0.375 = 0.15
    mean = math.sqrt(abp) * x0 + math.sqrt(1 - abp - var) * 0.5
    out = ddim_step(torch.tensor([[1.0]]), torch.tensor([[0.5]]), ab, abp, 1.0)
    assert out.std.item() == pytest.approx(math.sqrt(0.15), abs=1e-7)
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)


def test_ddim_eta_zero_is_deterministic_ddim() -> None:
    x, eps, _ = _inputs(10)
    ab = torch.tensor([0.2, 0.5, 0.7])
    abp = torch.tensor([0.4, 0.6, 0.9])
    out = ddim_step(x, eps, ab, abp, 0.0)
    ab4, abp4 = ab.view(-1, 1, 1, 1), abp.view(-1, 1, 1, 1)
    x0 = (x - (1 - ab4).sqrt() * eps) / ab4.sqrt()
    expected = abp4.sqrt() * x0 + (1 - abp4).sqrt() * eps
    torch.testing.assert_close(out.prev_sample, expected)
    torch.testing.assert_close(out.mean, expected)
    assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))


# --------------------------------------------------------------------------- schedules


def test_time_shift_and_flow_sigmas() -> None:
    assert time_shift(0.5, 3.0) == pytest.approx(0.75)
    assert time_shift(1.0, 2.7) == 1.0 and time_shift(0.0, 2.7) == 0.0
    torch.testing.assert_close(flow_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    sig = flow_sigmas(4, shift=3.0)
    assert sig.dtype == torch.float32 and sig.shape == (5,)
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert flow_sigmas(10, shift=2.7)[0].item() == 1.0
    with pytest.raises(ValueError):
        flow_sigmas(0)


# --------------------------------------------------------------------------- coarse (block) noise


def _block_step(pool: int, name: str = "flow_sde", **kw) -> tuple[StepOutput, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    step = STEPS[name](x, v, noise=noise)
    det = ode_step(x, v, *((1.0, 0.9) if name == "flow_sde_at_one" else (0.6, 0.4)))
    return block_noise_step(step, det, pool, noise=noise, **kw), step, det


def test_block_noise_pool_one_is_the_isotropic_step() -> None:
    out, step, _ = _block_step(1)
    assert out is step


@pytest.mark.parametrize("name", ["flow_sde", "flow_sde_at_one", "dance_sde"])
def test_block_noise_log_prob_is_normal_over_block_coordinates(name: str) -> None:
    out, step, det = _block_step(4, name)
    # The mean keeps the ODE step off the blocks and the projected score correction on them.
    torch.testing.assert_close(out.mean, det + block_project(step.mean - det, 4))
    resid = out.prev_sample - out.mean
    assert torch.allclose(resid, block_project(resid, 4), atol=1e-6)  # noise only along blocks
    u = block_coordinates(resid, 4)  # (2, 3, 2, 2): k = 12 coordinates per sample
    assert u.shape == (2, 3, 2, 2)
    expected = Normal(torch.zeros_like(u), step.std.expand(2, 1, 1, 1).expand_as(u)).log_prob(u).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    # Coordinates are orthonormal: block-mean × pool, i.e. ‖Uᵀt‖ = ‖P t‖.
    t = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(block_coordinates(t, 4).square().sum(), block_project(t, 4).square().sum())


def test_block_noise_rescoring_and_gradient_through_the_mean() -> None:
    drawn, _, _ = _block_step(2)
    g = torch.Generator().manual_seed(7)
    x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    v.requires_grad_(True)
    step = flow_sde_step(x, v, 0.6, 0.4, 0.7, prev_sample=drawn.prev_sample)
    scored = block_noise_step(step, ode_step(x, v, 0.6, 0.4), 2, prev_sample=drawn.prev_sample)
    assert torch.equal(scored.prev_sample, drawn.prev_sample)
    torch.testing.assert_close(scored.log_prob, drawn.log_prob, rtol=0, atol=1e-6)
    scored.log_prob.sum().backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0


def test_block_noise_bad_pool_raises() -> None:
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="divisible by pool=4"):
        block_project(x, 4)
    with pytest.raises(ValueError, match="pool must be >= 1"):
        block_coordinates(x, 0)


@pytest.mark.parametrize("pool", [1, 2])
def test_block_noise_sde_keeps_the_ode_marginals(pool: int) -> None:
    """Gaussian data ``x0 ~ N(m, c²I)`` has a closed-form velocity; integrating the block-noise
    SDE from pure noise must return the data's mean, variance and zero within-block correlation
    (an isotropic drift correction with block noise would not)."""
    m, c, n, steps = 0.3, 0.5, 20000, 200
    g = torch.Generator().manual_seed(0)
    sig = flow_sigmas(steps)

    def velocity(x: torch.Tensor, s: float) -> torch.Tensor:
        var = (1 - s) ** 2 * c**2 + s**2
        x0 = m + (1 - s) * c**2 / var * (x - (1 - s) * m)
        return (x - x0) / s

    x = torch.randn(n, 1, 2, 2, generator=g)
    for k in range(steps):
        s, s_next = float(sig[k]), float(sig[k + 1])
        v = velocity(x, s)
        noise = torch.randn(x.shape, generator=g)
        if s_next == 0:
            x = ode_step(x, v, s, s_next)
            continue
        step = flow_sde_step(x, v, s, s_next, 0.7, sigma_max=float(sig[1]), noise=noise)
        x = block_noise_step(step, ode_step(x, v, s, s_next), pool, noise=noise).prev_sample
    flat = x.reshape(n, 4)
    assert abs(float(flat.mean()) - m) < 0.02
    assert abs(float(flat.var()) - c**2) < 0.02
    corr = torch.corrcoef(flat.T)
    assert float((corr - torch.eye(4)).abs().max()) < 0.05
