"""CPGO's placement (``cpgo.steps``), tested on a flow whose right answer is known in closed form.

Data ``x0 ~ N(m, c²I)`` per pixel has the exact clean estimate ``x̂0(x, σ) = m + a(σ)·u`` with
``u = x − (1−σ)m``, ``a(σ) = (1−σ)c²/V(σ)``, ``V(σ) = (1−σ)²c² + σ²`` (the variance of ``u``). The
test policy is that exact model plus one learnable slope offset per step, ``x̂0 = m + (a + δ_k)·u``,
so ``∂L/∂δ_k`` at ``δ = 0`` is the pull CPGO puts on the exact model at step ``k``. Every transition
of the sampler is linear, ``u_{k+1} = α_k·u_k + s_k·ε``, so with ``L = mean_d (x̂0_θ(x_k) −
x̂0(x_{k+1}))²`` the expected pull is ``E[∂L/∂δ_k] = 2·V_k·(a_k − a_{k+1}·α_k)``: zero only if the
clean estimate is a martingale along the sampler.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffalign.algorithms.consistent_rft import CPGOConfig, CPGORegularizer
from diffalign.errors import ConfigError
from diffalign.sampling import flow_sde_step, ode_step
from diffalign.sampling.rollout import RolloutConfig, predict_x0, recompute_step, rollout

M, C = 0.3, 0.5


def _a(s: float) -> float:
    return (1 - s) * C**2 / ((1 - s) ** 2 * C**2 + s**2)


def _v(s: float) -> float:
    return (1 - s) ** 2 * C**2 + s**2


class _Cond:
    def __init__(self, n: int):
        self.n = n

    def index(self, idx):
        return _Cond(len(torch.as_tensor(idx).reshape(-1)))


class GaussianFlow(nn.Module):
    """The exact velocity for Gaussian data, plus a learnable slope offset ``δ_k`` per step."""

    prediction = "flow"
    image_size = 2

    def __init__(self, sigmas: torch.Tensor):
        super().__init__()
        self.register_buffer("sigmas", sigmas[:-1].clone())
        self.delta = nn.Parameter(torch.zeros(len(sigmas) - 1))

    def latent_shape(self, h: int, w: int) -> tuple[int, ...]:
        return (1, h, w)

    def encode(self, prompts):
        return _Cond(len(prompts))

    def decode(self, x):
        return x

    def predict(self, x, t, cond, guidance_scale=1.0):
        s = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        k = (s[:, None] - self.sigmas[None]).abs().argmin(1)
        s = s.view(-1, 1, 1, 1)
        a = (1 - s) * C**2 / ((1 - s) ** 2 * C**2 + s**2) + self.delta[k].view(-1, 1, 1, 1)
        x0 = M + a * (x - (1 - s) * M)
        return (x - x0) / s


def _setup(n: int = 4000, seed: int = 0):
    cfg = RolloutConfig(sampler="flow_sde", steps=10, noise_level=0.7, guidance_scale=1.0, sde_window=(0, 2),
                        init_noise="independent", batch_size=n)
    from diffalign.sampling import flow_sigmas

    policy = GaussianFlow(flow_sigmas(10))
    traj = rollout(policy, ["x"] * n, torch.zeros(n, dtype=torch.long), cfg, generator=torch.Generator().manual_seed(seed))
    return policy, traj


def _alpha(traj, k: int) -> float:
    """``α_k = ∂u_{k+1}/∂u_k`` of the step the rollout ran at ``k`` (its mean; linear in ``x``)."""
    s, s1 = float(traj.sigmas[k]), float(traj.sigmas[k + 1])
    x = torch.tensor([[[[0.0]]], [[[1.0]]]]) + (1 - s) * M
    a = _a(s)
    v = (x - (M + a * (x - (1 - s) * M))) / s
    if bool(traj.sde_mask[k]):
        mean = flow_sde_step(x, v, s, s1, 0.7, sigma_max=float(traj.sigmas[1]), noise=torch.zeros_like(x)).mean
    else:
        mean = ode_step(x, v, s, s1)
    return float(mean[1] - mean[0])


def _pull(policy, loss) -> torch.Tensor:
    policy.zero_grad()
    loss.backward()
    return policy.delta.grad.clone()


def test_predict_x0_matches_the_rollout_at_every_step():
    policy, traj = _setup(64)
    idx = torch.arange(64).repeat(10)
    k = torch.arange(10).repeat_interleave(64)
    with torch.no_grad():
        torch.testing.assert_close(predict_x0(policy, traj, idx, k), traj.x0_pred[idx, k], atol=1e-6, rtol=1e-6)
        _, _, x0 = recompute_step(policy, traj, idx[:128], k[:128])  # the SDE steps agree with recompute_step
        torch.testing.assert_close(predict_x0(policy, traj, idx[:128], k[:128]), x0)
    with pytest.raises(ValueError, match="step_idx"):
        predict_x0(policy, traj, [0], [10])


def test_trained_placement_at_sigma_one_pulls_the_exact_model_to_copy_its_input_noise():
    """At σ = 1 the exact estimate ignores the input (a_0 = 0: the data mean); CPGO on the trained
    SDE step pulls its slope to ``−2·V_0·a_1·α_0 < 0`` per unit λ, i.e. gradient descent makes
    x̂0(x_1) copy the initial noise; and the target carries the injected SDE noise."""
    policy, traj = _setup()
    n = len(traj)
    idx, k = torch.arange(n), torch.zeros(n, dtype=torch.long)
    _, _, x0 = recompute_step(policy, traj, idx, k)
    reg = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=1.0, prob=1.0, distance="mse", steps="trained"))
    loss, _ = reg(traj, idx, k, x0, torch.Generator().manual_seed(0))
    grad = _pull(policy, loss)
    want = 2 * _v(1.0) * (_a(1.0) - _a(0.9) * _alpha(traj, 0))
    assert _a(1.0) == 0 and want < 0
    assert float(grad[0]) == pytest.approx(want, rel=0.1)
    assert grad[1:].abs().max() == 0
    # the target minus its mean given x_0 is a_1·(x_1 − μ_0): the SDE's injected noise, scaled
    u1 = traj.latents[:, 1] - (1 - 0.9) * M
    u0 = traj.latents[:, 0] - M * 0
    injected = u1 - _alpha(traj, 0) * u0
    target_noise = traj.next_x0_pred()[:, 0] - (M + _a(0.9) * _alpha(traj, 0) * u0)
    torch.testing.assert_close(target_noise, _a(0.9) * injected, atol=1e-4, rtol=1e-4)
    assert float(injected.std()) > 0.1


def test_gated_placement_acts_only_below_the_gate_and_matches_the_closed_form():
    policy, traj = _setup()
    n = len(traj)
    reg = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.6, prob=1.0, distance="mse", steps="gated"))
    assert reg.needs_policy and reg.gated_steps(traj).tolist() == [4, 5, 6, 7, 8, 9]
    idx = torch.arange(n)
    loss, m = reg(traj, idx, torch.zeros(n, dtype=torch.long), None, torch.Generator().manual_seed(1),
                  policy=policy, cond=_Cond(n))
    assert m["cpgo_applied"].item() == 1.0
    grad = _pull(policy, loss)
    assert grad[:4].abs().max() == 0  # σ > 0.6: never
    # at an ODE step the pull is exact, sample by sample: 2·(a_k − a_{k+1}·α_k)·u_k², no noise term
    chosen, kk = reg.draw(traj, n, torch.Generator().manual_seed(1))
    for k in range(4, 9):
        s, s1 = float(traj.sigmas[k]), float(traj.sigmas[k + 1])
        u2 = (traj.latents[chosen[kk == k], k] - (1 - s) * M).pow(2).flatten(1).mean(1)
        want = 2 * (_a(s) - _a(s1) * _alpha(traj, k)) * float(u2.sum()) / n
        assert float(grad[k]) == pytest.approx(want, rel=1e-4)
        assert want < 0  # the exact model is pulled too: towards a sharper x̂0 (the flow map), not a martingale
    # the last step's target is the final sample, which the Euler step puts exactly at x̂0(x_9): no pull
    assert abs(float(grad[9])) < 1e-6
    # ODE steps: the target is a function of x_k alone (no injected noise): a fixed x_k gives one target
    assert not bool(traj.sde_mask[4:].any())


def test_gated_placement_probability_scaling_and_errors():
    policy, traj = _setup(200)
    n = len(traj)
    idx = torch.arange(n)
    full = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.6, prob=1.0, distance="mse", steps="gated"))
    part = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.6, prob=0.2, distance="mse", steps="gated"))
    none = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.6, prob=0.0, distance="mse", steps="gated"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lf, _ = full(traj, idx, idx, None, g, policy=policy, cond=_Cond(n))
        lp, mp = part(traj, idx, idx, None, g, policy=policy, cond=_Cond(n))
        l0, m0 = none(traj, idx, idx, None, g, policy=policy, cond=_Cond(n))
    # a mean over the minibatch: samples not chosen count as 0, so the loss scales with the probability
    assert 0.05 < mp["cpgo_applied"].item() < 0.35
    assert float(lp) == pytest.approx(float(lf) * mp["cpgo_applied"].item(), rel=0.5)
    assert float(l0) == 0.0 and m0["cpgo_applied"].item() == 0.0
    with pytest.raises(ConfigError, match="raise the gate"):
        CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.05, steps="gated")).gated_steps(traj)
    with pytest.raises(ConfigError, match="cpgo.steps"):
        CPGOConfig(steps="everywhere")
    with pytest.raises(ValueError, match="needs the policy"):
        full(traj, idx, idx, None, g)


def test_known_answer_benchmark_agrees_with_the_rollout(tmp_path):
    """benchmarks/cpgo_known_answer.py (the table in docs/results.md) computes the same α_k as the
    library's rollout and the same closed-form pull the tests above measure."""
    from tiny import load_benchmark

    bench = load_benchmark("cpgo_known_answer")
    out = bench.main(["--json", str(tmp_path / "ka.json")])
    rows = out["rows"]
    _, traj = _setup(8)
    for r in rows:
        k = r["k"]
        assert r["alpha"] == pytest.approx(_alpha(traj, k), rel=1e-5)
        assert r["sde"] == bool(traj.sde_mask[k]) and (r["target_noise_std"] > 0) == r["sde"]
        if k < 9:
            assert r["pull"] == pytest.approx(2 * _v(r["sigma"]) * (_a(r["sigma"]) - _a(float(traj.sigmas[k + 1])) * r["alpha"]),
                                              rel=1e-5)
    assert rows[0]["slope"] == 0 and rows[0]["relative_pull"] is None and rows[9]["pull"] == 0
    assert (tmp_path / "ka.json").exists()


