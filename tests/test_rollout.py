"""The rollout loop and step re-scoring (ALGORITHMS.md §1–2) on a tiny random flow policy."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_policy

from diffalign.errors import ConfigError
from diffalign.models.tiny import TinyFlowPolicy
from diffalign.sampling.rollout import RolloutConfig, Trajectory, recompute_step, rollout
from diffalign.sampling.steps import block_project, ode_step

PROMPTS = ["a red circle"] * 3 + ["two blue squares"] * 3
GROUPS = [0, 0, 0, 1, 1, 1]
STEPS = 4




@pytest.fixture(scope="module")
def policy() -> TinyFlowPolicy:
    return tiny_policy()


def run(policy, seed: int = 0, shared_groups=None, **kw) -> Trajectory:
    cfg = RolloutConfig(**{"steps": STEPS, "guidance_scale": 2.0, "shift": 3.0, **kw})
    return rollout(policy, PROMPTS, GROUPS, cfg, generator=torch.Generator().manual_seed(seed),
                   shared_groups=shared_groups)


def test_trajectory_shapes_and_dtypes(policy):
    traj = run(policy)
    b, t = len(PROMPTS), STEPS
    assert len(traj) == b and traj.num_steps == t and traj.num_groups == 2
    assert traj.latents.shape == (b, t + 1, 3, 32, 32) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (b, t) and traj.log_probs.dtype == torch.float32
    assert traj.x0_pred.shape == (b, t, 3, 32, 32) and traj.x0_pred.dtype == torch.float32
    assert traj.sigmas.shape == (t + 1,) and traj.sigmas[0] == 1 and traj.sigmas[-1] == 0
    assert traj.sde_mask.dtype == torch.bool and bool(traj.sde_mask.all())
    assert traj.group_ids.dtype == torch.long and traj.group_ids.tolist() == GROUPS
    assert traj.shared_noise.tolist() == [False, False]
    assert traj.images.shape == (b, 3, 32, 32) and traj.images.dtype == torch.float32
    assert 0 <= float(traj.images.min()) and float(traj.images.max()) <= 1
    assert traj.timesteps is None and traj.alpha_bars is None
    assert (traj.sampler, traj.noise_level, traj.guidance_scale) == ("flow_sde", 0.7, 2.0)
    assert bool((traj.log_probs != 0).all()) and bool(torch.isfinite(traj.log_probs).all())
    assert torch.equal(traj.images, policy.decode(traj.latents[:, -1]))


def test_rollout_is_reproducible_and_batch_size_independent(policy):
    a, b = run(policy, seed=1), run(policy, seed=1)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    c = run(policy, seed=2)
    assert not torch.allclose(a.latents, c.latents)
    small = run(policy, seed=1, batch_size=2)
    torch.testing.assert_close(small.latents, a.latents, atol=1e-5, rtol=1e-5)


def test_shared_initial_noise_within_groups(policy):
    traj = run(policy, init_noise="shared")
    x0 = traj.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[0], x0[2]) and torch.equal(x0[3], x0[5])
    assert not torch.allclose(x0[0], x0[3])
    assert traj.shared_noise.tolist() == [True, True]
    assert not torch.allclose(traj.latents[0, -1], traj.latents[1, -1])  # SDE noise still differs


def test_independent_initial_noise(policy):
    x0 = run(policy, init_noise="independent").latents[:, 0]
    for i in range(len(PROMPTS)):
        for j in range(i):
            assert not torch.allclose(x0[i], x0[j])


def test_init_seed_fixes_the_initial_noise_across_calls_but_not_the_sde_noise(policy):
    a = run(policy, seed=1, init_noise="shared", init_seed=7)
    b = run(policy, seed=2, init_noise="shared", init_seed=7)
    assert torch.equal(a.latents[:, 0], b.latents[:, 0])  # same starting points in every call (epoch)
    assert not torch.allclose(a.latents[:, -1], b.latents[:, -1])  # fresh SDE noise
    assert torch.equal(a.latents[0, 0], a.latents[2, 0]) and not torch.allclose(a.latents[0, 0], a.latents[3, 0])
    other = run(policy, seed=1, init_noise="shared", init_seed=8)
    assert not torch.allclose(other.latents[:, 0], a.latents[:, 0])
    # without it the starting points follow the rollout generator, as before
    assert not torch.allclose(run(policy, seed=1).latents[:, 0], run(policy, seed=2).latents[:, 0])


def test_shared_groups_override(policy):
    traj = run(policy, init_noise="independent", shared_groups=torch.tensor([False, True]))
    x0 = traj.latents[:, 0]
    assert not torch.allclose(x0[0], x0[1])
    assert torch.equal(x0[3], x0[4]) and torch.equal(x0[3], x0[5])
    assert traj.shared_noise.tolist() == [False, True]
    assert traj.sample_shared_noise().tolist() == [False] * 3 + [True] * 3
    # switching one group's granularity leaves the other group's noise untouched
    indep = run(policy, init_noise="independent").latents[:, 0]
    assert torch.equal(x0[:3], indep[:3])
    with pytest.raises(ValueError, match="shared_groups"):
        run(policy, shared_groups=torch.tensor([True, False, True]))


def test_sde_window_steps_outside_are_ode(policy):
    traj = run(policy, sde_window=(1, 3))
    assert traj.sde_mask.tolist() == [False, True, True, False]
    assert bool((traj.log_probs[:, [0, 3]] == 0).all()) and bool((traj.log_probs[:, 1:3] != 0).all())
    cond = policy.encode(PROMPTS)
    for k in (0, 3):
        v = policy.predict(traj.latents[:, k], traj.sigmas[k], cond, guidance_scale=2.0)
        expected = ode_step(traj.latents[:, k], v, traj.sigmas[k], traj.sigmas[k + 1])
        torch.testing.assert_close(traj.latents[:, k + 1], expected, atol=1e-5, rtol=1e-5)


def test_noise_level_zero_is_the_ode_sampler(policy):
    sde, ode = run(policy, noise_level=0.0), run(policy, sampler="ode")
    assert torch.equal(sde.latents, ode.latents)
    assert bool((sde.log_probs == 0).all()) and bool((ode.log_probs == 0).all())
    assert not bool(ode.sde_mask.any())


@pytest.mark.parametrize(("sampler", "pool"), [("flow_sde", 1), ("dance_sde", 1), ("cps", 1), ("flow_sde", 4),
                                             ("dance_sde", 8)])
def test_recompute_gives_ratio_one_and_gradients(policy, sampler, pool):
    level = 0.3 if sampler == "dance_sde" else 0.7
    traj = run(policy, sampler=sampler, noise_level=level, sde_window=(0, 3), noise_pool=pool)
    assert traj.noise_pool == pool
    b = len(PROMPTS)
    g = torch.Generator().manual_seed(0)
    steps = torch.stack([torch.randperm(STEPS, generator=g) for _ in range(b)])  # own order per sample
    policy.zero_grad()
    for j in range(STEPS):
        sample_idx, step_idx = torch.arange(b), steps[:, j]
        out, v, x0 = recompute_step(policy, traj, sample_idx, step_idx)
        old = traj.log_probs[sample_idx, step_idx]
        ratio = torch.exp(out.log_prob - old)
        assert float((ratio.detach() - 1).abs().max()) < 1e-6
        assert v.shape == (b, 3, 32, 32) and x0.shape == (b, 3, 32, 32)
        (-(ratio * torch.linspace(-1, 1, b)).mean()).backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(gr is not None for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)
    policy.zero_grad()


def test_rollout_with_merged_lora_weights_rescored_by_the_adapted_model_has_ratio_one():
    """Rollouts sample with the LoRA deltas merged into the weights (``sampling_weights``); the
    update re-scores with the adapted UNet and gradients: the on-policy ratio is still 1."""
    lora = tiny_policy(lora_rank=4)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    traj = run(lora, sde_window=(0, 3))
    b = len(PROMPTS)
    for k in range(3):
        out, _, _ = recompute_step(lora, traj, torch.arange(b), torch.full((b,), k))
        assert out.log_prob.requires_grad
        assert float((torch.exp(out.log_prob.detach() - traj.log_probs[:, k]) - 1).abs().max()) < 1e-6
    with torch.no_grad(), lora.reference():  # and the adapters do change the samples
        base = run(lora, sde_window=(0, 3))
    assert float((base.latents[:, -1] - traj.latents[:, -1]).abs().max()) > 1e-3


def test_block_noise_rollout(policy):
    """``noise_pool``: each SDE step's deviation from its mean is constant on pool × pool blocks,
    the ODE steps are untouched, and noise level 0 is still the ODE sampler."""
    traj = run(policy, noise_pool=4, sde_window=(0, 2))
    iso = run(policy, sde_window=(0, 2))
    assert torch.equal(traj.latents[:, 0], iso.latents[:, 0])  # same initial noise
    assert not torch.allclose(traj.latents[:, 1], iso.latents[:, 1])
    for k in range(2):
        with torch.no_grad():
            step, _, _ = recompute_step(policy, traj, torch.arange(len(PROMPTS)), torch.full((len(PROMPTS),), k))
        resid = traj.latents[:, k + 1] - step.mean
        assert float(resid.abs().max()) > 1e-3
        assert torch.allclose(resid, block_project(resid, 4), atol=1e-5)
    assert bool((traj.log_probs[:, 2:] == 0).all()) and bool((traj.log_probs[:, :2] != 0).all())
    ode = run(policy, sampler="ode")
    assert torch.equal(run(policy, noise_level=0.0, noise_pool=4).latents, ode.latents)


def test_recompute_subset_matches(policy):
    traj = run(policy)
    idx, k = torch.tensor([5, 0, 3]), torch.tensor([2, 0, 3])
    with torch.no_grad():
        out, _, _ = recompute_step(policy, traj, idx, k)
    assert float((out.log_prob - traj.log_probs[idx, k]).abs().max()) < 1e-6


def test_recompute_sees_changed_parameters():
    changed = tiny_policy()
    traj = run(changed)
    with torch.no_grad():
        for p in changed.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 1e-3)
        out, _, _ = recompute_step(changed, traj, torch.arange(6), torch.full((6,), 1))
    assert float((out.log_prob - traj.log_probs[:, 1]).abs().max()) > 1e-5


def test_x0_pred_is_the_clean_estimate(policy):
    traj = run(policy)
    k = 2
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v = policy.predict(traj.latents[:, k], traj.sigmas[k], cond, guidance_scale=2.0)
        _, v_re, x0_re = recompute_step(policy, traj, torch.arange(len(PROMPTS)), torch.full((6,), k))
    expected = traj.latents[:, k] - traj.sigmas[k] * v
    torch.testing.assert_close(traj.x0_pred[:, k], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_re, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_re, v, atol=1e-5, rtol=1e-5)
    nxt = traj.next_x0_pred()
    assert torch.equal(nxt[:, 0], traj.x0_pred[:, 1]) and torch.equal(nxt[:, -1], traj.latents[:, -1])


def test_bf16_autocast_rollout_returns_float32(policy):
    traj = run(policy, autocast_bf16=True)
    for t in (traj.latents, traj.log_probs, traj.x0_pred, traj.images):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    out, v, _ = recompute_step(policy, traj, torch.arange(6), torch.ones(6, dtype=torch.long), autocast_bf16=True)
    assert out.log_prob.dtype == torch.float32 and v.dtype == torch.float32


def test_select_and_to(policy):
    traj = run(policy, shared_groups=torch.tensor([True, False]))
    sub = traj.select(torch.tensor([4, 1, 2]))
    assert sub.prompts == [PROMPTS[4], PROMPTS[1], PROMPTS[2]]
    assert torch.equal(sub.latents, traj.latents[[4, 1, 2]]) and torch.equal(sub.log_probs, traj.log_probs[[4, 1, 2]])
    assert sub.sample_shared_noise().tolist() == [False, True, True]
    assert torch.equal(sub.sigmas, traj.sigmas) and sub.num_steps == STEPS
    only_second = traj.select(torch.tensor(GROUPS) == 1)
    assert only_second.shared_noise.tolist() == [False] and len(only_second) == 3
    moved = traj.to("cpu")
    assert torch.equal(moved.latents, traj.latents) and moved.sampler == traj.sampler


def test_config_and_input_errors(policy):
    with pytest.raises(ConfigError, match="sampler"):
        RolloutConfig(sampler="euler")
    with pytest.raises(ConfigError, match="sde_window"):
        RolloutConfig(steps=4, sde_window=(2, 6))
    with pytest.raises(ConfigError, match="init_noise"):
        RolloutConfig(init_noise="mixed")
    with pytest.raises(ConfigError, match="flow_sde and dance_sde"):
        RolloutConfig(sampler="cps", noise_pool=2)
    with pytest.raises(ConfigError, match="noise_pool must be >= 1"):
        RolloutConfig(noise_pool=0)
    with pytest.raises(ConfigError, match="must divide the latent"):
        rollout(policy, PROMPTS, GROUPS, RolloutConfig(steps=1, noise_pool=5), generator=torch.Generator())
    with pytest.raises(ValueError, match="group-contiguous"):
        rollout(policy, PROMPTS, [0, 1, 0, 1, 0, 1], RolloutConfig(steps=1), generator=torch.Generator())


def test_antithetic_noise_mirrors_pairs_within_groups():
    from diffalign.sampling.rollout import _mirror

    noise = torch.randn(7, 2)
    out = _mirror(noise, torch.tensor([0, 0, 0, 1, 1, 1, 1]))
    # group 0: members 0,1 mirrored, 2 unpaired; group 1: (3,4), (5,6) mirrored
    assert torch.equal(out[[0, 2, 3, 5]], noise[[0, 2, 3, 5]])
    assert torch.equal(out[1], -noise[0]) and torch.equal(out[4], -noise[3]) and torch.equal(out[6], -noise[5])


def test_antithetic_rollout_pairs_share_noise_with_opposite_sign(policy):
    """With shared initial noise and one SDE step, each pair's first transition deviates from its
    (common) mean by opposite amounts; the other draws are unchanged."""
    traj = run(policy, antithetic=True, init_noise="shared", sde_window=(0, 1), noise_pool=2)
    plain = run(policy, init_noise="shared", sde_window=(0, 1), noise_pool=2)
    with torch.no_grad():
        step, _, _ = recompute_step(policy, traj, torch.arange(6), torch.zeros(6, dtype=torch.long))
    dev = traj.latents[:, 1] - step.mean
    assert float(dev[0].abs().max()) > 1e-3
    torch.testing.assert_close(dev[1], -dev[0])
    torch.testing.assert_close(dev[4], -dev[3])
    torch.testing.assert_close(traj.latents[[0, 2, 3, 5], 1], plain.latents[[0, 2, 3, 5], 1])
    assert not torch.allclose(traj.latents[1, 1], plain.latents[1, 1])
