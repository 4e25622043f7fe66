"""benchmarks/convergence.py on a tiny budget: real training subprocesses, evaluation, table."""

import json
from pathlib import Path

import pytest
from tiny import load_benchmark, tiny_unet

from diffalign.models.checkpoint import save_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


def test_convergence_tiny_budget(tmp_path, tiny_model, capsys):
    bench = load_benchmark("convergence")
    tiny = [f"model={tiny_model}", "lora_rank=0", "epochs=2", "prompts_per_epoch=2", "group_size=2",
            "rollout.steps=2", "rollout.sde_window=null", "eval.num_images=4", "eval.steps=2", "eval.every=1",
            "grpo.minibatch_size=4", "threads=1"]
    args = ["--presets", "flow_grpo", "--seeds", "0", "--minutes", "5", "--eval-images", "4",
            "--images-per-prompt", "2", "--eval-steps", "2", "--target", "0.0", "--out", str(tmp_path / "conv")]
    for o in tiny:
        args += ["--set", o]
    result = bench.main(args)
    runs = result["presets"]["flow_grpo"]["runs"]
    assert [r["ok"] for r in runs] == [True], [r.get("error") for r in runs]
    agg = result["presets"]["flow_grpo"]["aggregate"]
    assert agg["steps"]["mean"] == 2 and agg["test_score"] is not None and agg["ood_score"] is not None
    assert agg["steps_to_target"]["mean"] == 0  # target 0.0 is met by the step-0 evaluation
    assert agg["diversity"] is not None
    out = capsys.readouterr().out
    assert "| flow_grpo | 0 |" in out
    conv = tmp_path / "conv"
    assert json.loads((conv / "convergence.json").read_text())["settings"]["seeds"] == [0]
    assert (conv / "convergence.md").is_file() and (conv / "compare" / "compare.html").is_file()
    ev_file = conv / "flow_grpo-seed0" / "eval" / "eval.json"
    assert json.loads(ev_file.read_text())["guidance_scale"] == 4.5  # the preset's eval.guidance_scale
    stamp = ev_file.stat().st_mtime_ns

    # --reuse keeps the finished run and its evaluation; --base adds the base model's row
    summary = tmp_path / "learning.json"
    summary.write_text(json.dumps({"fixed_prompts": {"base": 0.3}}))
    again = bench.main(args + ["--reuse", "--base", "--summary", str(summary)])
    run = again["presets"]["flow_grpo"]["runs"][0]
    entry = json.loads(summary.read_text())
    assert entry["fixed_prompts"] == {"base": 0.3}  # other benchmarks' entries are kept
    entry = entry["flow_grpo_test"]
    assert entry["final"] == [agg["test_score"]["mean"]] and entry["seeds"] == [0] and entry["eval_images"] == 4
    assert entry["base"] == again["base"]["4.5"]["test_score"] and entry["minutes"] == 5
    assert len(entry["final_proxy"]) == 1 and "base_proxy" in entry
    bench.main(args + ["--reuse", "--base", "--summary", str(summary), "--summary-suffix", "_proxy", "--no-compare"])
    assert json.loads(summary.read_text())["flow_grpo_proxy"]["final"] == entry["final"]  # another entry name
    assert run["ok"] and run.get("reused") and ev_file.stat().st_mtime_ns == stamp
    assert again["presets"]["flow_grpo"]["aggregate"]["test_score"] == agg["test_score"]
    base = again["base"]["4.5"]
    assert base["eval_guidance"] == 4.5 and 0 <= base["test_score"] <= 1
    assert (conv / "base-cfg4.5" / "eval.json").is_file()
    md = (conv / "convergence.md").read_text()
    assert "| base model | — | — | — | — | 4.5 |" in md
    assert "| renderer |" in md and "| flow_grpo (1 seeds) | 4.5 |" in md  # the hallucination table

    # --gather never trains: finished runs come from --runs-from, missing ones are listed as not run
    gathered = tmp_path / "gathered"
    g_args = ["--presets", "flow_grpo,dance_grpo", "--seeds", "0,1", "--eval-images", "4", "--images-per-prompt", "2",
              "--eval-steps", "2", "--target", "0.0", "--out", str(gathered), "--gather", "--runs-from", str(conv),
              "--base", "--no-compare"]
    res = bench.main(g_args)
    assert res["not_run"] == ["flow_grpo-seed1", "dance_grpo-seed0", "dance_grpo-seed1"]
    assert "dance_grpo" not in res["presets"] and len(res["presets"]["flow_grpo"]["runs"]) == 1
    assert not (gathered / "dance_grpo-seed0").exists() and not (gathered / "flow_grpo-seed0").exists()
    assert res["presets"]["flow_grpo"]["runs"][0]["run_dir"] == str(conv / "flow_grpo-seed0")
    assert res["presets"]["flow_grpo"]["aggregate"]["test_score"] == agg["test_score"]
    assert res["base"]["4.5"]["test_score"] == base["test_score"] and ev_file.stat().st_mtime_ns == stamp
    md = (gathered / "convergence.md").read_text()
    assert "| dance_grpo | — | not run |" in md and "budgets may differ" in md
    assert "Seeds not run (no finished run found): flow_grpo-seed1." in md
    assert "| flow_grpo | 0 | shapes_verifier | 2 |" in md  # training reward and steps of the gathered run
    # a run directory that holds a checkpoint is resumed (an interrupted study continues), not restarted
    resumed = bench.run_preset("flow_grpo", 0, conv / "flow_grpo-seed0", 5, tiny, None)
    assert resumed["ok"] and "--resume" in resumed["command"], resumed
    with pytest.raises(SystemExit):  # --runs-from without --gather could train into a foreign directory
        bench.main(["--runs-from", str(conv), "--out", str(tmp_path / "y")])


