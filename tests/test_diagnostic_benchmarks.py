"""benchmarks/fixed_prompts.py and benchmarks/sampler_gap.py on a tiny model (real trainer, sampler, verifier)."""

import pytest
from tiny import load_benchmark, tiny_unet

from diffalign.models.checkpoint import save_unet


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
        "--set", "lr=3e-3"])
    rows = out["evaluations"]
    assert [r["epoch"] for r in rows] == [0, 2, 4]
    assert all(len(r["per_prompt_score"]) == 2 and 0 <= r["graded"] <= 1 for r in rows)
    assert rows[-1]["brightness"] > rows[0]["brightness"] + 0.02  # the control reward is climbed


def test_sampler_gap_scores_every_target_and_sampler(tmp_path, tiny_model, capsys):
    out = load_benchmark("sampler_gap").main(["--targets", f"base,{tiny_model}", "--images", "6", "--threads", "1",
                                              "--samplers", "sde,ode10"])
    got = [(r["target"], r["sampler"]) for r in out["results"]]
    assert got == [("base", "sde"), ("base", "ode10"), (tiny_model, "sde"), (tiny_model, "ode10")]
    assert all(0 <= r["score"] <= r["partial"] <= 1 for r in out["results"])
    assert "| target | sampler | score |" in capsys.readouterr().out
    # each target is its own model: the shipped base draws shapes the verifier accepts, a random tiny model none
    assert out["results"][0]["score"] > 0.3 and out["results"][2]["score"] == 0.0
