"""benchmarks/fixed_prompts.py and benchmarks/sampler_gap.py on a tiny model (real trainer, sampler, verifier)."""

import json

import pytest
import torch
from tiny import load_benchmark, tiny_unet

from diffalign.models.checkpoint import save_unet


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The benchmarks set torch's thread count; later tests compare float results across processes."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


def test_fixed_prompts_brightness_control_moves_brightness(tmp_path, tiny_model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = load_benchmark("fixed_prompts").main([
        "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--epochs", "4", "--every", "2", "--images", "8",
        "--threads", "1", "--reward", "brightness", "--set", f"model={tiny_model}", "--set", "lora_rank=0",
        "--set", "prompts_per_epoch=4", "--set", "group_size=4", "--set", "rollout.steps=3",
        "--set", "rollout.sde_window=null", "--set", "grpo.minibatch_size=16", "--set", "grpo.beta_kl=0",
        "--set", "lr=3e-3", "--summary", str(tmp_path / "learning.json"), "--summary-key", "fixed/bright"])
    rows = out["evaluations"]
    assert [r["epoch"] for r in rows] == [0, 2, 4]
    assert [r["rollout_images"] for r in rows] == [0, 32, 64] and rows[1]["train_s"] <= rows[2]["train_s"]
    summary = json.loads((tmp_path / "learning.json").read_text())["fixed"]["bright"]
    assert summary["base"] == rows[0]["score"] and summary["final"] == rows[-1]["score"] and summary["images"] == 64
    assert all(len(r["per_prompt_score"]) == len(r["per_prompt_partial"]) == 2 and 0 <= r["graded"] <= 1 for r in rows)
    assert all(s <= p for r in rows for s, p in zip(r["per_prompt_score"], r["per_prompt_partial"], strict=True))
    assert rows[-1]["brightness"] > rows[0]["brightness"] + 0.02  # the control reward is climbed


def test_fixed_prompts_init_seed_trains_from_fixed_noises_and_scores_them(tmp_path, tiny_model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    args = ["--prompts", str(prompts), "--epochs", "2", "--every", "2", "--images", "4", "--threads", "1",
            "--reward", "brightness", "--set", f"model={tiny_model}", "--set", "lora_rank=0",
            "--set", "prompts_per_epoch=2", "--set", "group_size=2", "--set", "rollout.steps=2",
            "--set", "rollout.sde_window=null", "--set", "rollout.init_noise=shared", "--set", "grpo.minibatch_size=4"]
    a = load_benchmark("fixed_prompts").main([*args, "--out", str(tmp_path / "a"), "--init-seed", "5"])
    b = load_benchmark("fixed_prompts").main([*args, "--out", str(tmp_path / "b"), "--init-seed", "6"])
    assert a["init_seed"] == 5 and [r["epoch"] for r in a["train"]] == [0, 1]
    assert all(0 <= r["seen_score"] <= 1 for r in a["evaluations"]) and "pass_rate" in a["train"][0]
    # the fresh-noise evaluation does not depend on the training noises; the training rollouts do
    assert a["evaluations"][0]["brightness"] == b["evaluations"][0]["brightness"]
    assert a["train"][0]["reward"] != b["train"][0]["reward"]


def test_sampler_gap_scores_every_target_and_sampler(tmp_path, tiny_model, capsys):
    out = load_benchmark("sampler_gap").main(["--targets", f"base,{tiny_model}", "--images", "6", "--threads", "1",
                                              "--samplers", "sde,ode10"])
    got = [(r["target"], r["sampler"]) for r in out["results"]]
    assert got == [("base", "sde"), ("base", "ode10"), (tiny_model, "sde"), (tiny_model, "ode10")]
    assert all(0 <= r["score"] <= r["partial"] <= 1 for r in out["results"])
    assert "| target | sampler | CFG | score |" in capsys.readouterr().out
    # each target is its own model: the shipped base draws shapes the verifier accepts, a random tiny model none
    assert out["results"][0]["score"] > 0.3 and out["results"][2]["score"] == 0.0


def test_sampler_gap_fm_loss_shows_cfg_samples_off_the_training_data(tmp_path):
    """The shipped base's CFG-4.5 samples lie much farther from its training data than renders
    do (measured 0.11 vs 0.009 at σ = 0.3 on 384 images); CFG-1 samples in between."""
    out = load_benchmark("sampler_gap").main(["--images", "8", "--threads", "1", "--samplers", "ode10",
                                              "--cfgs", "1,4.5", "--fm-loss", "--json", str(tmp_path / "s.json")])
    rows = out["results"]
    assert [(r["target"], r["cfg"]) for r in rows] == [("renders", None), ("base", 1.0), ("base", 4.5)]
    renders, cfg1, cfg45 = rows
    assert renders["score"] == 1.0 and renders["out_of_range"] == 0.0
    assert cfg45["out_of_range"] > 0.1 > renders["out_of_range"]  # CFG pushes the white background past 1
    assert cfg45["fm_loss@0.3"] > 4 * renders["fm_loss@0.3"] and cfg1["fm_loss@0.3"] < cfg45["fm_loss@0.3"]
    assert json.loads((tmp_path / "s.json").read_text())["fm_sigmas"] == [0.05, 0.1, 0.3, 0.5, 0.8]


def test_signal_steps_is_zero_without_noise_and_finds_signal_on_the_base(tmp_path):
    """Rung 3: with noise level 0 no step can change a verdict (exactly); on the shipped base
    with the preset's noise the first step changes far more than the last."""

    from diffalign.models.tiny import TinyFlowPolicy
    from diffalign.rewards import build_reward
    from diffalign.sampling.rollout import RolloutConfig

    bench = load_benchmark("signal_steps")
    policy, reward = TinyFlowPolicy.from_checkpoint(), build_reward("shapes_verifier", mode="partial")
    quiet = bench.step_signal(policy, ["a square and a triangle"], RolloutConfig(steps=10, noise_level=0.0), reward,
                              noises=2, resamples=3, steps=[0, 9])
    assert [r["step"] for r in quiet] == [0, 9] and all(r["flip"] == 0 and r["reward_std"] == 0 for r in quiet)
    noisy = bench.step_signal(policy, ["a square and a triangle"], RolloutConfig(steps=10, noise_level=0.7), reward,
                              noises=6, resamples=4, steps=[0, 9])
    assert noisy[0]["sigma"] == 1.0 and 0 <= noisy[1]["flip"] <= 1
    assert noisy[0]["reward_std"] > noisy[1]["reward_std"] + 0.05, noisy  # measured 0.166 vs 0.009 (48 sets)


def test_best_of_n_trains_on_passing_samples(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = load_benchmark("best_of_n").main([
        "--prompts", str(prompts), "--iters", "2", "--every", "2", "--group", "8", "--images", "4",
        "--threads", "2", "--sigma-min", "0.5", "--json", str(tmp_path / "b.json")])
    rows = out["evaluations"]
    assert [r["iter"] for r in rows] == [0, 2] and rows[1]["rollout_images"] == 16
    assert 0 < rows[1]["kept_images"] <= 16  # the base draws a red circle most of the time
    assert 0 <= rows[1]["rollout_pass_rate"] <= 1 and (tmp_path / "b.json").exists()


@pytest.mark.parametrize("mode", ["--renders", "--snap", "--renders-for-kept"])
def test_best_of_n_controls(tmp_path, tiny_model, mode):
    """--renders trains on every renderer image (the ceiling control); --snap on palette-snapped samples."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = load_benchmark("best_of_n").main([
        "--prompts", str(prompts), "--iters", "2", "--every", "2", "--group", "4", "--images", "2",
        "--threads", "1", "--eval-cfg", "1", mode, "--set", "lora_rank=4",
        # a random tiny model passes nothing; the shipped base draws a red circle most of the time
        "--set", f"model={'null' if mode == '--renders-for-kept' else tiny_model}",
        "--set", "rollout.steps=3", "--set", "rollout.guidance_scale=1",
        "--summary", str(tmp_path / "learning.json"), "--summary-key", "ladder/bon"])
    last = out["evaluations"][-1]
    summary = json.loads((tmp_path / "learning.json").read_text())["ladder"]["bon"]
    assert summary["data"] == {"--renders": "renders", "--snap": "own passing samples, snapped",
                               "--renders-for-kept": "renders in place of the passing samples"}[mode]
    assert summary["final"] == last["score"] and summary["images"] == 8
    assert out["eval_cfg"] == 1.0 and out[mode[2:].replace("-", "_")] is True and last["rollout_images"] == 8
    if mode == "--renders":
        assert last["kept_images"] == 8  # renders are all kept, whatever the (random) model draws
    elif mode == "--renders-for-kept":
        assert 0 < last["kept_images"] <= 8
    else:
        assert 0 <= last["kept_images"] <= 8


def test_plot_ladder_draws_each_run_and_rejects_other_json(tmp_path):
    rows = [{"rollout_images": 0, "train_s": 0.0, "score": 0.3}, {"rollout_images": 64, "train_s": 30.0, "score": 0.4}]
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"evaluations": rows}))
    bench = load_benchmark("plot_ladder")
    assert bench.load_curve(tmp_path / "a.json") == ([0, 64], [0.0, 0.5], [0.3, 0.4])
    out = bench.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", "A,B",
                      "--out", str(tmp_path / "fig" / "c.png")])
    assert out.stat().st_size > 1000
    (tmp_path / "bad.json").write_text(json.dumps({"evaluations": [{"score": 0.3}]}))
    with pytest.raises(SystemExit, match="lack"):
        bench.load_curve(tmp_path / "bad.json")
    with pytest.raises(SystemExit):  # one label per file
        bench.main([str(tmp_path / "a.json"), "--labels", "A,B", "--out", str(tmp_path / "d.png")])


def test_best_of_n_dpo_pairs_a_passing_with_a_failing_sample_of_its_prompt(tmp_path):
    bench = load_benchmark("best_of_n")
    prompts = ["a", "a", "a", "b", "b", "c", "c"]
    passed = torch.tensor([True, False, True, True, True, False, True])
    w, lo = bench.dpo_pairs(prompts, passed, torch.Generator().manual_seed(0))
    assert w.tolist() == [0, 2, 6] and lo.tolist() == [1, 1, 5]  # "b" has no failing sample: no pair
    # a short DPO run on the shipped base: pairs form and the policy moves without collapsing the run
    (tmp_path / "p.txt").write_text("four blue circles\n")
    out = bench.main(["--prompts", str(tmp_path / "p.txt"), "--iters", "2", "--every", "2", "--group", "8",
                      "--images", "2", "--threads", "1", "--eval-cfg", "1", "--dpo-beta", "1000", "--lr", "1e-3",
                      "--set", "rollout.guidance_scale=1", "--set", "rollout.sampler=ode", "--set", "rollout.steps=4"])
    assert out["dpo_beta"] == 1000 and out["evaluations"][-1]["kept_images"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--prompts", str(tmp_path / "p.txt"), "--dpo-beta", "1", "--snap"])


@pytest.mark.parametrize("only", [False, True])
def test_best_of_n_replay_trains_on_renders_of_other_prompts(tmp_path, tiny_model, only):
    """--replay adds renders of other training prompts to every step (a random tiny model passes
    nothing, so those alone move it); --replay-only trains on them and on nothing of the rollout."""
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = load_benchmark("best_of_n").main([
        "--prompts", str(tmp_path / "p.txt"), "--iters", "1", "--every", "1", "--group", "4", "--images", "2",
        "--threads", "1", "--eval-cfg", "1", "--replay", "4", *(["--replay-only"] if only else []),
        "--set", f"model={tiny_model}", "--set", "lora_rank=0", "--set", "rollout.steps=2",
        "--set", "rollout.guidance_scale=1"])
    last = out["evaluations"][-1]
    assert out["replay"] == 4 and out["replay_only"] is only and last["kept_images"] == 0
    assert last["optimizer_steps"] == 2  # both steps of the iteration ran, on the replay renders alone
    with pytest.raises(SystemExit):
        load_benchmark("best_of_n").main(["--prompts", str(tmp_path / "p.txt"), "--replay-only"])


def test_lora_drift_measures_the_weight_change_of_real_lora_runs(tmp_path, tiny_model):
    """benchmarks/lora_drift.py on two real 1-epoch LoRA runs: ΔW = B·A per layer (checked by hand
    for one conv layer), a run compared with its own checkpoint directory has cosine 1, and a
    checkpoint without LoRA weights is refused with a clear message."""
    from diffalign.config import load_config
    from diffalign.training.rundir import load_checkpoint
    from diffalign.training.trainer import TrainConfig, Trainer

    runs = []
    for seed in (0, 1):
        cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
            f"model={tiny_model}", "lora_rank=4", "epochs=1", "prompts_per_epoch=2", "group_size=4", "rollout.steps=3",
            "rollout.sde_window=null", "eval.every=0", "grpo.minibatch_size=8", "lr=1e-2", f"seed={seed}",
            "reward=jpeg_incompressibility", "reward_kwargs={}", "threads=1"])
        Trainer(cfg, tmp_path / f"r{seed}").train()
        runs.append(tmp_path / f"r{seed}")
    bench = load_benchmark("lora_drift")
    ckdir = next((runs[0] / "checkpoints").glob("step_*"))
    out = bench.main([str(runs[0]), str(runs[1]), str(ckdir), "--json", str(tmp_path / "d.json")])
    r0 = out["runs"][str(runs[0])]
    assert r0["delta_norm"] > 0 and r0["epoch"] == 1
    assert json.loads((tmp_path / "d.json").read_text()) == out

    policy = load_checkpoint(runs[0])["policy"]
    a_name = next(k for k in policy if ".lora_A." in k and policy[k].dim() == 4)
    a, b = policy[a_name].float(), policy[a_name.replace(".lora_A.", ".lora_B.")].float()
    by_hand = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a).flatten()
    deltas = bench.lora_deltas(load_checkpoint(runs[0]), 1.0)
    assert torch.allclose(deltas[a_name.split(".lora_A.")[0]], by_hand, atol=1e-7)
    total = float(torch.cat(list(deltas.values())).norm())
    assert r0["delta_norm"] == pytest.approx(total, rel=1e-5)

    cos = {tuple(p["runs"]): p["cosine"] for p in out["pairs"]}
    assert cos[(str(runs[0]), str(ckdir))] == pytest.approx(1.0, abs=1e-9)
    assert -1 <= cos[(str(runs[0]), str(runs[1]))] < 0.99

    with pytest.raises(SystemExit, match="no LoRA weights"):
        bench.lora_deltas({"policy": {"conv.weight": torch.zeros(2, 2)}}, 1.0)


def test_velocity_change_profiles_the_change_per_noise_level(tmp_path, tiny_model):
    """benchmarks/velocity_change.py: a model against itself changes nothing at any σ; two
    different models give the hand-computed relative change at the first step (where the states
    are the initial noises), and the 10- / 20-step grid flags mark the right σ of a 40-step grid."""
    from diffalign.evaluation.report import load_policy_for_eval
    from diffalign.sampling.generate import initial_noise
    from diffalign.world.grammar import eval_prompts

    bench = load_benchmark("velocity_change")
    same = bench.main([tiny_model, "--base", tiny_model, "--images", "3", "--grid", "40", "--threads", "1",
                       "--json", str(tmp_path / "v.json")])
    rows = same["rows"]
    assert len(rows) == 40 and all(r["rel_change"] == 0 for r in rows)
    assert [r["sigma"] for r in rows if r["on_10"]] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert sum(r["on_20"] for r in rows) == 20 and [r["sigma"] for r in rows if r["trained"]] == [1.0, 0.9]
    assert json.loads((tmp_path / "v.json").read_text()) == same

    other = str(save_unet(tmp_path / "other.safetensors", tiny_unet(1), 32))
    a, _ = load_policy_for_eval(other)
    b, _ = load_policy_for_eval(tiny_model)
    prompts = eval_prompts("test", 3, seed=7)
    rows = bench.profile(a, b, prompts, 4, 4.5, seed=0)
    x = initial_noise(b.latent_shape(32, 32), [0, 1, 2])
    with torch.no_grad():
        va = a.predict(x, torch.tensor(1.0), a.encode(prompts), guidance_scale=4.5)
        vb = b.predict(x, torch.tensor(1.0), b.encode(prompts), guidance_scale=4.5)
    by_hand = float((va - vb).flatten(1).norm(dim=1).sum() / vb.flatten(1).norm(dim=1).sum())
    assert rows[0]["rel_change"] == pytest.approx(by_hand, rel=1e-5) and rows[0]["rel_change"] > 0


def test_sampler_gap_grid_sampler_matches_the_rollout_ode_on_its_grid(tmp_path, tiny_model):
    """The explicit-grid Euler sampler of benchmarks/sampler_gap.py on the uniform 10-step grid
    reproduces the 10-step ODE rollout from the same initial noise; the two mixed grids fall
    from 1 to 0 through the trained steps (1.0, 0.9 → 0.8 / 20-step grid to 0.8) in 18 and 12 steps."""
    from diffalign.evaluation.report import load_policy_for_eval
    from diffalign.sampling.rollout import RolloutConfig, rollout

    bench = load_benchmark("sampler_gap")
    policy, _ = load_policy_for_eval(tiny_model)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    with torch.no_grad():
        traj = rollout(policy, prompts, torch.arange(3), RolloutConfig(sampler="ode", steps=10, guidance_scale=4.5),
                       generator=torch.Generator().manual_seed(123))
    x0, images = bench.grid_sample(policy, prompts, [round(1 - 0.1 * i, 4) for i in range(11)], 4.5)
    torch.testing.assert_close(x0, traj.latents[:, -1], atol=1e-5, rtol=1e-4)
    assert images.shape == traj.images.shape
    a, b = bench.GRIDS["ode10>20"], bench.GRIDS["ode20>10"]
    assert (len(a) - 1, len(b) - 1) == (18, 12) and a[:3] == [1.0, 0.9, 0.8] and b[:5] == [1.0, 0.95, 0.9, 0.85, 0.8]
    assert a[-1] == b[-1] == 0.0 and all(y < x for g in (a, b) for x, y in zip(g, g[1:], strict=False))
    with pytest.raises(ValueError, match="fall strictly from 1 to 0"):
        bench.grid_sample(policy, prompts, [1.0, 0.5, 0.6, 0.0], 4.5)
    with pytest.raises(SystemExit, match="unknown sampler"):
        bench.main(["--targets", "base", "--images", "2", "--samplers", "ode7"])


def test_matched_reward_picks_the_kept_checkpoint_nearest_a_common_reward(tmp_path, tiny_model):
    """benchmarks/matched_reward.py on two real tiny runs that keep every checkpoint: the common
    value is the lowest best smoothed reward, each run's matched checkpoint is its nearest kept
    one, that step is what gets evaluated, and claims.json gets final and matched figures."""
    from diffalign.config import load_config
    from diffalign.training.trainer import TrainConfig, Trainer

    runs = []
    for name, lr in (("fast-seed0", "3e-2"), ("slow-seed0", "1e-4")):
        cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
            f"model={tiny_model}", "lora_rank=0", "epochs=4", "prompts_per_epoch=2", "group_size=4",
            "rollout.steps=3", "rollout.sde_window=null", "eval.every=0", "grpo.minibatch_size=8", f"lr={lr}",
            "lr_schedule=constant", "reward=jpeg_incompressibility", "reward_kwargs={}", "threads=1",
            "ckpt_every=1", "ckpt_keep_every=1"])
        Trainer(cfg, tmp_path / name).train()
        runs.append(tmp_path / name)
    bench = load_benchmark("matched_reward")
    curves = {r: bench.smoothed_reward(r, 2) for r in runs}
    assert all(sorted(c) == [1, 2, 3, 4] for c in curves.values())
    value = min(max(c.values()) for c in curves.values())
    summary = tmp_path / "claims.json"
    out = bench.main([*map(str, runs), "--window", "2", "--eval-images", "4", "--images-per-prompt", "1",
                      "--eval-steps", "2", "--summary", str(summary), "--key", "toy"])
    assert out["matched_reward"] == pytest.approx(value)
    for run in runs:
        method = run.name.split("-seed")[0]
        r = out["methods"][method]["0"]
        want = min(curves[run], key=lambda s: (abs(curves[run][s] - value), s))
        assert r["matched"]["epoch"] == want and r["final"]["epoch"] == 4 and r["eval_images"] == 4
        assert r["final"]["rollout_images"] == 32 and r["matched"]["rollout_images"] == 8 * want
        assert 0 <= r["matched"]["test/score"] <= 1 and "ood/score" in r["final"]
        ev_dir = run / "eval" if want == 4 else run / "eval_matched" / f"step_{want:07d}"
        assert f"step {want}" in json.loads((ev_dir / "eval.json").read_text())["model"]
    assert json.loads(summary.read_text())["toy"] == out
    with pytest.raises(SystemExit, match="named <method>-seed"):
        bench.main([str(tmp_path)])


def test_claims_aggregates_over_seeds():
    bench = load_benchmark("claims")
    seeds = {"0": {"test/score": 0.5, "rollout_images": 10}, "1": {"test/score": 0.7, "rollout_images": 30},
             "2": {"test/score": 0.6}}
    agg = bench.aggregate(seeds)
    assert agg["test/score"] == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7, "n": 3}
    assert agg["rollout_images"] == {"mean": 20.0, "min": 10.0, "max": 30.0, "n": 2} and "ood/score" not in agg


def test_claims_records_figures_and_budgets_of_real_runs(tmp_path, tiny_model):
    """benchmarks/claims.py on real tiny runs of the three kinds it counts differently: a Flow-GRPO
    run (rollout images = epochs x prompts x group), a SePPO run (one reference sample per winner,
    no losers read) and a Diffusion-DPO run (winners and losers read, nothing generated)."""
    from tiny import write_render_prefs

    from diffalign.config import load_config
    from diffalign.evaluation.report import evaluate
    from diffalign.training.preference import PreferenceConfig, PreferenceTrainer
    from diffalign.training.trainer import TrainConfig, Trainer
    from diffalign.world.grammar import prompt_splits

    ev = {"num_images": 4, "steps": 2, "images_per_prompt": 1, "use_proxy": False}
    cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
        f"model={tiny_model}", "lora_rank=0", "epochs=2", "prompts_per_epoch=2", "group_size=4",
        "rollout.steps=2", "rollout.sde_window=null", "eval.every=0", "grpo.minibatch_size=8", "threads=1"])
    runs = [tmp_path / "flow_grpo-seed0"]
    Trainer(cfg, runs[0]).train()
    prompts = [prompt_splits()["train"]["colors"][i % 5] for i in range(8)]
    data = write_render_prefs(tmp_path / "prefs", prompts, shard_size=8)
    for preset in ("seppo", "diffusion_dpo"):
        pcfg = load_config(PreferenceConfig, f"configs/shapes/{preset}.yaml", [
            f"model={tiny_model}", f"data={data}", "lora_rank=0", "batch_size=2", "grad_accum=2", "max_updates=3",
            "eval.every=0", "eval.num_images=2", "eval.steps=1", "eval.final_splits=[]", "seppo.sampler.steps=2",
            "threads=1"])
        runs.append(tmp_path / f"{preset}-seed1")
        PreferenceTrainer(pcfg, runs[-1]).train()
    for run in runs:
        evaluate(run, run / "eval", splits=("test", "ood"), **ev)
    evaluate(tiny_model, tmp_path / "base-cfg4.5", splits=("test", "ood"), **ev)
    bench = load_benchmark("claims")
    summary = tmp_path / "claims.json"
    summary.write_text(json.dumps({"toy": {"matched": {"kept": 1}}, "other": 2}))
    out = bench.main([*map(str, runs), "--base", str(tmp_path / "base-cfg4.5"), "--key", "toy",
                      "--summary", str(summary)])
    grpo, seppo, dpo = out["final"]["flow_grpo"]["0"], out["final"]["seppo"]["1"], out["final"]["diffusion_dpo"]["1"]
    assert grpo["epochs"] == 2 and grpo["rollout_images"] == 16 and grpo["dataset_images"] == 0
    assert seppo["updates"] == 3 and seppo["rollout_images"] == 12 and seppo["dataset_images"] == 12
    assert dpo["updates"] == 3 and dpo["rollout_images"] == 0 and dpo["dataset_images"] == 24
    for e in (grpo, seppo, dpo):
        assert e["eval_images"] == 4 and e["eval_splits"] == ["ood", "test"] and 0 <= e["test/score"] <= 1
        assert e["train_minutes"] >= 0 and "ood/high_level_hallucination" in e
    assert out["aggregate"]["seppo"]["test/score"]["mean"] == seppo["test/score"]
    assert out["base"]["eval_images"] == 4 and "test/score" in out["base"]
    written = json.loads(summary.read_text())
    assert written["other"] == 2 and written["toy"]["matched"] == {"kept": 1}  # other entries are kept
    assert written["toy"]["final"] == out["final"] and written["toy"]["base"] == out["base"]
    with pytest.raises(SystemExit, match="is not finished"):
        bench.main([str(tmp_path / "nothing-seed0"), "--key", "toy"])


def test_time_to_score_nominates_from_the_smoothed_curve():
    bench = load_benchmark("time_to_score")
    rows = [{"step": 5, "eval/score": 0.5}, {"step": 10, "eval/score": 0.7}, {"step": 10, "eval/score": 0.4},
            {"step": 15, "eval/score": 0.7}, {"step": 20, "eval/score": 0.7}, {"step": 21, "reward": 1.0}]
    curve = bench.periodic_curve(rows, 2)  # the resumed step 10's last row (0.4) wins
    assert curve == [(5, 0.5), (10, pytest.approx(0.45)), (15, pytest.approx(0.55)), (20, pytest.approx(0.7))]
    kept = [4, 10, 15, 20, 30]
    assert bench.candidates(curve, kept, 0.6, 0.0) == [20, 30]  # first smoothed >= 0.6: step 20
    assert bench.candidates(curve, kept, 0.52, 0.0) == [15, 20, 30]  # not step 10: its smoothed score is 0.45
    assert bench.candidates(curve, kept, 0.6, 0.1) == [10, 15, 20, 30]  # nominated at step 5; 4 is before it
    assert bench.candidates(curve, kept, 0.8, 0.0) == []


def test_time_to_score_confirms_on_a_real_run(tmp_path, tiny_model):
    """A real tiny DiffusionNFT run keeping every checkpoint: a target every score meets is reached
    at the first checkpoint at or after the first periodic evaluation; one no score can meet is not
    reached after --max-evals confirmations, each a cached test-split evaluation of that step; a
    gain target reads the base's evaluation at the run's own CFG."""
    from diffalign.config import load_config
    from diffalign.evaluation.report import evaluate
    from diffalign.training.trainer import TrainConfig, Trainer

    run = tmp_path / "nft-seed0"
    cfg = load_config(TrainConfig, "configs/shapes/diffusion_nft_anchored.yaml", [
        f"model={tiny_model}", "lora_rank=0", "epochs=3", "prompts_per_epoch=2", "group_size=4", "rollout.steps=2",
        "nft.groups_per_step=2", "nft.groups_per_microbatch=2", "eval.every=1", "eval.num_images=4", "eval.steps=2",
        "threads=1", "ckpt_every=1", "ckpt_keep_every=1"])
    Trainer(cfg, run).train()
    evaluate(tiny_model, tmp_path / "base-cfg1", num_images=4, steps=2, guidance_scale=1.0, splits=("test",),
             images_per_prompt=1, use_proxy=False)
    bench = load_benchmark("time_to_score")
    common = [str(run), "--eval-images", "4", "--images-per-prompt", "1", "--eval-steps", "2", "--smooth", "1"]
    out = bench.main([*common, "--target", "0", "--target", "1.5", "--slack", "2", "--max-evals", "2",
                      "--gain", "-2", "--base-from", str(tmp_path), "--summary", str(tmp_path / "c.json"),
                      "--key", "toy"])
    e = out["methods"]["nft"]["0"]
    assert e["eval_guidance"] == 1.0 and e["final"]["rollout_images"] == 24 and e["final"]["epochs"] == 3
    easy, hard, gain = e["targets"]["score 0"], e["targets"]["score 1.5"], e["targets"]["base + -2"]
    assert easy["reached"]["epoch"] == 1 and easy["reached"]["rollout_images"] == 8 and len(easy["tried"]) == 1
    assert hard["reached"] is None and [t["epoch"] for t in hard["tried"]] == [1, 2]
    assert hard["best_confirmed"] == max(t["score"] for t in hard["tried"])
    assert gain["reached"]["epoch"] == 1 and gain["target"] <= -1
    ev = json.loads((run / "eval_ckpt" / "step_0000002" / "eval.json").read_text())
    assert "step 2" in ev["model"] and set(ev["splits"]) == {"test"} and ev["guidance_scale"] == 1.0
    assert json.loads((tmp_path / "c.json").read_text())["toy"] == out
    with pytest.raises(SystemExit, match="no base evaluation"):
        bench.main([*common, "--gain", "0.1", "--base-from", str(tmp_path / "nowhere")])


def test_constraint_signal_known_answer_on_renders():
    """A position group of two correct renders and two with the relation inverted, scored with
    the partial reward: the groups vary on the relation only and the advantage points exactly at
    the passing images; a colour-binding group that always swaps colours carries no signal."""
    import numpy as np

    from diffalign.world.render import render_batch
    from diffalign.world.verify import verify_batch

    bench = load_benchmark("constraint_signal")
    want, flipped = "a red circle below a purple square", "a red circle above a purple square"
    images = render_batch([want, want, flipped, flipped], [0, 1, 2, 3])
    verdicts = verify_batch(images, [want] * 4)
    partial = np.array([v.partial for v in verdicts])
    assert partial.tolist() == [1.0, 1.0, 0.75, 0.75]
    r = bench.task_signal(partial, verdicts, group_size=4)
    assert r["score"] == 0.5 and r["strict_groups"] == 1.0
    assert r["align_strict"] == pytest.approx(1.0) and r["align/relation"] == pytest.approx(1.0)
    assert r["vary/object"] == 0.0 and r["align/object"] is None and r["relation_given_objects"] == 0.5
    swap = "a yellow square and a purple circle"
    images = render_batch(["a yellow circle and a purple square"] * 4, [4, 5, 6, 7])
    verdicts = verify_batch(images, [swap] * 4)
    r = bench.task_signal(np.array([v.partial for v in verdicts]), verdicts, group_size=4)
    assert r["score"] == 0.0 and r["strict_groups"] == 0.0 and r["std_reward"] == 0.0
    assert r["align_strict"] is None and "relation_given_objects" not in r and "align/relation" not in r


def test_constraint_signal_runs_the_preset_rollout(tmp_path, tiny_model):
    out = load_benchmark("constraint_signal").main([
        "--tasks", "position,color_attr", "--groups", "2", "--threads", "1", "--policy", tiny_model,
        "--set", "rollout.steps=2", "--set", "rollout.sde_window=[0,1]", "--set", "group_size=3",
        "--json", str(tmp_path / "c.json")])
    assert set(out["tasks"]) == {"position", "color_attr"} and out["images"] == 12
    assert out["tasks"]["position"]["groups"] == 2 and "align/relation" in out["tasks"]["position"]
    assert json.loads((tmp_path / "c.json").read_text())["reward"] == "shapes_verifier[partial]"


def test_best_of_n_on_the_training_split_evaluates_a_split_and_stops_at_its_minutes(tmp_path, tiny_model):
    """--train-prompts draws new task-balanced training prompts every iteration, --eval-split judges
    task-balanced images of a split (per-task scores included), --minutes ends the run early."""
    bench = load_benchmark("best_of_n")
    common = ["--train-prompts", "3", "--group", "2", "--renders", "--eval-split", "test", "--images", "12",
              "--threads", "1", "--eval-cfg", "1", "--set", f"model={tiny_model}", "--set", "lora_rank=0"]
    out = bench.main([*common, "--iters", "2", "--every", "1", "--summary", str(tmp_path / "l.json"),
                      "--summary-key", "ceiling"])
    rows = out["evaluations"]
    assert [r["iter"] for r in rows] == [0, 1, 2] and [r["rollout_images"] for r in rows] == [0, 6, 12]
    assert rows[-1]["kept_images"] == 12 and rows[-1]["optimizer_steps"] == 4
    assert {"score/single_object", "score/position", "score/color_attr"} <= rows[0].keys()
    assert out["eval_split"] == "test" and "training prompts" in out["prompts"]
    assert json.loads((tmp_path / "l.json").read_text())["ceiling"]["eval_images"] == 12
    # each iteration draws its own training prompts, --group images each
    from argparse import Namespace

    from diffalign.cli import resolve_preset
    from diffalign.config import load_config
    from diffalign.training.trainer import TrainConfig
    from diffalign.world.grammar import prompt_splits

    cfg = load_config(TrainConfig, resolve_preset("flow_grpo"), [])
    draws = [bench.iteration_prompts(Namespace(train_prompts=8, group=2, seed=0), cfg, None, i) for i in (1, 2)]
    train = {p for ps in prompt_splits()["train"].values() for p in ps}
    assert all(len(b) == 16 and b[0::2] == b[1::2] and set(b) <= train for b in draws) and draws[0] != draws[1]
    # a budget of ~0 minutes: one iteration, then the final evaluation
    short = bench.main([*common, "--iters", "50", "--every", "10", "--minutes", "1e-6"])
    assert [r["iter"] for r in short["evaluations"]] == [0, 1]
    with pytest.raises(SystemExit):  # no evaluation prompts named
        bench.main(["--train-prompts", "3", "--renders"])
    with pytest.raises(SystemExit):  # a file and the training split at once
        bench.main(["--train-prompts", "3", "--prompts", "p.txt", "--eval-split", "test"])


def test_pretrain_ceiling_continues_pretraining_from_weights_and_judges_its_snapshots(tmp_path, tiny_model):
    """The test-ceiling rung: pretraining continued from saved weights (here the tiny model), its
    EMA snapshots judged per split; a second call reuses the run and the stored evaluations."""
    bench = load_benchmark("pretrain_ceiling")
    args = ["--out", str(tmp_path / "run"), "--steps", "4", "--ckpt-every", "2", "--eval-steps", "0,2,4",
            "--images", "6", "--threads", "1", "--set", f"init_from={tiny_model}", "--set", "batch_size=2",
            "--set", "channels=[8,16,16]", "--set", "blocks_per_level=2",
            "--set", "unet={groups: 4, emb_dim: 32, heads: 2}",
            "--summary", str(tmp_path / "l.json")]
    out = bench.main(args)
    rows = out["evaluations"]
    assert [r["step"] for r in rows] == [0, 2, 4] and [r["renders"] for r in rows] == [0, 4, 8]
    assert {"test/score", "ood/score", "test/score/position"} <= rows[0].keys()
    assert 0 <= out["final"] <= 1 and out["base"] == rows[0]["test/score"]
    assert rows[2]["train_s"] > rows[1]["train_s"] > 0
    # step 0 is the starting weights themselves: the same score as judging the tiny model directly
    direct = bench.evaluate_snapshot(tiny_model, ["test"], 6)
    assert direct["test"]["score"] == rows[0]["test/score"]
    assert json.loads((tmp_path / "l.json").read_text())["ceiling_test_pretrain"]["images"] == 8
    # the continued model moved away from its start (all weights train)
    from safetensors.torch import load_file

    start, after = load_file(tiny_model), load_file(str(tmp_path / "run" / "ema_step000004.safetensors"))
    assert any(not torch.equal(start[k], after[k]) for k in start)
    again = bench.main(args)  # nothing to train or judge again
    assert again["evaluations"] == rows and again["this_call_s"] < 5
    with pytest.raises(SystemExit):  # step 3 has no snapshot
        bench.main([*args[:6], "--eval-steps", "0,3"])


def _tiny_ptx_run(run, tiny_model, *, epochs: int, renders: int):
    """A trained tiny Flow-GRPO run with render replay (LoRA r 4, 8 samples per epoch, minibatch 4)."""
    from diffalign.config import load_config
    from diffalign.training.trainer import TrainConfig, Trainer

    cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
        f"model={tiny_model}", "lora_rank=4", f"epochs={epochs}", "prompts_per_epoch=2", "group_size=4",
        "rollout.steps=3", "rollout.sde_window=null", "eval.every=0", "eval.num_images=4", "eval.steps=2",
        "grpo.minibatch_size=4", "reward=jpeg_incompressibility", "reward_kwargs={}", "ptx.weight=0.5",
        f"ptx.batch_size={renders}", "ckpt_every=1"])
    Trainer(cfg, run).train()
    return run


def test_ptx_control_trains_the_matched_replay_steps_alone_and_resumes(tmp_path, tiny_model):
    """The renders-only control of a ptx run: the run's policy settings, its epochs × optimizer
    steps of replay alone, evaluated with the run's protocol; a rerun resumes (nothing to train)."""
    from diffalign.config import load_config
    from diffalign.training.rundir import load_checkpoint, read_metrics
    from diffalign.training.trainer import TrainConfig, Trainer

    run = _tiny_ptx_run(tmp_path / "run", tiny_model, epochs=2, renders=3)
    bench = load_benchmark("ptx_control")
    args = ["--match", str(run), "--out", str(tmp_path / "control"), "--eval-images", "8", "--eval-steps", "2",
            "--json", str(tmp_path / "c.json")]
    out = bench.main(args)
    c = out["control"]
    assert c["epochs"] == 2 and c["optimizer_steps"] == 4 and c["renders"] == 12  # 8 samples / minibatch 4 = 2 per epoch
    rows = read_metrics(tmp_path / "control" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["ptx/loss"] > 0 for r in rows)
    control, trained = load_checkpoint(tmp_path / "control")["policy"], load_checkpoint(run)["policy"]
    start = Trainer(load_config(TrainConfig, run / "config.yaml", ["epochs=1"]), tmp_path / "fresh").policy.trainable_state()
    assert control.keys() == trained.keys()
    assert any(not torch.equal(control[k], start[k]) for k in control)  # the replay moved the adapters
    assert any(not torch.equal(control[k], trained[k]) for k in control)  # and not where the run went
    assert 0 <= out["rows"]["renders only (control)"]["test_score"] <= 1
    assert json.loads((tmp_path / "c.json").read_text())["control"] == c
    assert (tmp_path / "c.md").read_text().startswith("Renders-only control: 4 optimizer steps")
    again = bench.main(args)  # resumed at its last checkpoint: no epoch left, the same weights and figures
    assert again["rows"] == out["rows"]
    assert all(torch.equal(load_checkpoint(tmp_path / "control")["policy"][k], control[k]) for k in control)


def test_ptx_control_set_changes_the_controls_settings_only(tmp_path, tiny_model):
    """``--set lora_rank=0 --set lr=...`` trains every weight of the control at that rate, for
    the run's step count, and says so in its JSON and table; the run's own config is untouched."""
    from diffalign.config import load_config
    from diffalign.training.rundir import load_checkpoint
    from diffalign.training.trainer import TrainConfig

    run = _tiny_ptx_run(tmp_path / "run", tiny_model, epochs=1, renders=2)
    out = load_benchmark("ptx_control").main([
        "--match", str(run), "--out", str(tmp_path / "control"), "--eval-images", "4", "--eval-steps", "2",
        "--set", "lora_rank=0", "--set", "lr=1e-4", "--json", str(tmp_path / "c.json")])
    assert out["overrides"] == ["lora_rank=0", "lr=1e-4"] and out["control"]["optimizer_steps"] == 2
    control = load_checkpoint(tmp_path / "control")["policy"]
    lora = load_checkpoint(run)["policy"]
    assert not any("lora" in k for k in control) and all("lora" in k for k in lora)
    assert sum(v.numel() for v in control.values()) > 5 * sum(v.numel() for v in lora.values())
    saved = load_config(TrainConfig, tmp_path / "control" / "config.yaml", [])
    assert saved.lora_rank == 0 and saved.lr == 1e-4
    assert load_config(TrainConfig, run / "config.yaml", []).lora_rank == 4
    assert "changed from the run: lora_rank=0, lr=1e-4" in (tmp_path / "c.md").read_text()


def test_fixed_prompts_resumes_from_its_last_evaluation_exactly(tmp_path, tiny_model):
    """A stopped (here: shorter) fixed-prompts run continued by the same command gives the rows
    of an uninterrupted run, evaluations and training rewards alike."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    bench = load_benchmark("fixed_prompts")

    def call(out: str, epochs: int) -> dict:
        return bench.main([
            "--prompts", str(prompts), "--out", str(tmp_path / out), "--epochs", str(epochs), "--every", "2",
            "--images", "4", "--threads", "1", "--reward", "brightness", "--set", f"model={tiny_model}",
            "--set", "lora_rank=0", "--set", "prompts_per_epoch=2", "--set", "group_size=4", "--set", "rollout.steps=3",
            "--set", "rollout.sde_window=null", "--set", "grpo.minibatch_size=8", "--set", "lr=3e-3"])

    full = call("full", 4)
    part = call("part", 2)
    assert [r["epoch"] for r in part["evaluations"]] == [0, 2]
    resumed = call("part", 4)
    assert [r["epoch"] for r in resumed["evaluations"]] == [0, 2, 4]
    drop = ("train_s",)  # seconds differ; everything measured must not
    assert ([{k: v for k, v in r.items() if k not in drop} for r in resumed["evaluations"]]
            == [{k: v for k, v in r.items() if k not in drop} for r in full["evaluations"]])
    assert resumed["train"] == full["train"]


def test_periodic_curves_tables_evaluations_and_reward_means(tmp_path):
    """benchmarks/periodic_curves.py on metrics written by the trainer's logger: one row per
    evaluated epoch, the training reward averaged over the epochs since the previous evaluation,
    --max-epoch cuts the curve, and a directory without metrics is a clear error."""
    from tiny import load_benchmark

    from diffalign.training.rundir import MetricsLogger

    run = tmp_path / "a-seed0"
    run.mkdir()
    with MetricsLogger(run / "metrics.jsonl") as log:
        log.log(0, {"eval/score": 0.5, "eval/lowlevel/flat_noise": 1e-3}, wall_time=0.0)
        for step in (1, 2, 3, 4):
            extra = {"eval/score": 0.6, "eval/lowlevel/flat_noise": 2e-3, "eval/missing": 0.1} if step in (2, 4) else {}
            log.log(step, {"reward": 0.1 * step, **extra}, wall_time=float(step))
    bench = load_benchmark("periodic_curves")
    out = bench.main([f"mine={run}", "--max-epoch", "3", "--json", str(tmp_path / "c.json")])
    curve = out["runs"]["mine"]["curve"]
    assert [r["epoch"] for r in curve] == [0, 2]
    assert curve[0]["train_reward"] is None and curve[1]["train_reward"] == pytest.approx(0.15)
    assert curve[1]["score"] == 0.6 and curve[1]["flat_noise"] == 2e-3 and curve[1]["missing"] == 0.1
    assert (tmp_path / "c.json").is_file()
    assert [r["epoch"] for r in bench.main([str(run)])["runs"]["a-seed0"]["curve"]] == [0, 2, 4]
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path)])
