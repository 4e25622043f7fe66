"""ConsistentRFT: DGR schedule, cpgo_loss, and equality with Flow-GRPO when both are off."""

import pytest
import torch

from diffalign.algorithms.consistent_rft import (
    CPGOConfig,
    CPGORegularizer,
    DGRConfig,
    cpgo_loss,
    dgr_epoch_is_coarse,
    dgr_shared_groups,
)


def test_dgr_epoch_schedule_hand_checked():
    # P = 10, rho = 0.2: epochs 8, 9 of every period are coarse
    coarse = [e for e in range(25) if dgr_epoch_is_coarse(e, 10, 0.2)]
    assert coarse == [8, 9, 18, 19]
    # P = 40, rho = 0.1 (the published default): the last 4 epochs of every 40
    assert [e for e in range(80) if dgr_epoch_is_coarse(e, 40, 0.1)] == [36, 37, 38, 39, 76, 77, 78, 79]
    assert not any(dgr_epoch_is_coarse(e, 10, 0.0) for e in range(30))
    assert all(dgr_epoch_is_coarse(e, 10, 1.0) for e in range(30))


def test_dgr_shared_groups_modes():
    g = torch.Generator().manual_seed(0)
    assert dgr_shared_groups(DGRConfig(mode="off"), 3, 8, g) is None
    fine = dgr_shared_groups(DGRConfig(mode="epoch", period=10, rate=0.2), 3, 8, g)
    coarse = dgr_shared_groups(DGRConfig(mode="epoch", period=10, rate=0.2), 9, 8, g)
    assert fine.all() and not coarse.any()
    mixed = dgr_shared_groups(DGRConfig(mode="group", rate=0.25), 0, 8, g)
    assert mixed.dtype == torch.bool and int((~mixed).sum()) == 2
    with pytest.raises(ValueError, match="dgr.mode"):
        DGRConfig(mode="sometimes")


def test_cpgo_loss_hand_computed():
    pred = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    loss, m = cpgo_loss(pred, target, 0.5)
    # per-sample L2 norms: 5 and 1; mean 3; times lambda 0.5
    assert loss.item() == pytest.approx(1.5)
    assert m["cpgo_dist"].item() == pytest.approx(3.0)
    loss.backward()
    # d/dpred of 0.5 * mean(norm): 0.5 * 0.5 * (pred - target) / norm
    torch.testing.assert_close(pred.grad, torch.tensor([[0.15, 0.2], [0.0, -0.25]]))
    loss_w, _ = cpgo_loss(pred.detach(), target, torch.tensor([1.0, 0.0]))
    assert loss_w.item() == pytest.approx(2.5)  # second sample masked out: (5 + 0) / 2


def test_cpgo_mse_distance_known_answers():
    """``distance=mse``: the per-dimension mean of the squared difference. A constant per-pixel
    error c gives λ·c² at any resolution, where ``l2`` gives λ·c·√D; the gradient is
    2λ·(pred − target)/(B·D), so it vanishes at the target, where ``l2``'s stays a unit vector."""
    for d in (4, 16, 3072):
        pred, target = torch.full((2, d), 0.5, requires_grad=True), torch.zeros(2, d)
        mse, m = cpgo_loss(pred, target, 0.1, distance="mse")
        assert mse.item() == pytest.approx(0.1 * 0.25) and m["cpgo_dist"].item() == pytest.approx(0.25)
        assert cpgo_loss(pred, target, 0.1)[0].item() == pytest.approx(0.1 * 0.5 * d**0.5, rel=1e-6)
    pred = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    loss, _ = cpgo_loss(pred, target, 0.5, distance="mse")
    assert loss.item() == pytest.approx(0.5 * (12.5 + 0.5) / 2)
    loss.backward()
    torch.testing.assert_close(pred.grad, 2 * 0.5 * (pred.detach() - target) / (2 * 2))
    near = (target + 1e-4).requires_grad_(True)
    cpgo_loss(near, target, 1.0, distance="mse")[0].backward()
    assert near.grad.norm() < 1e-4
    near_l2 = (target + 1e-4).requires_grad_(True)
    cpgo_loss(near_l2, target, 1.0)[0].backward()
    assert near_l2.grad.flatten(1).norm(dim=1).tolist() == pytest.approx([0.5, 0.5])  # unit vector / B
    with pytest.raises(ValueError, match="cpgo.distance"):
        CPGOConfig(distance="l1")