def test_hallucination_table_is_relative_to_base_and_renderer():
    bench = load_benchmark("convergence")
    low = {f"lowlevel_{m}": v for m, v in zip(bench.LOWLEVEL, (0.06, 0.03, 0.09, 0.003), strict=True)}
    ren = {f"renderer_{m}": v for m, v in zip(bench.LOWLEVEL, (0.05, 0.02, 0.09, 0.001), strict=True)}
    base = {"eval_guidance": 4.5, "high_level_hallucination": 0.5, "ood_high_level_hallucination": 0.8,
            "hallucinated": 0.1, "missing": 0.2, "misattributed": 0.2, **low, **ren}
    run = dict(base, high_level_hallucination=0.25, lowlevel_laplacian_var=0.045, lowlevel_flat_noise=0.005)
    result = {"base": {"4.5": base},
              "presets": {"m": {"runs": [{"ok": True, "figures": run},
                                         {"ok": True, "figures": dict(run, high_level_hallucination=0.35)}]}}}
    md = bench.hallucination_markdown(result)
    row = next(ln for ln in md.splitlines() if ln.startswith("| m (2 seeds)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0.300 (-40 %)"  # mean of 0.25 and 0.35 against the base's 0.5
    assert cells[7] == "0.0450 (0.50)"  # |0.045 - 0.05| / |0.06 - 0.05|
    assert cells[8] == "0.0300 (1.00)"  # unchanged from the base
    assert cells[9] == "0.0900"  # base equals the renderer: no ratio
    assert cells[10] == "0.00500 (2.00)"  # twice as far from the renderer as the base
    assert "| renderer | — |" in md and "| base model | 4.5 |" in md


def test_convergence_reports_failed_runs(tmp_path):
    bench = load_benchmark("convergence")
    result = bench.main(["--presets", "flow_grpo", "--seeds", "0", "--minutes", "1", "--set", "no_such_key=1",
                         "--eval-images", "2", "--out", str(tmp_path / "conv")])
    run = result["presets"]["flow_grpo"]["runs"][0]
    assert not run["ok"] and "no_such_key" in run["error"]
    assert "failed:" in (tmp_path / "conv" / "convergence.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--presets", "nope", "--out", str(tmp_path / "x")])


def test_gather_base_row_uses_the_shipped_base(tmp_path):
    """--base with no model= override evaluates the shipped base checkpoint (and --gather trains nothing)."""
    bench = load_benchmark("convergence")
    res = bench.main(["--presets", "flow_grpo", "--seeds", "0", "--gather", "--base", "--eval-images", "2",
                      "--images-per-prompt", "1", "--eval-steps", "2", "--out", str(tmp_path / "g")])
    assert res["not_run"] == ["flow_grpo-seed0"] and not (tmp_path / "g" / "flow_grpo-seed0").exists()
    ev = json.loads((tmp_path / "g" / "base-cfg4.5" / "eval.json").read_text())
    assert ev["num_images"] == 2 and "base" in ev["model"]
    assert 0 <= res["base"]["4.5"]["test_score"] <= 1


def test_train_reward_column(tmp_path):
    bench = load_benchmark("convergence")
    (tmp_path / "config.yaml").write_text("algorithm: sft\ndata: runs/prefs_shapes\n")
    assert bench._train_reward(tmp_path) == "pairs: prefs_shapes"
    (tmp_path / "config.yaml").write_text("algorithm: crd\nreward: shapes_score\n")
    assert bench._train_reward(tmp_path) == "shapes_score"
    assert bench._train_reward(tmp_path / "missing") is None