def test_cpgo_fixed_point_known_answers():
    """Iterated CPGO (each update's target from the previous policy) drives the gated slopes to
    ``b_k = b_{k+1}·α_k(b_k)``. With the Euler ODE step ``α_k(b) = 1 + dt·(1 − b)/σ_k`` and the last
    step's exact slope ``b_9 = a(0.1) = 18/17`` left alone (its target is its own estimate), step 8
    (σ 0.2, dt −0.1) solves ``b = (18/17)·(1/2 + b/2)``: ``b_8 = 9/8``. The sampler at that fixed
    point passes the initial noise through: final variance far above the data's."""
    from tiny import load_benchmark

    bench = load_benchmark("cpgo_known_answer")
    fp = bench.fixed_point(placement="gated", gate=0.6)
    assert fp["steps_acted_on"] == [4, 5, 6, 7, 8]
    assert fp["fixed_point_slopes"][9] == pytest.approx(18 / 17)
    assert fp["fixed_point_slopes"][8] == pytest.approx(9 / 8, rel=1e-6)
    # step 7 (σ 0.3, dt −0.1): b = (9/8)·(2/3 + b/3) → b = 6/5
    assert fp["fixed_point_slopes"][7] == pytest.approx(6 / 5, rel=1e-6)
    assert fp["fixed_point_slopes"][:4] == pytest.approx(fp["exact_slopes"][:4])
    assert fp["exact_model_final_var"] == pytest.approx(0.2304, abs=2e-3)  # the 10-step sampler's own variance
    assert fp["fixed_point_final_var"] > 4 * fp["data_var"]
    # on the two SDE steps at σ 1.0, 0.9 the fixed point hardly moves the samples
    tr = bench.fixed_point(placement="trained", gate=1.0)
    assert tr["steps_acted_on"] == [0, 1]
    assert tr["fixed_point_final_var"] == pytest.approx(tr["exact_model_final_var"], abs=0.01)
    # the authors' own placement (SDE on every step, CPGO on those with σ ≤ 0.6) leaks noise too
    au = bench.fixed_point(window=(0, 10), placement="trained", gate=0.6)
    assert au["steps_acted_on"] == [4, 5, 6, 7, 8] and au["fixed_point_final_var"] > 2 * au["data_var"]
