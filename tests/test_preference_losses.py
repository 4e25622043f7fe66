"""Exact math of the preference-family losses (ALGORITHMS.md §4): Diffusion-DPO, SePPO, SFT."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.algorithms.preference import (
    diffusion_dpo_loss,
    epsilon_error,
    flow_matching_error,
    seppo_flip,
    seppo_loss,
    sft_loss,
)
from diffalign.errors import ConfigError, DiffalignError


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """−log σ(−x) = log(1 + eˣ)."""
    return math.log1p(math.exp(x))


# Hand values with β = 2, so the logit is −(Δ_w − Δ_other) and L_i = log(1 + exp(Δ_w − Δ_other)).
L_03 = 0.5543552444685271  # −log σ(0.3)  = log(1 + e^−0.3)
L_04 = 0.5130152523999526  # −log σ(0.4)  = log(1 + e^−0.4)
L_M04 = 0.9130152523999526  # −log σ(−0.4) = log(1 + e^0.4)
L_02 = 0.5981388693815918  # −log σ(0.2)  = log(1 + e^−0.2)
L_M02 = 0.7981388693815918  # −log σ(−0.2) = log(1 + e^0.2)


def test_hand_constants() -> None:
    assert L_03 == pytest.approx(softplus(-0.3), abs=1e-15)
    assert L_04 == pytest.approx(softplus(-0.4), abs=1e-15)
    assert L_M04 == pytest.approx(softplus(0.4), abs=1e-15)
    assert L_02 == pytest.approx(softplus(-0.2), abs=1e-15)
    assert L_M02 == pytest.approx(softplus(0.2), abs=1e-15)


# ---------------------------------------------------------------- per-sample errors


def test_flow_matching_error_is_per_sample_mean() -> None:
    v_pred = torch.zeros(2, 1, 2, 2)
    v_target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    # sample 0: mean(1,1,1,1) = 1; sample 1: mean(4,0,0,0) = 1; sign of the difference is irrelevant
    torch.testing.assert_close(flow_matching_error(v_pred, v_target), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(flow_matching_error(v_target, v_pred), torch.tensor([1.0, 1.0]))
    v = torch.tensor([[0.5, -0.5, 1.5], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(flow_matching_error(v, torch.zeros(2, 3)), torch.tensor([11 / 12, 3.0]))


def test_epsilon_error_matches_mse_and_upcasts() -> None:
    torch.manual_seed(0)
    eps_pred, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    expected = ((eps_pred - eps) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(epsilon_error(eps_pred, eps), expected)
    out = epsilon_error(eps_pred.bfloat16(), eps.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (3,)


def test_errors_carry_gradient_of_prediction() -> None:
    v_pred = torch.tensor([[1.0, 3.0]], requires_grad=True)
    flow_matching_error(v_pred, torch.zeros(1, 2)).sum().backward()
    # d/dv mean(v²) = 2v / 2 = v
    torch.testing.assert_close(v_pred.grad, torch.tensor([[1.0, 3.0]]))


def test_error_shape_checks() -> None:
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_error(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="batch dimension"):
        epsilon_error(torch.tensor(1.0), torch.tensor(0.0))


# ---------------------------------------------------------------- Diffusion-DPO


def test_diffusion_dpo_hand_values() -> None:
    # pair 1: Δ_w = 0.3 − 0.5 = −0.2, Δ_l = 0.5 − 0.4 = 0.1 → logit 0.3  → L = 0.55435…
    # pair 2: Δ_w = 0.5 − 0.3 = 0.2,  Δ_l = 0.3 − 0.5 = −0.2 → logit −0.4 → L = 0.91301…
    loss, m = diffusion_dpo_loss(t64(0.3, 0.5), t64(0.5, 0.3), t64(0.5, 0.3), t64(0.4, 0.5), beta=2.0)
    assert loss.item() == pytest.approx((L_03 + L_M04) / 2, abs=1e-12)  # 0.73368524843…
    assert m["accuracy"].item() == 0.5
    assert m["delta_w"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["delta_l"].item() == pytest.approx(-0.05, abs=1e-12)
    assert m["reward_margin"].item() == pytest.approx(-0.05, abs=1e-12)  # mean(0.3, −0.4)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_diffusion_dpo_has_the_half() -> None:
    # β = 5000, Δ_w − Δ_l = −1e-4 → logit = −0.5·5000·(−1e-4) = 0.25 (not 0.5)
    loss, m = diffusion_dpo_loss(t64(0.1), t64(0.1001), t64(0.2), t64(0.2), beta=5000.0)
    assert m["reward_margin"].item() == pytest.approx(0.25, rel=1e-9)
    assert loss.item() == pytest.approx(softplus(-0.25), rel=1e-9)


def test_diffusion_dpo_at_reference_is_log2() -> None:
    e = t64(0.3, 0.7, 1.1)
    loss, m = diffusion_dpo_loss(e, e.clone(), e.flip(0), e.flip(0).clone(), beta=123.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    assert m["accuracy"].item() == 0.0  # Δ_w = Δ_l = 0: not strictly preferred


def test_diffusion_dpo_gradients() -> None:
    torch.manual_seed(1)
    b, beta = 5, 3.0
    err_w = torch.rand(b, dtype=torch.float64, requires_grad=True)
    err_l = torch.rand(b, dtype=torch.float64, requires_grad=True)
    ref_w = torch.rand(b, dtype=torch.float64, requires_grad=True)
    ref_l = torch.rand(b, dtype=torch.float64, requires_grad=True)
    loss, _ = diffusion_dpo_loss(err_w, ref_w, err_l, ref_l, beta)
    loss.backward()
    z = -beta / 2 * ((err_w - ref_w) - (err_l - ref_l)).detach()
    g = torch.sigmoid(-z) * beta / (2 * b)  # dL/d err_w = σ(−z)·β/(2B)
    torch.testing.assert_close(err_w.grad, g)
    torch.testing.assert_close(err_l.grad, -g)
    assert ref_w.grad is None and ref_l.grad is None  # references are constants


# ---------------------------------------------------------------- SePPO

# Three pairs, β = 2:
#   A: err_w 0.3 < ref 0.5 → policy better on the anchor → s = +1 (x_s is a loser)
#   B: err_w 0.5 > ref 0.3 → reference better            → s = −1 (sign) / 0 (indicator)
#   C: err_w 0.4 = ref 0.4 → tie                          → s = +1
# Every reference sample has Δ_s = 0.4 − 0.2 = 0.2.
SEPPO_ERR_W = t64(0.3, 0.5, 0.4)
SEPPO_REF_W = t64(0.5, 0.3, 0.4)
SEPPO_ERR_S = t64(0.4, 0.4, 0.4)
SEPPO_REF_S = t64(0.2, 0.2, 0.2)


def _seppo(flipper: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return seppo_loss(SEPPO_ERR_W, SEPPO_REF_W, SEPPO_ERR_S, SEPPO_REF_S, beta=2.0, flipper=flipper)


def test_seppo_flip_values() -> None:
    torch.testing.assert_close(seppo_flip(SEPPO_ERR_W, SEPPO_REF_W, "sign"), t64(1.0, -1.0, 1.0))
    torch.testing.assert_close(seppo_flip(SEPPO_ERR_W, SEPPO_REF_W, "indicator"), t64(1.0, 0.0, 1.0))
    torch.testing.assert_close(seppo_flip(SEPPO_ERR_W, SEPPO_REF_W, "off"), t64(1.0, 1.0, 1.0))


def test_seppo_sign_hand_values() -> None:
    # A: logit −(−0.2 − 0.2) = 0.4; B: −(0.2 + 0.2) = −0.4; C: −(0 − 0.2) = 0.2
    loss, m = _seppo("sign")
    assert loss.item() == pytest.approx((L_04 + L_M04 + L_02) / 3, abs=1e-12)
    assert m["flip_fraction"].item() == pytest.approx(1 / 3)
    assert m["ref_better_fraction"].item() == pytest.approx(1 / 3)
    assert m["delta_w"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["delta_s"].item() == pytest.approx(0.2, abs=1e-12)
    assert m["reward_margin"].item() == pytest.approx((0.4 - 0.4 + 0.2) / 3, abs=1e-12)
    assert m["accuracy"].item() == pytest.approx(2 / 3)  # Δ_w < Δ_s in A and C


def test_seppo_sign_flips_the_reference_term() -> None:
    # Pair B alone: s = −1, so Δ_s enters with a + sign — the reference sample is a second
    # winner. That is DPO with the loser's errors swapped (Δ_l = −Δ_s).
    ew, rw, es, rs = SEPPO_ERR_W[1:2], SEPPO_REF_W[1:2], SEPPO_ERR_S[1:2], SEPPO_REF_S[1:2]
    loss, m = seppo_loss(ew, rw, es, rs, beta=2.0, flipper="sign")
    assert loss.item() == pytest.approx(L_M04, abs=1e-12)
    assert m["flip_fraction"].item() == 1.0
    dpo, _ = diffusion_dpo_loss(ew, rw, rs, es, beta=2.0)
    torch.testing.assert_close(loss, dpo)
    # Pair A alone: s = +1, the reference sample is the loser — plain DPO.
    ew, rw, es, rs = SEPPO_ERR_W[:1], SEPPO_REF_W[:1], SEPPO_ERR_S[:1], SEPPO_REF_S[:1]
    loss, m = seppo_loss(ew, rw, es, rs, beta=2.0, flipper="sign")
    assert loss.item() == pytest.approx(L_04, abs=1e-12)
    assert m["flip_fraction"].item() == 0.0
    torch.testing.assert_close(loss, diffusion_dpo_loss(ew, rw, es, rs, beta=2.0)[0])


def test_seppo_indicator_hand_values() -> None:
    # B has s = 0 → SFT-like on the winner: −log σ(−Δ_w) = −log σ(−0.2)
    loss, m = _seppo("indicator")
    assert loss.item() == pytest.approx((L_04 + L_M02 + L_02) / 3, abs=1e-12)
    assert m["flip_fraction"].item() == pytest.approx(1 / 3)
    assert m["reward_margin"].item() == pytest.approx((0.4 - 0.2 + 0.2) / 3, abs=1e-12)


def test_seppo_off_hand_values() -> None:
    # B as a plain loser: −(0.2 − 0.2) = 0 → log 2
    loss, m = _seppo("off")
    assert loss.item() == pytest.approx((L_04 + math.log(2) + L_02) / 3, abs=1e-12)
    assert m["flip_fraction"].item() == 0.0
    assert m["ref_better_fraction"].item() == pytest.approx(1 / 3)  # reported whatever the flipper


def test_seppo_tie_counts_as_loser() -> None:
    # At the first step the policy is the reference: every pair ties, nothing flips.
    e = t64(0.3, 0.6)
    for flipper in ("sign", "indicator"):
        loss, m = seppo_loss(e, e.clone(), e + 0.1, e.clone(), beta=2.0, flipper=flipper)
        assert m["flip_fraction"].item() == 0.0
        assert loss.item() == pytest.approx(softplus(-0.1), abs=1e-12)  # logit −(0 − 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seppo_off_equals_diffusion_dpo_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    err_w, ref_w, err_l, ref_l = (torch.rand(64, dtype=dtype) for _ in range(4))
    for beta in (1.0, 5000.0):
        s_loss, s_m = seppo_loss(err_w, ref_w, err_l, ref_l, beta, flipper="off")
        d_loss, d_m = diffusion_dpo_loss(err_w, ref_w, err_l, ref_l, beta)
        assert torch.equal(s_loss, d_loss)
        assert torch.equal(s_m["reward_margin"], d_m["reward_margin"])
        assert torch.equal(s_m["accuracy"], d_m["accuracy"])
        assert torch.equal(s_m["delta_w"], d_m["delta_w"])
        assert torch.equal(s_m["delta_s"], d_m["delta_l"])


@pytest.mark.parametrize("flipper", ["sign", "indicator", "off"])
def test_seppo_gradients_treat_s_as_constant(flipper: str) -> None:
    b, beta = 6, 4.0
    base = t64(0.2, 0.5, 0.9, 0.4, 0.7, 0.3)
    offsets = t64(0.1, -0.2, 0.05, -0.05, 0.0, 0.3)  # ref − err: +, −, +, −, tie, +
    err_w = base.clone().requires_grad_(True)
    ref_w = (base + offsets).requires_grad_(True)
    err_s = t64(0.6, 0.1, 0.4, 0.8, 0.5, 0.2).requires_grad_(True)
    ref_s = t64(0.3, 0.4, 0.4, 0.2, 0.9, 0.25).requires_grad_(True)
    loss, _ = seppo_loss(err_w, ref_w, err_s, ref_s, beta, flipper=flipper)
    loss.backward()

    s = {
        "sign": t64(1, -1, 1, -1, 1, 1),
        "indicator": t64(1, 0, 1, 0, 1, 1),
        "off": t64(1, 1, 1, 1, 1, 1),
    }[flipper]
    with torch.no_grad():
        z = -beta / 2 * ((err_w - ref_w) - s * (err_s - ref_s))
        w = torch.sigmoid(-z) / b  # −dL/dz per sample, batch mean included
    # z = −β/2·(Δ_w − s·Δ_s) with s constant: dL/d err_w = σ(−z)·β/(2B), dL/d err_s = −s·σ(−z)·β/(2B)
    torch.testing.assert_close(err_w.grad, w * beta / 2)
    torch.testing.assert_close(err_s.grad, -s * w * beta / 2)
    assert ref_w.grad is None and ref_s.grad is None


# ---------------------------------------------------------------- SFT


def test_sft_loss() -> None:
    err_w = torch.tensor([0.1, 0.2, 0.6], requires_grad=True)
    loss, m = sft_loss(err_w)
    assert loss.item() == pytest.approx(0.3)
    assert m["err_w"].item() == pytest.approx(0.3)
    assert m["err_w_max"].item() == pytest.approx(0.6)
    assert not m["err_w"].requires_grad
    loss.backward()
    torch.testing.assert_close(err_w.grad, torch.full((3,), 1 / 3))


def test_sft_is_the_flow_matching_loss() -> None:
    torch.manual_seed(3)
    v, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    loss, _ = sft_loss(flow_matching_error(v, target))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(v, target))


# ---------------------------------------------------------------- stability and dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_beta_delta_is_finite(dtype: torch.dtype) -> None:
    # β·Δ ≈ 1e6 both ways: the losing direction gives L ≈ 5e5, the winning one L = 0.
    err_w = torch.tensor([1.0, 0.0], dtype=dtype, requires_grad=True)
    zeros = torch.zeros(2, dtype=dtype)
    err_l = torch.tensor([0.0, 1.0], dtype=dtype, requires_grad=True)
    loss, m = diffusion_dpo_loss(err_w, zeros, err_l, zeros, beta=1e6)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.25e6, rel=1e-6)  # mean(5e5, 0)
    loss.backward()
    assert torch.isfinite(err_w.grad).all() and torch.isfinite(err_l.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    for flipper in ("sign", "indicator", "off"):
        s_loss, s_m = seppo_loss(err_w, zeros, err_l, zeros, beta=1e6, flipper=flipper)
        assert torch.isfinite(s_loss) and all(torch.isfinite(v) for v in s_m.values())


# ---------------------------------------------------------------- bad input


def test_bad_inputs() -> None:
    e = torch.rand(4)
    with pytest.raises(ValueError, match="same shape"):
        diffusion_dpo_loss(e, e, e[:3], e[:3], beta=1.0)
    with pytest.raises(ValueError, match="1-D"):
        seppo_loss(e.reshape(2, 2), e.reshape(2, 2), e.reshape(2, 2), e.reshape(2, 2), beta=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        sft_loss(torch.zeros(0))
    with pytest.raises(ValueError, match="same shape"):
        seppo_loss(e, e, e, torch.rand(5), beta=1.0)
    for beta in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="beta"):
            diffusion_dpo_loss(e, e, e, e, beta=beta)
        with pytest.raises(ConfigError, match="beta"):
            seppo_loss(e, e, e, e, beta=beta)
    with pytest.raises(ConfigError, match="sign, indicator, off") as info:
        seppo_loss(e, e, e, e, beta=1.0, flipper="soft")  # type: ignore[arg-type]
    assert isinstance(info.value, DiffalignError) and "'soft'" in str(info.value)
