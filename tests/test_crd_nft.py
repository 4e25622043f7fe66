"""Exact math of the forward-process family: CRD and DiffusionNFT (ALGORITHMS.md §3).

Every expected number is derived by hand in the comments; tensors are float64 so the
comparisons are tight.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.algorithms import (
    crd_implicit_reward,
    crd_loss,
    forward_noising,
    make_decay_schedule,
    nft_loss,
    old_decay,
    reward_adaptive_kl,
    rewards_to_unit,
    sample_training_sigmas,
    sampler_decay,
)
from diffalign.errors import ConfigError

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --------------------------------------------------------------------------- crd_loss

# two prompt groups of two samples
GROUPS = torch.tensor([0, 0, 1, 1])
R_HAT = [1.0, 3.0, -2.0, 0.0]  # group means 2, −1 → R̂ = [−1, 1, −1, 1]
R01 = [0.2, 0.6, 0.9, 0.5]  # group means 0.4, 0.7 → R = [−0.2, 0.2, 0.2, −0.2]
BETA = 0.5


def test_crd_loss_hand_value_group_centering() -> None:
    # β·R̂ − R = [−0.5+0.2, 0.5−0.2, −0.5−0.2, 0.5+0.2] = [−0.3, 0.3, −0.7, 0.7]
    # mean of squares = (0.09 + 0.09 + 0.49 + 0.49)/4 = 0.29;  L = (5/0.5)·0.29 = 2.9
    loss, metrics = crd_loss(t(R_HAT), t(R01), GROUPS, BETA)
    torch.testing.assert_close(loss, t(2.9))
    torch.testing.assert_close(metrics["loss"], t(2.9))
    torch.testing.assert_close(metrics["implicit_reward_mean"], t(0.5))  # mean of raw r̂
    torch.testing.assert_close(metrics["implicit_reward_std"], t(1.0))  # R̂ = ±1
    # Σ R̂·R = 0.2 + 0.2 − 0.2 − 0.2 = 0 → no correlation
    torch.testing.assert_close(metrics["reward_corr"], t(0.0))
    assert all(not m.requires_grad for m in metrics.values())


def test_crd_loss_batch_centering_hand_value_differs() -> None:
    # batch means: r̂ 0.5, r01 0.55 → R̂ = [0.5, 2.5, −2.5, −0.5], R = [−0.35, 0.05, 0.35, −0.05]
    # β·R̂ − R = [0.6, 1.2, −1.6, −0.2]; squares 0.36 + 1.44 + 2.56 + 0.04 = 4.4 → mean 1.1 → L = 11
    loss, _ = crd_loss(t(R_HAT), t(R01), GROUPS, BETA, centering="batch")
    torch.testing.assert_close(loss, t(11.0))
    group_loss, _ = crd_loss(t(R_HAT), t(R01), GROUPS, BETA, centering="group")
    assert not torch.isclose(loss, group_loss)


def test_crd_loss_invariant_to_per_group_constants() -> None:
    base, _ = crd_loss(t(R_HAT), t(R01), GROUPS, BETA)
    shift = t([7.0, 7.0, -3.0, -3.0])  # a constant per group (the unknown β·log Z(c))
    shifted_r_hat, _ = crd_loss(t(R_HAT) + shift, t(R01), GROUPS, BETA)
    shifted_r01, _ = crd_loss(t(R_HAT), t(R01) + 0.01 * shift, GROUPS, BETA)
    torch.testing.assert_close(shifted_r_hat, base)
    torch.testing.assert_close(shifted_r01, base)
    one = t([0.0, 0.0, 0.3, 0.0])  # the same on a single sample is not a group constant
    assert not torch.isclose(crd_loss(t(R_HAT) + one, t(R01), GROUPS, BETA)[0], base)
    assert not torch.isclose(crd_loss(t(R_HAT), t(R01) + one, GROUPS, BETA)[0], base)


def test_crd_loss_group_ids_need_not_be_contiguous_or_dense() -> None:
    perm = [2, 0, 3, 1]
    ids = torch.tensor([4, 4, 10, 10])[perm]
    loss, _ = crd_loss(t(R_HAT)[perm], t(R01)[perm], ids, BETA)
    torch.testing.assert_close(loss, t(2.9))


def test_crd_loss_mse_gradient_hand_value() -> None:
    # dL/dr̂_i = (5/β)·(2/B)·β·(β·R̂_i − R_i) = (10/4)·[−0.3, 0.3, −0.7, 0.7]
    r_hat = t(R_HAT).requires_grad_()
    crd_loss(r_hat, t(R01), GROUPS, BETA)[0].backward()
    torch.testing.assert_close(r_hat.grad, t([-0.75, 0.75, -1.75, 1.75]))


def _bce(x: float, target: float) -> float:
    return math.log1p(math.exp(x)) - target * x


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_crd_loss_bce_hand_value() -> None:
    # logits β·R̂ = [−0.5, 0.5, −0.5, 0.5], targets σ(R) = σ([−0.2, 0.2, 0.2, −0.2])
    logits = [-0.5, 0.5, -0.5, 0.5]
    targets = [_sig(-0.2), _sig(0.2), _sig(0.2), _sig(-0.2)]
    expected = sum(_bce(x, y) for x, y in zip(logits, targets, strict=True)) / 4
    loss, _ = crd_loss(t(R_HAT), t(R01), GROUPS, BETA, form="bce")
    torch.testing.assert_close(loss, t(expected))


def test_crd_loss_gradient_only_through_non_centred_part() -> None:
    # one group of three (with two, centred values are ±a and the residuals cancel by symmetry):
    # r̂ = [0, 1, 5] → R̂ = [−2, −1, 3];  r01 = [0.1, 0.2, 0.9] → R = [−0.3, −0.2, 0.5];  β = 1
    # bce: with sg(mean) each grad is (β/B)·(σ(β·R̂_i) − σ(R_i)); these do not sum to 0, so a
    # gradient through the group mean would have changed them (it would centre them).
    r_hat = t([0.0, 1.0, 5.0]).requires_grad_()
    ids = torch.zeros(3, dtype=torch.long)
    expected = [(_sig(x) - _sig(y)) / 3 for x, y in ((-2.0, -0.3), (-1.0, -0.2), (3.0, 0.5))]
    crd_loss(r_hat, t([0.1, 0.2, 0.9]), ids, 1.0, form="bce")[0].backward()
    torch.testing.assert_close(r_hat.grad, t(expected))
    assert abs(sum(expected)) > 1e-3
    # mse: grad_i = (10/B)·(β·R̂_i − R_i) = (10/3)·[−1.7, −0.8, 2.5]
    r_hat.grad = None
    crd_loss(r_hat, t([0.1, 0.2, 0.9]), ids, 1.0)[0].backward()
    torch.testing.assert_close(r_hat.grad, t([-17 / 3, -8 / 3, 25 / 3]))


def test_crd_loss_correlation_metric_and_bad_inputs() -> None:
    r01 = t([0.1, 0.3, 0.6, 0.2])
    _, metrics = crd_loss(2 * r01 + 5, r01, GROUPS, 1.0)  # R̂ = 2R exactly
    torch.testing.assert_close(metrics["reward_corr"], t(1.0))
    with pytest.raises(ValueError, match="beta"):
        crd_loss(t(R_HAT), t(R01), GROUPS, 0.0)
    with pytest.raises(ValueError, match="centering"):
        crd_loss(t(R_HAT), t(R01), GROUPS, 1.0, centering="prompt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="form"):
        crd_loss(t(R_HAT), t(R01), GROUPS, 1.0, form="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reward01"):
        crd_loss(t(R_HAT), t(R01[:3]), GROUPS, 1.0)


# --------------------------------------------------------------------------- implicit reward

V_TARGET = t([[0.0, 0.0], [1.0, 1.0]])
V_THETA = t([[1.0, -3.0], [1.0, 1.0]])
V_OLD = t([[2.0, 2.0], [2.0, 0.0]])


def test_crd_implicit_reward_adaptive_hand_value() -> None:
    # sample 0: θ err [1, −3]: mean sq 5, w 2 → 2.5; old err [2, 2]: mean sq 4, w 2 → 2;  r̂ = −0.5
    # sample 1: θ err 0 → 0 (w clamped to 1e-5); old err [1, −1]: mean sq 1, w 1 → 1;  r̂ = 1
    v = V_THETA.clone().requires_grad_()
    r_hat = crd_implicit_reward(v, V_OLD, V_TARGET)
    torch.testing.assert_close(r_hat, t([-0.5, 1.0]))
    # w_θ is a stop-gradient: d r̂_0/dv = −2·err/(D·w) = −2·[1, −3]/(2·2)
    r_hat[0].backward()
    torch.testing.assert_close(v.grad, t([[-0.5, 1.5], [0.0, 0.0]]))


def test_crd_implicit_reward_plain_and_zero_on_policy() -> None:
    # w = 1: sample 0 → −(5 − 4) = −1, sample 1 → −(0 − 1) = 1
    torch.testing.assert_close(crd_implicit_reward(V_THETA, V_OLD, V_TARGET, adaptive=False), t([-1.0, 1.0]))
    for adaptive in (True, False):
        zero = crd_implicit_reward(V_OLD, V_OLD, V_TARGET, adaptive=adaptive)
        torch.testing.assert_close(zero, t([0.0, 0.0]))


# --------------------------------------------------------------------------- reward-adaptive KL


def test_reward_adaptive_kl_hand_value_and_constant_form() -> None:
    # KL = per-sample mean of squares = [1, 2]; r01 = [0, 1]
    v = t([[1.0, 1.0], [0.0, 2.0]]).requires_grad_()
    ref = torch.zeros(2, 2, dtype=F64)
    r01 = t([0.0, 1.0])
    # m = 0.01/0.1 = 0.1, c = [0.1, 1] → L = 0.1·mean(0.1·1, 1·2) = 0.1·1.05
    loss, metrics = reward_adaptive_kl(v, ref, r01, 0.1, 0.01)
    torch.testing.assert_close(loss, t(0.105))
    torch.testing.assert_close(metrics["kl_mean"], t(1.5))
    torch.testing.assert_close(metrics["kl_coef_mean"], t((0.01 + 0.1) / 2))
    # constant-KL ablation: c = 1 → 0.1·mean(1, 2)
    loss_const, _ = reward_adaptive_kl(v, ref, r01, 0.1, 0.1)
    torch.testing.assert_close(loss_const, t(0.15))
    torch.testing.assert_close(reward_adaptive_kl(v, ref, r01, 0.0, 0.0)[0], t(0.0))
    with pytest.raises(ValueError, match="beta_min"):
        reward_adaptive_kl(v, ref, r01, 0.1, 0.2)


def test_rewards_to_unit() -> None:
    torch.testing.assert_close(rewards_to_unit(t([-7.0, -5.0, 0.0, 2.5, 9.0])), t([0.0, 0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(rewards_to_unit(t([1.0]), clip=1.0), t([1.0]))


# --------------------------------------------------------------------------- decay schedules


@pytest.mark.parametrize(
    ("step", "old", "sampler"),
    [(0, 0.25, 0.0), (74, 0.62, 0.0), (75, 0.625, 0.0), (100, 0.75, 0.1875), (10_000, 0.999, 0.999)],
)
def test_decay_schedules(step: int, old: float, sampler: float) -> None:
    assert old_decay(step) == pytest.approx(old)
    assert sampler_decay(step) == pytest.approx(sampler)
    assert make_decay_schedule("crd_old")(step) == pytest.approx(old)
    assert make_decay_schedule(" CRD_Sampler ")(step) == pytest.approx(sampler)
    assert make_decay_schedule("linear:0.25,0.005,0,0.999")(step) == pytest.approx(old)
    assert make_decay_schedule("linear: 0, 0.0075, 75, 0.999")(step) == pytest.approx(sampler)
    assert make_decay_schedule("constant:0.9")(step) == pytest.approx(0.9)


def test_nft_decay_preset() -> None:
    nft = make_decay_schedule("nft")  # DiffusionNFT decay_type 1: min(0.001·step, 0.5)
    assert [nft(s) for s in (0, 100, 500, 10_000)] == pytest.approx([0.0, 0.1, 0.5, 0.5])


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "ema",
        "crd",
        "constant:",
        "constant:1.5",
        "constant:a",
        "constant:0.1,0.2",
        "linear:1,2,3",
        "linear:0,0.1,2.5,0.9",
        "linear:0,0.1,-1,0.9",
        "linear:0,0.1,0,2",
        "linear:nan,0,0,1",
        0.9,
    ],
)
def test_bad_decay_spec(spec: object) -> None:
    with pytest.raises(ConfigError, match="valid decay schedules"):
        make_decay_schedule(spec)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- DiffusionNFT

# sample 0: x0 [1, 0], ε [0, 2], σ 0.5  → x_σ [0.5, 1],    v* [−1, 2]
# sample 1: x0 [0, 0], ε [1, −1], σ 0.25 → x_σ [0.25, −0.25], v* [1, −1]
X0 = t([[1.0, 0.0], [0.0, 0.0]])
EPS = t([[0.0, 2.0], [1.0, -1.0]])
SIGMA = t([0.5, 0.25])
NFT_V_THETA = t([[-1.0, 1.0], [1.0, -1.0]])
NFT_V_OLD = t([[0.0, 2.0], [3.0, -1.0]])
NFT_R01 = t([0.75, 0.25])


def test_forward_noising_identities() -> None:
    x_t, v = forward_noising(X0, SIGMA, EPS)
    torch.testing.assert_close(x_t, t([[0.5, 1.0], [0.25, -0.25]]))
    torch.testing.assert_close(v, t([[-1.0, 2.0], [1.0, -1.0]]))
    torch.testing.assert_close(x_t - SIGMA[:, None] * v, X0)  # x̂0 from the true velocity is x0
    torch.testing.assert_close(forward_noising(X0, 0.0, EPS)[0], X0)
    torch.testing.assert_close(forward_noising(X0, 1.0, EPS)[0], EPS)
    torch.testing.assert_close(forward_noising(X0, 0.5, EPS)[0], forward_noising(X0, t([0.5, 0.5]), EPS)[0])
    with pytest.raises(ValueError, match="sigma"):
        forward_noising(X0, t([0.5, 0.5, 0.5]), EPS)


def test_nft_loss_hand_value_beta_one() -> None:
    # β = 1: v⁺ = v_θ, v⁻ = 2·v_old − v_θ
    # s0: x̂0⁺ = [1, 0.5], err [0, 0.5], w 0.25, msq 0.125 → 0.5
    #     v⁻ = [1, 3], x̂0⁻ = [0, −0.5], err [−1, −0.5], w 0.75, msq 0.625 → 5/6
    # s1: x̂0⁺ = x0 → 0;  v⁻ = [5, −1], x̂0⁻ = [−1, 0], w 0.5, msq 0.5 → 1
    # L = 5·mean(0.75·0.5 + 0.25·5/6, 0.25·0 + 0.75·1) = 5·mean(7/12, 9/12) = 10/3
    x_t, _ = forward_noising(X0, SIGMA, EPS)
    loss, metrics = nft_loss(NFT_V_THETA, NFT_V_OLD, x_t, X0, SIGMA, NFT_R01, 1.0)
    torch.testing.assert_close(loss, t(10 / 3))
    torch.testing.assert_close(metrics["positive_loss"], t(0.25))
    torch.testing.assert_close(metrics["negative_loss"], t((5 / 6 + 1) / 2))
    torch.testing.assert_close(metrics["old_deviation"], t((1 + 1 + 4 + 0) / 4))


def test_nft_loss_hand_value_beta_half() -> None:
    # β = 0.5: v⁺ = ½v_θ + ½v_old, v⁻ = 1.5·v_old − ½v_θ
    # s0: v⁺ = [−0.5, 1.5], err⁺ = [−0.25, 0.25], w 0.25, msq 0.0625 → 0.25
    #     v⁻ = [0.5, 2.5],  err⁻ = [−0.75, −0.25], w 0.5, msq 0.3125 → 0.625
    # s1: v⁺ = [2, −1], err⁺ = [−0.25, 0], w 0.125, msq 0.03125 → 0.25
    #     v⁻ = [4, −1], err⁻ = [−0.75, 0], w 0.375, msq 0.28125 → 0.75
    # L = 5·mean((0.75·0.25 + 0.25·0.625)/0.5, (0.25·0.25 + 0.75·0.75)/0.5) = 5·mean(0.6875, 1.25)
    x_t, _ = forward_noising(X0, SIGMA, EPS)
    loss, _ = nft_loss(NFT_V_THETA, NFT_V_OLD, x_t, X0, SIGMA, NFT_R01, 0.5)
    torch.testing.assert_close(loss, t(4.84375))


def test_nft_loss_scalar_sigma_matches_per_sample() -> None:
    x_t, _ = forward_noising(X0, 0.3, EPS)
    a, _ = nft_loss(NFT_V_THETA, NFT_V_OLD, x_t, X0, 0.3, NFT_R01, 1.0)
    b, _ = nft_loss(NFT_V_THETA, NFT_V_OLD, x_t, X0, t([0.3, 0.3]), NFT_R01, 1.0)
    torch.testing.assert_close(a, b)


def test_nft_loss_flow_matching_limit() -> None:
    # r01 = 1, v_old = v_θ: x̂0⁺ − x0 = σ·(v* − v_θ), so ‖·‖² = σ²·msq, w⁺ = σ·mabs and
    # L = (5/β)·mean_i σ_i·msq_i/mabs_i. Here s0: err [0, −1] → σ·0.5/0.5 = 0.5; s1: 0 → L = (5/β)·0.25
    x_t, v_target = forward_noising(X0, SIGMA, EPS)
    ones = t([1.0, 1.0])
    err = NFT_V_THETA - v_target
    derived = SIGMA * (err**2).mean(1) / err.abs().mean(1).clamp_min(1e-5)
    grads = []
    for beta, expected in ((1.0, 1.25), (0.5, 2.5)):
        v = NFT_V_THETA.clone().requires_grad_()
        loss, _ = nft_loss(v, NFT_V_THETA, x_t, X0, SIGMA, ones, beta)
        torch.testing.assert_close(loss, t(expected))
        torch.testing.assert_close(loss, 5 / beta * derived.mean())
        loss.backward()
        grads.append(v.grad)
    # the gradient of this limit does not depend on β
    torch.testing.assert_close(grads[0], grads[1])
    # with r01 = ½ the positive and negative branches' gradients cancel at v_θ = v_old
    v = NFT_V_THETA.clone().requires_grad_()
    nft_loss(v, NFT_V_THETA, x_t, X0, SIGMA, 0.5 * ones, 1.0)[0].backward()
    torch.testing.assert_close(v.grad, torch.zeros_like(v))


def test_nft_loss_bad_inputs() -> None:
    x_t, _ = forward_noising(X0, SIGMA, EPS)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(NFT_V_THETA, NFT_V_OLD, x_t, X0, SIGMA, NFT_R01, 0.0)
    with pytest.raises(ValueError, match="shape"):
        nft_loss(NFT_V_THETA, NFT_V_OLD[:1], x_t, X0, SIGMA, NFT_R01, 1.0)


def test_sample_training_sigmas() -> None:
    g = torch.Generator().manual_seed(0)
    sigmas = sample_training_sigmas(1000, 3.0, g)
    assert sigmas.shape == (1000,) and sigmas.dtype == torch.float32
    lo, hi = torch.tensor(1e-3), torch.tensor(1 - 1e-3)  # the float32 clamp bounds
    assert bool((sigmas >= lo).all()) and bool((sigmas <= hi).all())
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigmas, (3 * u / (1 + 2 * u)).clamp(1e-3, 1 - 1e-3))
    assert float(sigmas.mean()) > float(u.mean())  # shift 3 moves mass towards high noise
    torch.testing.assert_close(
        sample_training_sigmas(1000, 1.0, torch.Generator().manual_seed(0)), u.clamp(1e-3, 1 - 1e-3)
    )
    high = sample_training_sigmas(1000, 3.0, torch.Generator().manual_seed(0), sigma_min=0.5)
    torch.testing.assert_close(high, (0.5 + 0.5 * 3 * u / (1 + 2 * u)).clamp(1e-3, 1 - 1e-3))
    assert float(high.min()) >= 0.5
    with pytest.raises(ValueError, match="sigma_min"):
        sample_training_sigmas(4, 3.0, sigma_min=1.0)
