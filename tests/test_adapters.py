"""Diffusers adapters (SD3, FLUX, SD1.5) on tiny random pipelines built offline in the test:
loading, encoding cache, batched CFG, reference model, snapshots, mixed precision, and two
training steps per family (LoRA and full fine-tuning) through the real trainer and presets."""

import pytest
import torch
from tiny_diffusers import make_flux, make_sd3, make_sd15

from diffalign.config import load_config
from diffalign.errors import CheckpointError, ConfigError
from diffalign.models.base import Policy
from diffalign.models.factory import ModelOptions, build_policy
from diffalign.training.rundir import load_checkpoint, read_metrics
from diffalign.training.trainer import TrainConfig, Trainer

FAMILIES = ("sd3", "flux", "sd15")
SIZE = 32  # pixels; latents 4×16×16 (VAE factor 2)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": make_sd3(root / "sd3"), "flux": make_flux(root / "flux"), "sd15": make_sd15(root / "sd15")}


def _opts(**kw) -> ModelOptions:
    return ModelOptions(dtype=kw.pop("dtype", "float32"), device="cpu", max_sequence_length=16, **kw)


def _policy(pipes, family, lora_rank=4, **kw):
    return build_policy(family, pipes[family], image_size=SIZE, lora_rank=lora_rank, options=_opts(**kw))


def _t(policy, b=2):
    return torch.tensor([0.7, 0.3][:b]) if policy.prediction == "flow" else torch.tensor([700, 300][:b])


def _perturb_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_protocol_cfg_reference_and_snapshots(pipes, family):
    pol = _policy(pipes, family)
    assert isinstance(pol, Policy)
    assert all("lora_" in k for k in pol.trainable_state()) and pol.trainable_state()
    # cached, batched encoding
    cond = pol.encode(["a red cat", "a blue dog"])
    assert len(cond) == 2 and len(pol._cache) == 2
    again = pol.encode(["a blue dog"])
    torch.testing.assert_close(again.embeds[0], cond.embeds[1])
    assert len(pol._cache) == 2
    shape = pol.latent_shape(SIZE, SIZE)
    assert shape == (4, 16, 16)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    t = _t(pol)
    with torch.no_grad():
        base = pol.predict(x, t, cond)
        assert base.dtype == torch.float32 and base.shape == x.shape
        # batched CFG equals the two separate branches
        if family != "flux":
            uncond = pol.predict(x, t, pol.null_conditioning(2))
            torch.testing.assert_close(pol.predict(x, t, cond, guidance_scale=3.0), uncond + 3.0 * (base - uncond),
                                       rtol=1e-4, atol=1e-5)
        # snapshot of the untouched adapters, then move them
        pol.save_snapshot("old")
        _perturb_lora(pol)
        moved = pol.predict(x, t, cond)
        assert not torch.allclose(moved, base)
        with pol.reference():  # adapters off: the base model
            torch.testing.assert_close(pol.predict(x, t, cond), base)
        with pol.use_snapshot("old"):
            torch.testing.assert_close(pol.predict(x, t, cond), base)
        torch.testing.assert_close(pol.predict(x, t, cond), moved)  # context left cleanly
        pol.ema_snapshot("old", 0.0)  # decay 0: the snapshot becomes θ
        with pol.use_snapshot("old"):
            torch.testing.assert_close(pol.predict(x, t, cond), moved)
        images = pol.decode(x)
        assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
        z = pol.encode_images(images)
        assert z.shape == x.shape and z.dtype == torch.float32