def test_cpgo_regularizer_gates_by_sigma_and_probability():
    from diffalign.sampling.rollout import Trajectory

    b, t = 4, 4
    traj = Trajectory(prompts=["a circle"] * b, group_ids=torch.zeros(b, dtype=torch.long),
                      latents=torch.randn(b, t + 1, 3, 2, 2), log_probs=torch.zeros(b, t),
                      x0_pred=torch.randn(b, t, 3, 2, 2), sigmas=torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
                      sde_mask=torch.ones(t, dtype=torch.bool), shared_noise=torch.ones(1, dtype=torch.bool),
                      images=torch.zeros(b, 3, 2, 2), sampler="flow_sde", noise_level=0.7, guidance_scale=1.0)
    idx, k = torch.arange(4), torch.tensor([0, 1, 2, 3])
    pred = torch.randn(4, 3, 2, 2)
    reg = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.6, prob=1.0))
    loss, m = reg(traj, idx, k, pred, torch.Generator().manual_seed(0))
    # only steps with sigma <= 0.6 (k = 2, 3) count; targets are x0_pred at k+1, final latent for the last step
    targets = torch.stack([traj.x0_pred[2, 3], traj.latents[3, -1]])
    want = (pred[2:] - targets).flatten(1).norm(dim=1).sum() / 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert m["cpgo_applied"].item() == 0.5
    loss_mse, _ = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.6, prob=1.0, distance="mse"))(
        traj, idx, k, pred, torch.Generator().manual_seed(0))
    assert loss_mse.item() == pytest.approx(((pred[2:] - targets).flatten(1).pow(2).mean(1).sum() / 4).item(), rel=1e-6)
    reg0 = CPGORegularizer(CPGOConfig(weight=1.0, sigma_gate=0.6, prob=0.0))
    assert reg0(traj, idx, k, pred, torch.Generator().manual_seed(0))[0].item() == 0.0


def test_cpgo_scale_benchmark_measures_each_trainable_step(tmp_path, monkeypatch):
    """benchmarks/cpgo_scale.py (how the ShapesWorld λ was chosen) on a tiny model: one row per
    SDE step with finite gradient norms, and λ for a 10 % share = 0.1·|∇policy| / |∇CPGO(λ=1)|."""
    from pathlib import Path

    from tiny import load_benchmark, tiny_unet

    from diffalign.models.checkpoint import save_unet

    root = Path(__file__).resolve().parents[1]
    model = save_unet(tmp_path / "tiny.safetensors", tiny_unet(0), 32)
    bench = load_benchmark("cpgo_scale")
    monkeypatch.chdir(root)
    out = bench.main(["--preset", "consistent_rft", "--prompts", "2", "--set", f"model={model}", "--set", "group_size=2",
                      "--set", "rollout.steps=4", "--set", "rollout.sde_window=[0,2]", "--set", "lora_rank=0",
                      "--set", "reward=jpeg_incompressibility", "--set", "reward_kwargs={}"])
    assert out["images"] == 4 and [r["k"] for r in out["steps"]] == [0, 1]
    for r in out["steps"]:
        assert r["grad_policy"] > 0 and r["grad_cpgo_lambda1"] > 0 and r["cpgo_dist"] > 0
        assert r["lambda_for_10pct"] == pytest.approx(0.1 * r["grad_policy"] / r["grad_cpgo_lambda1"])
    # every step (ODE steps 2, 3 included), read against the mean policy gradient with the preset's λ·p
    assert [r["k"] for r in out["all_steps"]] == [0, 1, 2, 3]
    assert [r["sde"] for r in out["all_steps"]] == [True, True, False, False]
    mean_pol = sum(r["grad_policy"] for r in out["steps"]) / 2
    assert out["mean_grad_policy"] == pytest.approx(mean_pol)
    # the last Euler step lands exactly on x̂0(x_{T-1}), the CPGO target there: no distance, no gradient
    assert out["all_steps"][3]["cpgo_dist"] == pytest.approx(0, abs=1e-10)
    for r in out["all_steps"]:
        assert r["grad_cpgo_lambda1"] > 0 or r["k"] == 3
        assert r["preset_lambda_vs_policy"] == pytest.approx(
            out["cpgo_weight"] * out["cpgo_prob"] * r["grad_cpgo_lambda1"] / mean_pol)
    assert (out["cpgo_weight"], out["cpgo_prob"], out["distance"]) == (0.01, 0.2, "mse")  # the shipped preset
    # the SDE steps' CPGO gradient is the same whether measured through recompute_step or predict_x0
    for a, b in zip(out["steps"], out["all_steps"][:2], strict=True):
        assert b["grad_cpgo_lambda1"] == pytest.approx(a["grad_cpgo_lambda1"], rel=1e-4)
