"""Forward-process update (CRD, DiffusionNFT): clean-sample rollouts, snapshots, KL anchor, trainer."""

from pathlib import Path

import pytest
import torch
from tiny import tiny_policy, tiny_unet

from diffalign.algorithms.crd import make_decay_schedule
from diffalign.algorithms.forward import CRDConfig, ForwardProcess, NFTConfig
from diffalign.algorithms.grpo import grpo_advantages
from diffalign.algorithms.nft import forward_noising
from diffalign.config import load_config
from diffalign.errors import ConfigError
from diffalign.models.checkpoint import load_unet, save_unet
from diffalign.sampling.clean import CleanSamples, sample_clean
from diffalign.sampling.rollout import RolloutConfig, rollout
from diffalign.training.rundir import load_checkpoint, read_metrics
from diffalign.training.trainer import TrainConfig, Trainer, build_algorithm

PROMPTS = ["a red circle"] * 3 + ["two blue squares"] * 3
GIDS = torch.tensor([0, 0, 0, 1, 1, 1])
REWARDS = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.2, 0.8])
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "shapes"


def _samples(pol, seed: int = 0, sampler: str = "ode") -> CleanSamples:
    return sample_clean(pol, PROMPTS, GIDS, RolloutConfig(sampler=sampler, steps=2, guidance_scale=1.0),
                        generator=torch.Generator().manual_seed(seed))


def _params(pol) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in pol.trainable_state().items()}


# --------------------------------------------------------------------------- clean-sample rollouts


@pytest.mark.parametrize("sampler", ["ode", "flow_sde", "ddim"])
def test_clean_rollout_equals_full_rollout_final_state(sampler):
    pol = tiny_policy(1)
    cfg = RolloutConfig(sampler=sampler, steps=3, noise_level=0.7 if sampler != "ddim" else 1.0, batch_size=4)
    full = rollout(pol, PROMPTS, GIDS, cfg, generator=torch.Generator().manual_seed(3))
    clean = sample_clean(pol, PROMPTS, GIDS, cfg, generator=torch.Generator().manual_seed(3))
    assert clean.latents.shape == (6, 3, 32, 32)  # one state per image, no per-step storage
    torch.testing.assert_close(clean.latents, full.latents[:, -1], rtol=0, atol=0)
    torch.testing.assert_close(clean.images, full.images, rtol=0, atol=0)
    both = CleanSamples.cat([clean, clean])
    assert len(both) == 12 and both.num_groups == 4


def test_rollouts_come_from_the_sampler_snapshot():
    pol, frozen = tiny_policy(2), tiny_policy(2)
    algo = ForwardProcess("crd", CRDConfig())
    algo.ensure_snapshots(pol)
    assert set(pol.snapshot_names()) == {"old", "sampler"}
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = RolloutConfig(sampler="ode", steps=2, guidance_scale=1.0)
    got = algo.rollout(pol, PROMPTS, GIDS, cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.latents, _samples(frozen).latents)  # the snapshot's weights sample
    assert not torch.allclose(got.latents, _samples(pol).latents)  # not the moved policy
    tied = ForwardProcess("nft", NFTConfig())
    assert tied.sampler_snapshot == "old"


# --------------------------------------------------------------------------- the update


def test_first_step_implicit_reward_is_zero_and_loss_is_centred_reward_energy():
    # before any step θ == old, so r̂ = 0 exactly and L_CRD = (5/β)·mean(R²), R = r01 − group mean
    pol = tiny_policy(3)
    samples = _samples(pol)
    algo = ForwardProcess("crd", CRDConfig(beta_kl=0.0, beta_min=0.0, groups_per_microbatch=2))
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=0.0)
    adv = grpo_advantages(REWARDS, GIDS)
    m = algo.update(pol, opt, samples, adv, torch.Generator().manual_seed(0))
    r01 = adv.clamp(-5, 5) / 10 + 0.5
    centred = r01 - r01.view(2, 3).mean(1).repeat_interleave(3)
    assert m["crd/implicit_reward_mean"] == 0.0
    assert m["policy_loss"] == pytest.approx(float(5 * (centred**2).mean()), rel=1e-5)
    assert "kl" not in m  # beta_kl = 0 skips the reference forward