def test_flux_guidance_embedding_and_true_cfg(pipes):
    from diffalign.models.flux import pack_latents, unpack_latents

    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(unpack_latents(pack_latents(x), 16, 16), x)
    assert pack_latents(x).shape == (2, 64, 16)
    pol = _policy(pipes, "flux")
    cond = pol.encode(["a cat", "a dog"])
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        # FLUX.1-dev: the guidance scale goes to the guidance embedding (one forward)
        assert not torch.allclose(pol.predict(x, t, cond, guidance_scale=1.0), pol.predict(x, t, cond, 3.5))
        tc = _policy(pipes, "flux", true_cfg=True)
        c, u = tc.predict(x, t, cond), tc.predict(x, t, tc.null_conditioning(2))
        torch.testing.assert_close(tc.predict(x, t, cond, guidance_scale=2.0), u + 2.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_sd3_without_t5_and_bf16_weights_with_float32_lora(pipes, tmp_path):
    pol = _policy(pipes, "sd3", use_t5=False, dtype="bfloat16")
    assert pol.text_encoder_3 is None
    cond = pol.encode(["a cat"])
    assert cond.embeds.dtype == torch.bfloat16 and bool((cond.embeds[0, 16:] == 0).all())  # zeros for T5
    assert all(p.dtype == torch.float32 for p in pol.trainable_parameters())
    assert next(pol.denoiser.parameters()).dtype in (torch.bfloat16, torch.float32)
    x = torch.randn(1, *pol.latent_shape(SIZE, SIZE))
    v = pol.predict(x, 0.5, cond, guidance_scale=2.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    # full fine-tuning: the reference is the frozen base copy
    full = _policy(pipes, "sd3", lora_rank=0)
    assert len(full.trainable_parameters()) == len(list(full.denoiser.parameters()))
    cond = full.encode(["a cat"])
    with torch.no_grad():
        base = full.predict(x, 0.5, cond)
        _perturb_lora(full)  # perturbs every weight
        with full.reference():
            torch.testing.assert_close(full.predict(x, 0.5, cond), base)
    out = full.save_trainable(tmp_path / "w.safetensors")
    assert out.stat().st_size > 0


def test_gradient_checkpointing_same_gradients(pipes):
    grads, state = [], None
    for ckpt in (False, True):
        pol = _policy(pipes, "sd3", gradient_checkpointing=ckpt)
        assert pol.gradient_checkpointing == ckpt
        with torch.no_grad():
            if state is None:
                _perturb_lora(pol)
                state = {k: v.detach().clone() for k, v in pol.trainable_state().items()}
            for k, v in pol.trainable_state().items():
                v.copy_(state[k])
        pol.train()
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        cond = pol.encode(["a cat", "a dog"])
        pol.predict(x, torch.tensor([0.3, 0.6]), cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in pol.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_sd15_flow_view_inverts_epsilon_view(pipes):
    from diffalign.models.epsilon_view import EpsilonView
    from diffalign.models.sd15 import FlowView

    pol = _policy(pipes, "sd15")
    assert pol.prediction == "epsilon" and pol.steps_offset == 1
    flow = FlowView(pol)
    cond = pol.encode(["a cat", "a dog"])
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([701, 301])
    with torch.no_grad():
        direct = pol.predict(x, t, cond, guidance_scale=2.0)
        round_trip = EpsilonView(flow, alphas_cumprod=pol.alphas_cumprod).predict(x, t, cond, guidance_scale=2.0)
    torch.testing.assert_close(round_trip, direct, rtol=1e-3, atol=1e-3)


def test_missing_model_and_hub_id_fail_clearly(pipes, tmp_path):
    with pytest.raises(CheckpointError, match="looks like a hub id.*huggingface-cli download"):
        build_policy("sd3", "stabilityai/stable-diffusion-3.5-medium", options=_opts())
    with pytest.raises(ConfigError, match="needs model=<local pipeline directory>"):
        build_policy("flux", None, options=_opts())
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(CheckpointError, match="missing subfolder.*vae"):
        build_policy("sd15", tmp_path / "half", options=_opts())
    with pytest.raises(ConfigError, match="match no layer.*to_q"):
        build_policy("sd3", pipes["sd3"], image_size=SIZE, lora_rank=2, options=_opts(lora_targets=["no_such"]))
    with pytest.raises(ConfigError, match="multiples of 4"):
        build_policy("flux", pipes["flux"], image_size=30, options=_opts())
    with pytest.raises(ConfigError, match="needs prompt_file"):
        load_config(TrainConfig, None, ["model_family=sd3"]).validate()


# --------------------------------------------------------------------------- training


def _train_cfg(pipes, family, preset, tmp_path, lora_rank, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# tiny prompts\na red cat\na blue dog\n\na green bird\n")
    return load_config(TrainConfig, f"configs/{family}/{preset}.yaml", [
        f"model={pipes[family]}", f"model_family={family}", f"image_size={SIZE}", f"prompt_file={prompts}",
        f"lora_rank={lora_rank}", "model_options.dtype=float32", "model_options.device=cpu",
        "model_options.max_sequence_length=16", "model_options.gradient_checkpointing=false",
        "epochs=2", "prompts_per_epoch=2", "group_size=2", "ckpt_every=1", "lr=1e-3",
        "rollout.steps=2", "rollout.batch_size=4", "eval.every=0", "eval.num_images=2", "eval.steps=2",
        "reward=jpeg_incompressibility", "reward_kwargs={}", *extra,
    ])


GRPO_RUNS = [("sd3", "flow_grpo", 4), ("sd3", "flow_grpo", 0), ("flux", "flow_grpo", 4), ("flux", "dance_grpo", 0),
             ("sd15", "ddpo", 4), ("sd15", "ddpo", 0)]


@pytest.mark.parametrize("family,preset,lora_rank", GRPO_RUNS)
def test_two_grpo_steps_change_parameters(pipes, tmp_path, family, preset, lora_rank):
    cfg = _train_cfg(pipes, family, preset, tmp_path, lora_rank, "rollout.sde_window=null", "grpo.minibatch_size=4",
                     "grpo.clip_range=0.2", "grpo.running_min_count=1")
    trainer = Trainer(cfg, tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.policy.trainable_state().items()}
    summary = trainer.train()
    assert summary["epochs"] == 2 and "final_score" in summary
    after = load_checkpoint(tmp_path / "run")["policy"]
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    if lora_rank:
        assert all("lora_" in k for k in after)
        assert any(bool(after[k].abs().sum()) for k in after if "lora_B" in k)  # B starts at zero
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "policy_loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows)


def test_grpo_micro_batches_give_the_same_update():
    """micro_batch_size splits a minibatch's forward passes; the accumulated update is the same."""
    from tiny import tiny_policy

    from diffalign.algorithms.flow_grpo import GRPO, GRPOConfig
    from diffalign.sampling.rollout import RolloutConfig, rollout

    prompts = ["a red circle"] * 3 + ["a square"] * 3
    gids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = torch.linspace(-1, 1, 6)
    finals = []
    for micro in (0, 4):
        pol = tiny_policy(2)
        traj = rollout(pol, prompts, gids, RolloutConfig(steps=2), generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(pol.trainable_parameters(), lr=0.1)
        GRPO(GRPOConfig(clip_range=0.2, minibatch_size=6, micro_batch_size=micro)).update(
            pol, opt, traj, adv, torch.Generator().manual_seed(1))
        finals.append(torch.cat([p.detach().flatten() for p in pol.trainable_parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)


PREFERENCE = ("diffusion_dpo", "seppo", "sft")


def _preset_algorithm(path):
    """The ``algorithm`` a preset sets, following its ``base:`` chain."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if "algorithm" in data:
        return data["algorithm"]
    return _preset_algorithm((path.parent / data["base"]).resolve()) if "base" in data else None


def _presets(kind):
    from pathlib import Path

    return [pytest.param(p, id=f"{fam}/{p.stem}") for fam in FAMILIES for p in sorted(Path("configs", fam).glob("*.yaml"))
            if (kind == "pref") == (_preset_algorithm(p) in PREFERENCE)]


@pytest.mark.parametrize("preset", _presets("rl"))
def test_rl_presets_validate(preset):
    with pytest.raises(ConfigError, match="needs prompt_file"):
        load_config(TrainConfig, preset).validate()
    cfg = load_config(TrainConfig, preset, ["prompt_file=prompts.txt"])
    cfg.validate()
    assert cfg.model_family == preset.parent.name


def test_every_family_has_every_algorithm():
    from pathlib import Path

    wanted = {"flow_grpo", "dance_grpo", "consistent_rft", "crd", "diffusion_nft", "diffusion_dpo", "seppo", "sft"}
    for fam in FAMILIES:
        have = {p.stem for p in Path("configs", fam).glob("*.yaml")}
        assert wanted <= have, (fam, wanted - have)
    assert Path("configs/sd15/ddpo.yaml").exists()


@pytest.mark.parametrize("preset", _presets("pref"))
def test_preference_presets_validate(preset):
    if not _preference_takes_model_family():
        pytest.skip("the preference trainer does not take model_family yet (ShapesWorld only)")
    from diffalign.training.preference import PreferenceConfig

    cfg = load_config(PreferenceConfig, preset)
    cfg.validate()


CRD_RUNS = [("sd3", 4), ("flux", 0), ("sd15", 4)]


@pytest.mark.parametrize("family,lora_rank", CRD_RUNS)
def test_two_crd_steps_change_parameters(pipes, tmp_path, family, lora_rank):
    """CRD's forward-process update (clean-sample rollouts from the `sampler` snapshot, implicit
    reward against `old`, KL to the CFG-guided base with adapters off) on each family; SD1.5
    through its flow view."""
    cfg = _train_cfg(pipes, family, "crd", tmp_path, lora_rank, "crd.groups_per_microbatch=1")
    trainer = Trainer(cfg, tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.policy.trainable_state().items()}
    trainer.train()
    state = load_checkpoint(tmp_path / "run")
    after = state["policy"]
    assert [k for k in before if not torch.equal(before[k], after[k])], "no parameter changed"
    assert {"old", "sampler"} <= set(state["snapshots"])
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r and "step" in r]
    assert len([r for r in rows if r["step"] > 0]) == 2


def _pipeline(family, pol):
    """The diffusers pipeline made of the adapter's own components (full-FT policy: no LoRA)."""
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
    )

    if family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=pol.denoiser, vae=pol.vae, scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=pol.text_encoder, text_encoder_2=pol.text_encoder_2, text_encoder_3=pol.text_encoder_3,
            tokenizer=pol.tokenizers[0], tokenizer_2=pol.tokenizers[1], tokenizer_3=pol.tokenizers[2])
    if family == "flux":
        return FluxPipeline(transformer=pol.denoiser, vae=pol.vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                            text_encoder=pol.text_encoder, text_encoder_2=pol.text_encoder_2,
                            tokenizer=pol.tokenizers[0], tokenizer_2=pol.tokenizers[1])
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False, set_alpha_to_one=True)
    return StableDiffusionPipeline(unet=pol.denoiser, vae=pol.vae, text_encoder=pol.text_encoder,
                                   tokenizer=pol.tokenizer, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_matches_the_diffusers_pipeline(pipes, family):
    """Our deterministic rollout (Euler ODE; DDIM η=0 for SD1.5) with CFG / guidance reproduces the
    diffusers pipeline's own sampling loop from the same initial latents: same prompt encoding,
    timestep scaling, latent packing, guidance and update rule."""
    from diffalign.models.flux import pack_latents, unpack_latents
    from diffalign.sampling.rollout import RolloutConfig, rollout

    pol = _policy(pipes, family, lora_rank=0)
    pipe = _pipeline(family, pol)
    prompts, w = ["a red cat", "a dog"], 3.0
    sampler = "ddim" if family == "sd15" else "ode"
    traj = rollout(pol, prompts, torch.arange(2), RolloutConfig(sampler=sampler, steps=2, guidance_scale=w,
                                                                noise_level=0.0), generator=torch.Generator().manual_seed(0))
    x0, ours = traj.latents[:, 0], traj.latents[:, -1]
    kw = {"prompt": prompts, "num_inference_steps": 2, "guidance_scale": w, "output_type": "latent",
          "height": SIZE, "width": SIZE}
    with torch.no_grad():
        if family == "sd3":
            theirs = pipe(latents=x0, sigmas=[1.0, 0.5], max_sequence_length=16, **kw).images
        elif family == "flux":
            theirs = unpack_latents(pipe(latents=pack_latents(x0), sigmas=[1.0, 0.5], max_sequence_length=16,
                                         **kw).images, 16, 16)
        else:
            theirs = pipe(latents=x0, eta=0.0, **kw).images
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def _preference_takes_model_family() -> bool:
    import dataclasses

    try:
        from diffalign.training.preference import PreferenceConfig
    except ImportError:
        return False

    return "model_family" in {f.name for f in dataclasses.fields(PreferenceConfig)}


@pytest.fixture(scope="module")
def shapes_prefs(tmp_path_factory):
    """8 ShapesWorld pairs at 32 px (renders as winners, random images as losers)."""
    from tiny import write_render_prefs

    from diffalign.world.grammar import prompt_splits

    root = tmp_path_factory.mktemp("prefs") / "prefs"
    return write_render_prefs(root, prompt_splits()["train"]["colors"][:8], shard_size=8)


@pytest.mark.skipif(not _preference_takes_model_family(),
                    reason="the preference trainer does not take model_family yet (ShapesWorld only)")
@pytest.mark.parametrize("family,lora_rank", [("sd3", 4), ("flux", 0), ("sd15", 4)])
def test_two_seppo_steps_change_parameters(pipes, shapes_prefs, tmp_path, family, lora_rank):
    """SePPO (reference pool of snapshots, reference samples drawn on the fly, anchor flipper)
    through the preference trainer on each family; SD1.5 through its flow view."""
    from diffalign.training.preference import PreferenceConfig, PreferenceTrainer

    cfg = load_config(PreferenceConfig, f"configs/{family}/seppo.yaml", [
        f"model={pipes[family]}", f"data={shapes_prefs}", f"lora_rank={lora_rank}", "lr=1e-3", "beta=50",
        "model_options.dtype=float32", "model_options.device=cpu", "model_options.max_sequence_length=16",
        "model_options.gradient_checkpointing=false", "batch_size=2", "grad_accum=1", "max_updates=2",
        "ckpt_every=1", "eval.num_images=2", "eval.steps=1", "eval.every=0", "eval.final_splits=[test]",
        "eval.final_num_images=2", "seppo.sampler.steps=2", "seppo.pool_every=1", "seppo.pool_size=3"])
    trainer = PreferenceTrainer(cfg, tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.policy.trainable_state().items()}
    trainer.train()
    after = load_checkpoint(tmp_path / "run")["policy"]
    assert [k for k in before if not torch.equal(before[k], after[k])], "no parameter changed"
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "flip_fraction" in r]
    assert len(rows) == 2
