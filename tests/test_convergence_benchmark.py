"""benchmarks/convergence.py on a tiny budget: real training subprocesses, evaluation, table."""

import importlib.util
import json
from pathlib import Path

import pytest
from tiny import tiny_unet

from diffalign.models.checkpoint import save_unet

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("convergence", ROOT / "benchmarks" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


def test_convergence_tiny_budget(tmp_path, tiny_model, capsys):
    bench = _load_benchmark()
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
    again = bench.main(args + ["--reuse", "--base"])
    run = again["presets"]["flow_grpo"]["runs"][0]
    assert run["ok"] and run.get("reused") and ev_file.stat().st_mtime_ns == stamp
    assert again["presets"]["flow_grpo"]["aggregate"]["test_score"] == agg["test_score"]
    base = again["base"]["4.5"]
    assert base["eval_guidance"] == 4.5 and 0 <= base["test_score"] <= 1
    assert (conv / "base-cfg4.5" / "eval.json").is_file()
    assert "| base model | — | 4.5 |" in (conv / "convergence.md").read_text()


def test_convergence_reports_failed_runs(tmp_path):
    bench = _load_benchmark()
    result = bench.main(["--presets", "flow_grpo", "--seeds", "0", "--minutes", "1", "--set", "no_such_key=1",
                         "--eval-images", "2", "--out", str(tmp_path / "conv")])
    run = result["presets"]["flow_grpo"]["runs"][0]
    assert not run["ok"] and "no_such_key" in run["error"]
    assert "failed:" in (tmp_path / "conv" / "convergence.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--presets", "nope", "--out", str(tmp_path / "x")])