def test_kl_anchor_is_to_the_cfg_guided_base_and_reward_adaptive():
    pol = tiny_policy(4)
    samples = _samples(pol)
    idx = torch.arange(6)
    cond = pol.encode(PROMPTS)
    r01 = torch.linspace(0, 1, 6)
    sigma, noise = torch.full((6,), 0.6), torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x_t, _ = forward_noising(samples.latents, sigma, noise)
    with torch.no_grad():
        v_c = pol.predict(x_t, sigma, cond)
        v_cfg = pol.predict(x_t, sigma, cond, guidance_scale=4.5)
    kl_cfg = ((v_c - v_cfg) ** 2).flatten(1).mean(1)
    for w, expected in ((4.5, float(kl_cfg.mean())), (1.0, 0.0)):
        algo = ForwardProcess("crd", CRDConfig(kl_guidance=w, beta_kl=0.1, beta_min=0.01))
        algo.ensure_snapshots(pol)
        loss, m = algo._loss(pol, samples, idx, cond, r01, sigma, noise)
        assert m["kl"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        # c_i = m + r01·(1 − m), m = β_min/β_KL: the coefficient β_KL·c_i runs from β_min to β_KL
        assert m["kl_coef_mean"] == pytest.approx(float((0.01 + r01 * 0.09).mean()), rel=1e-6)
        want_kl_loss = float(0.1 * ((0.1 + r01 * 0.9) * kl_cfg).mean()) if w != 1.0 else 0.0
        assert m["kl_loss"] == pytest.approx(want_kl_loss, rel=1e-5, abs=1e-12)
    assert kl_cfg.mean() > 0


def test_lora_kl_reference_has_adapters_off():
    pol = tiny_policy(5, lora_rank=2)
    with torch.no_grad():
        for k, p in pol.trainable_state().items():
            if "lora_B" in k:
                p.add_(0.2)
    samples = _samples(pol)
    cond = pol.encode(PROMPTS)
    sigma, noise = torch.full((6,), 0.5), torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    algo = ForwardProcess("nft", NFTConfig(beta_kl=1.0))
    algo.ensure_snapshots(pol)
    _, m = algo._loss(pol, samples, torch.arange(6), cond, torch.full((6,), 0.5), sigma, noise)
    x_t, _ = forward_noising(samples.latents, sigma, noise)
    with torch.no_grad():
        v = pol.predict(x_t, sigma, cond)
        with pol.reference():
            ref = pol.predict(x_t, sigma, cond)
    assert m["kl"] == pytest.approx(float(((v - ref) ** 2).mean()), rel=1e-5)
    assert m["kl"] > 0


def _ema_expected(pol, algo, samples, adv, groups_per_step):
    """Run an update, recording θ after each optimizer step, and replay the two EMAs by hand."""
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=0.05)
    thetas = []
    opt.register_step_post_hook(lambda *_: thetas.append(_params(pol)))
    start = _params(pol)
    m = algo.update(pol, opt, samples, adv, torch.Generator().manual_seed(0))
    old, sampler = dict(start), dict(start)
    d_old, d_s = make_decay_schedule(algo.config.old_decay), make_decay_schedule(algo.config.sampler_decay)
    for n, theta in enumerate(thetas):
        old = {k: d_old(n) * old[k] + (1 - d_old(n)) * theta[k] for k in old}
        sampler = {k: d_s(n) * sampler[k] + (1 - d_s(n)) * theta[k] for k in sampler}
    return m, thetas, old, sampler


