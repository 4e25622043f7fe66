"""Exact math of the GRPO-family losses (ALGORITHMS.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.algorithms import flow_grpo_kl, grpo_advantages, ppo_clip_loss, zero_signal_fraction

REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 7.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1, 2])


def test_grpo_advantages_group_std() -> None:
    # group 0: mean 2, population std sqrt(2/3); group 1: all equal → 0; group 2: size 1 → 0
    a = 1.0 / (math.sqrt(2 / 3) + 1e-4)
    adv = grpo_advantages(REWARDS, GROUPS, std="group")
    torch.testing.assert_close(adv, torch.tensor([-a, 0.0, a, 0.0, 0.0, 0.0, 0.0]))
    assert adv.dtype == torch.float32


def test_grpo_advantages_global_std() -> None:
    # global population std: mean 4, mean((r−4)²) = 26/7; numerators are still group-centred
    a = 1.0 / (math.sqrt(26 / 7) + 1e-4)
    adv = grpo_advantages(REWARDS, GROUPS, std="global")
    torch.testing.assert_close(adv, torch.tensor([-a, 0.0, a, 0.0, 0.0, 0.0, 0.0]))


def test_grpo_advantages_clipping() -> None:
    # one group [0, 0, 0, 1]: mean 0.25, std sqrt(0.1875); A = [−0.577…×3, 1.732…] → clip 1
    r = torch.tensor([0.0, 0.0, 0.0, 1.0])
    g = torch.zeros(4, dtype=torch.long)
    lo = -0.25 / (math.sqrt(0.1875) + 1e-4)
    hi = 0.75 / (math.sqrt(0.1875) + 1e-4)
    torch.testing.assert_close(grpo_advantages(r, g, clip=None), torch.tensor([lo, lo, lo, hi]))
    torch.testing.assert_close(grpo_advantages(r, g, clip=1.0), torch.tensor([lo, lo, lo, 1.0]))
    # default clip 5: 30 zeros and a one give (30/31)/(sqrt(30)/31) ≈ 5.48 → 5
    big = torch.zeros(31)
    big[0] = 1.0
    adv = grpo_advantages(big, torch.zeros(31, dtype=torch.long))
    assert adv[0].item() == pytest.approx(5.0)


def test_grpo_advantages_non_contiguous_ids_and_lists() -> None:
    adv = grpo_advantages([3.0, 1.0, 2.0, 0.0], [7, 2, 7, 2])
    a = 0.5 / (0.5 + 1e-4)
    b = 0.5 / (0.5 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, b, -a, -b]))


def test_grpo_advantages_bad_inputs() -> None:
    with pytest.raises(ValueError, match="std"):
        grpo_advantages(REWARDS, GROUPS, std="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(REWARDS, GROUPS[:3])


def test_zero_signal_fraction() -> None:
    assert zero_signal_fraction(REWARDS, GROUPS) == pytest.approx(2 / 3)
    assert zero_signal_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])) == 0.5


def test_ppo_clip_loss_on_policy() -> None:
    logp = torch.tensor([-1.3, 0.2, -0.7, 2.1], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    loss, m = ppo_clip_loss(logp, logp.detach().clone(), adv, 1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert m["ratio_mean"].item() == 1.0 and m["ratio_max"].item() == 1.0
    assert m["clipfrac"].item() == 0.0 and m["approx_kl"].item() == 0.0
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())
    # on-policy gradient is −A/N (the REINFORCE estimator)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv / 4)


def test_ppo_clip_loss_hand_computed_clipped() -> None:
    # ε = 0.2; (ρ, A): (1.5, 1) → max(−1.5, −1.2) = −1.2 [clipped]; (1.5, −1) → 1.5;
    # (0.5, 1) → −0.5; (0.5, −1) → max(0.5, 0.8) = 0.8 [clipped]; (1.1, 2) → −2.2
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    old = torch.tensor([0.3, -0.2, 0.1, 0.0, -1.0])
    logp = (old + ratios.log()).requires_grad_()
    loss, m = ppo_clip_loss(logp, old, adv, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(0.8)
    assert m["ratio_mean"].item() == pytest.approx(5.1 / 5, abs=1e-6)
    assert m["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    logs = [math.log(r) for r in (1.5, 1.5, 0.5, 0.5, 1.1)]
    assert m["approx_kl"].item() == pytest.approx(0.5 * sum(x * x for x in logs) / 5, abs=1e-6)
    # clipped terms carry no gradient; the others carry −A·ρ/N
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.3, -0.1, 0.0, -0.44]))


def test_ppo_clip_loss_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), 0.2)


def test_flow_grpo_kl() -> None:
    mean_theta = torch.ones(2, 1, 2, 2)
    mean_theta[1, 0, 0, 0] = 3.0  # sample 1: diffs² = [9, 1, 1, 1] → mean 3
    mean_ref = torch.zeros(2, 1, 2, 2)
    kl = flow_grpo_kl(mean_theta, mean_ref, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(kl, torch.tensor([1.0 / 2.0, 3.0 / 8.0]))
    torch.testing.assert_close(flow_grpo_kl(mean_theta, mean_ref, 0.5), torch.tensor([2.0, 6.0]))
    assert torch.equal(flow_grpo_kl(mean_theta, mean_theta, 0.5), torch.zeros(2))