def test_snapshots_follow_their_own_decay_schedules_after_each_optimizer_step():
    pol = tiny_policy(6)
    samples = _samples(pol)
    cfg = CRDConfig(groups_per_step=1, groups_per_microbatch=1, old_decay="linear:0.3,0.2,0,0.9",
                    sampler_decay="linear:0.1,0.5,1,0.999", beta_kl=0.0, beta_min=0.0)
    algo = ForwardProcess("crd", cfg)
    m, thetas, old, sampler = _ema_expected(pol, algo, samples, grpo_advantages(REWARDS, GIDS), 1)
    assert len(thetas) == 2 and algo.step == 2  # one optimizer step per group
    snaps = pol.snapshot_state()
    for k in old:
        torch.testing.assert_close(snaps["old"][k], old[k])
        torch.testing.assert_close(snaps["sampler"][k], sampler[k])
    assert not torch.equal(snaps["old"][k], snaps["sampler"][k])
    assert m["old_decay"] == pytest.approx((0.3 + 0.5) / 2)  # steps 0 and 1
    assert m["sampler_decay"] == pytest.approx((0.0 + 0.1) / 2)  # 0 before its start step 1
    # the decay index continues across update calls (and across resume, via state_dict)
    assert algo.state_dict() == {"step": 2}


def test_tied_snapshots_keep_one_snapshot_and_sample_with_it():
    pol = tiny_policy(7)
    algo = ForwardProcess("crd", CRDConfig(tie_snapshots=True, old_decay="constant:0.5", beta_kl=0.0, beta_min=0.0))
    samples = algo.rollout(pol, PROMPTS, GIDS, RolloutConfig(sampler="ode", steps=2, guidance_scale=1.0),
                           generator=torch.Generator().manual_seed(0))
    m, thetas, old, _ = _ema_expected(pol, algo, samples, grpo_advantages(REWARDS, GIDS), 0)
    assert pol.snapshot_names() == ["old"] and "sampler_decay" not in m
    for k in old:
        torch.testing.assert_close(pol.snapshot_state()["old"][k], old[k])


def test_microbatches_of_whole_groups_accumulate_to_the_same_step():
    # within-group centring only sees whole groups, so splitting a step into micro-batches of
    # groups changes nothing; whole-micro-batch centring does depend on the split
    results = {}
    for centering in ("group", "batch"):
        for groups in (1, 2):
            pol = tiny_policy(8)
            samples = _samples(pol)
            cfg = CRDConfig(groups_per_microbatch=groups, centering=centering, timesteps_per_sample=2, beta_kl=0.0,
                            beta_min=0.0)
            opt = torch.optim.SGD(pol.trainable_parameters(), lr=0.5)
            # advantages not centred per group, so the batch mean differs from the group means
            adv = torch.tensor([1.0, 2.0, 3.0, -1.0, -2.0, 0.5])
            ForwardProcess("crd", cfg).update(pol, opt, samples, adv, torch.Generator().manual_seed(0))
            results[centering, groups] = _params(pol)
    moved = results["group", 1]
    for k in moved:
        torch.testing.assert_close(results["group", 2][k], moved[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(results["batch", 1][k], results["batch", 2][k], rtol=1e-5, atol=1e-7)
               for k in moved)


@pytest.mark.parametrize("algo_cfg", [("crd", CRDConfig(form="bce")), ("crd", CRDConfig(adaptive_weight=False)),
                                      ("nft", NFTConfig(snapshot_update="epoch"))])
def test_variants_train(algo_cfg):
    name, cfg = algo_cfg
    pol = tiny_policy(9)
    before = _params(pol)
    samples = _samples(pol, sampler="flow_sde")
    m = ForwardProcess(name, cfg).update(pol, torch.optim.Adam(pol.trainable_parameters(), lr=1e-3), samples,
                                         grpo_advantages(REWARDS, GIDS), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    assert any(not torch.equal(before[k], p) for k, p in _params(pol).items())


def test_bad_configs_fail_early_with_the_fix():
    with pytest.raises(ConfigError, match="valid decay schedules"):
        CRDConfig(old_decay="fast")
    with pytest.raises(ConfigError, match="beta_min = beta_kl gives a constant KL"):
        CRDConfig(beta_kl=0.01, beta_min=0.1)
    with pytest.raises(ConfigError, match="groups_per_microbatch"):
        NFTConfig(groups_per_microbatch=0)
    with pytest.raises(ConfigError, match="needs a CRDConfig"):
        ForwardProcess("crd", NFTConfig())


# --------------------------------------------------------------------------- presets and the trainer

FORWARD_PRESETS = ["crd", "diffusion_nft", "crd_tied_snapshots", "crd_kl_cfg_free", "crd_constant_kl",
                   "crd_batch_centering"]


@pytest.mark.parametrize("name", FORWARD_PRESETS)
def test_presets_load_and_build(name):
    cfg = load_config(TrainConfig, PRESETS / f"{name}.yaml")
    cfg.validate()
    algo = build_algorithm(cfg)
    assert isinstance(algo, ForwardProcess) and algo.name == ("nft" if name == "diffusion_nft" else "crd")
    crd = cfg.crd
    if name == "crd_tied_snapshots":
        assert crd.tie_snapshots
    if name == "crd_kl_cfg_free":
        assert crd.kl_guidance == 1.0
    if name == "crd_constant_kl":
        assert crd.beta_min == crd.beta_kl
    if name == "crd_batch_centering":
        assert crd.centering == "batch"
    if name.startswith("crd_"):  # each ablation changes exactly one part of the crd preset
        base = load_config(TrainConfig, PRESETS / "crd.yaml")
        diff = {k for k in vars(crd) if getattr(crd, k) != getattr(base.crd, k)}
        assert len(diff) == 1, diff


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


def _cfg(model, preset, *extra):
    return load_config(TrainConfig, PRESETS / f"{preset}.yaml", [
        f"model={model}", "lora_rank=0", "epochs=2", "prompts_per_epoch=2", "group_size=3", "rollout.steps=2",
        "eval.num_images=3", "eval.steps=1", "eval.every=0", "ckpt_every=1", "lr=1e-3",
        # a random tiny model draws no objects: the verifier would give no signal, JPEG size does
        "reward=jpeg_incompressibility", "reward_kwargs={}", *extra])


def _losses(run):
    return [(r["step"], r["policy_loss"], r["reward"]) for r in read_metrics(run / "metrics.jsonl") if "policy_loss" in r]


def test_crd_training_changes_parameters_and_resume_is_exact(tmp_path, tiny_model):
    extra = ["crd.groups_per_step=1", "crd.sampler_decay=linear:0.2,0.1,1,0.999"]  # 2 steps/epoch; sampler lags
    full = tmp_path / "full"
    assert Trainer(_cfg(tiny_model, "crd", *extra), full).train()["epochs"] == 2
    base, _, _ = load_unet(tiny_model)
    state = load_checkpoint(full)
    assert any(not torch.equal(v, state["policy"][k]) for k, v in base.state_dict().items() if k in state["policy"])
    assert {"old", "sampler"} <= set(state["snapshots"]) and state["algorithm"] == {"step": 4}
    part = tmp_path / "part"
    Trainer(_cfg(tiny_model, "crd", *extra, "epochs=1"), part).train()
    resumed = Trainer(_cfg(tiny_model, "crd", *extra), part, resume=True)
    assert resumed.start_epoch == 1 and resumed.algo.step == 2
    resumed.train()
    assert _losses(part) == _losses(full)
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    for snap in ("old", "sampler"):
        assert all(torch.equal(a["snapshots"][snap][k], b["snapshots"][snap][k]) for k in a["snapshots"][snap])


def test_diffusion_nft_trains_through_the_cli_preset(tmp_path, tiny_model):
    run = tmp_path / "nft"
    Trainer(_cfg(tiny_model, "diffusion_nft"), run).train()
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "policy_loss" in r]
    assert len(rows) == 2 and all("nft/positive_loss" in r and r["old_decay"] >= 0 for r in rows)
    assert set(load_checkpoint(run)["snapshots"]) == {"old"}
