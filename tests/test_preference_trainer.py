"""The preference trainer: SePPO's reference pool, DPO equivalence, exact resume, the CLI."""

import json
import math

import pytest
import torch
from tiny import tiny_policy, tiny_unet, write_render_prefs

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.data.preference import PreferenceWriter
from diffalign.errors import ConfigError
from diffalign.models.checkpoint import load_unet, save_unet
from diffalign.training.preference import PreferenceConfig, PreferenceTrainer, ReferencePool
from diffalign.training.rundir import load_checkpoint, read_metrics
from diffalign.world.grammar import prompt_splits
from diffalign.world.render import render_batch


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """16 pairs: renders of train prompts as winners, random images as losers."""
    root = tmp_path_factory.mktemp("p") / "prefs"
    train = prompt_splits()["train"]
    prompts = [train["colors"][i % 5] if i % 2 else train["counting"][i % 7] for i in range(16)]
    return write_render_prefs(root, prompts, shard_size=6)


def _cfg(model, data, preset="seppo", *extra):
    return load_config(PreferenceConfig, f"configs/shapes/{preset}.yaml", [
        f"model={model}", f"data={data}", "lora_rank=0", "lr=1e-3", "batch_size=4", "max_updates=4", "beta=50",
        "eval.num_images=2", "eval.steps=1", "eval.every=2", "eval.final_splits=[test]", "eval.final_num_images=2",
        "ckpt_every=1", "seppo.sampler.steps=2", "seppo.pool_every=1", "seppo.pool_size=3", *extra,
    ])


def _rows(run, key="loss"):
    return [(r["step"], r[key]) for r in read_metrics(run / "metrics.jsonl") if key in r]


# ---------------------------------------------------------------- the pool


def test_pool_keeps_base_first_and_evicts_oldest():
    pol = tiny_policy(0)
    pool = ReferencePool(3)
    assert pool.entries == ["base"]
    for u in (5, 10, 15):
        with torch.no_grad():
            next(iter(pol.trainable_state().values())).add_(1.0)  # the policy moves between saves
        evicted = pool.add(pol, u)
    assert pool.entries == ["base", "seppo_pool_10", "seppo_pool_15"] and evicted == ["seppo_pool_5"]
    assert not pol.has_snapshot("seppo_pool_5") and pol.has_snapshot("seppo_pool_15")
    assert pool.age(0, 20) == 20 and pool.age(2, 20) == 5
    no_base = ReferencePool(2, keep_base=False)
    no_base.add(pol, 1)
    no_base.add(pol, 2)
    assert no_base.entries == ["seppo_pool_1", "seppo_pool_2"]


def test_pool_selection_strategies():
    pol = tiny_policy(0)
    pool = ReferencePool(4)
    for u in (1, 2, 3):
        pool.add(pol, u)
    g = torch.Generator().manual_seed(0)
    assert {pool.select("first", g) for _ in range(20)} == {0}
    assert {pool.select("latest", g) for _ in range(20)} == {3}
    draws = torch.tensor([pool.select("uniform", g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq.min() > 0.22 and freq.max() < 0.28  # uniform over the 4 entries
    with pytest.raises(ConfigError, match="uniform, first, latest"):
        pool.select("best", g)


def test_pool_context_runs_the_chosen_parameters():
    pol = tiny_policy(0)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.7])
    cond = pol.encode(["a red circle", "a square"])
    base_v = pol.predict(x, t, cond)
    pool = ReferencePool(3)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.01)
    pool.add(pol, 1)
    saved_v = pol.predict(x, t, cond)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.01)
    with pool.context(pol, 0):
        torch.testing.assert_close(pol.predict(x, t, cond), base_v)
    with pool.context(pol, 1):
        torch.testing.assert_close(pol.predict(x, t, cond), saved_v)
    assert not torch.allclose(pol.predict(x, t, cond), saved_v)


# ---------------------------------------------------------------- the trainer


def test_seppo_flipper_off_with_dataset_losers_is_diffusion_dpo(tmp_path, tiny_model, prefs):
    dpo = tmp_path / "dpo"
    PreferenceTrainer(_cfg(tiny_model, prefs, "diffusion_dpo", "max_updates=3"), dpo).train()
    sep = tmp_path / "seppo"
    PreferenceTrainer(_cfg(tiny_model, prefs, "seppo", "max_updates=3", "seppo.flipper=off",
                           "seppo.selection=first", "seppo.dataset_losers=true"), sep).train()
    assert _rows(dpo) == _rows(sep) and len(_rows(dpo)) == 3
    assert _rows(dpo, "reward_margin") == _rows(sep, "reward_margin")
    a, b = load_checkpoint(dpo)["policy"], load_checkpoint(sep)["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seppo_trains_reports_flips_and_resumes_exactly(tmp_path, tiny_model, prefs):
    extra = ["grad_accum=2", "max_updates=4"]
    full = tmp_path / "full"
    summary = PreferenceTrainer(_cfg(tiny_model, prefs, "seppo", *extra), full).train()
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", "samples/update0000.png"):
        assert (full / name).exists(), name
    assert summary["updates"] == 4 and "final/test" in summary
    rows = [r for r in read_metrics(full / "metrics.jsonl") if "loss" in r]
    assert all(0 <= r["flip_fraction"] <= 1 and 0 <= r["ref_sample_correct"] <= 1 for r in rows)
    assert [r["pool_size"] for r in rows] == [1, 2, 3, 3]  # base, then one save per update, capped at 3
    for r in rows:
        # sign flipper: a pair flips exactly where the reference explains the winner better
        assert r["flip_fraction"] == r["ref_better_fraction"]
        if r["ref_age"] == 0:  # the reference is the current policy: every pair ties, nothing flips
            assert r["flip_fraction"] == 0 and r["loss"] == pytest.approx(math.log(2), abs=1e-6)
    state = load_checkpoint(full)
    assert state["pool"]["entries"] == ["base", "seppo_pool_3", "seppo_pool_4"]
    base, _, _ = load_unet(tiny_model)
    assert any(not torch.equal(v, state["policy"][k]) for k, v in base.state_dict().items() if k in state["policy"])

    part = tmp_path / "part"
    PreferenceTrainer(_cfg(tiny_model, prefs, "seppo", *extra, "max_updates=2"), part).train()
    resumed = PreferenceTrainer(_cfg(tiny_model, prefs, "seppo", *extra), part, resume=True)
    assert resumed.update == 2 and resumed.pool.entries == ["base", "seppo_pool_1", "seppo_pool_2"]
    resumed.train()
    for key in ("loss", "flip_fraction", "ref_index", "grad_norm"):
        assert _rows(part, key) == _rows(full, key), key
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    assert a["pool"] == b["pool"]


def test_epochs_shuffle_and_sft(tmp_path, tiny_model, prefs):
    t = PreferenceTrainer(_cfg(tiny_model, prefs, "sft", "max_updates=null", "epochs=2", "eval.every=0"), tmp_path / "s")
    assert len(t.data) == 16 and t.batches_per_epoch == 4 and t.total_updates == 8
    e0 = torch.cat([t.micro_batch_indices(m) for m in range(4)])
    e1 = torch.cat([t.micro_batch_indices(m) for m in range(4, 8)])
    assert sorted(e0.tolist()) == list(range(16)) == sorted(e1.tolist()) and not torch.equal(e0, e1)
    summary = t.train()
    rows = [r for r in read_metrics(tmp_path / "s" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 8 and rows[-1]["epoch"] == 2.0 and "err_w" in rows[0]
    assert summary["updates"] == 8


def test_dpo_needs_losers(tmp_path, tiny_model):
    root = tmp_path / "winners"
    with PreferenceWriter(root) as w:
        for i in range(8):
            w.add("a red circle", render_batch(["a red circle"], [i])[0])
    with pytest.raises(ConfigError, match="winners-only dataset; use seppo"):
        PreferenceTrainer(_cfg(tiny_model, root, "diffusion_dpo"), tmp_path / "r")


def test_cli_dispatches_on_the_preset_algorithm(tmp_path, tiny_model, prefs, capsys):
    run = tmp_path / "run"
    common = [f"model={tiny_model}", f"data={prefs}", "lora_rank=0", "batch_size=4", "eval.num_images=2",
              "eval.steps=1", "eval.final_splits=[test]", "eval.final_num_images=2", "seppo.sampler.steps=1"]
    assert main(["train", "seppo_ref_latest", "--out", str(run), "max_updates=2", *common]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "seppo" and summary["updates"] == 2
    assert main(["train", "--resume", str(run), "max_updates=3"]) == 0
    assert json.loads((run / "summary.json").read_text())["updates"] == 3
    assert [s for s, _ in _rows(run, "ref_index")] == [1, 2, 3]
    assert main(["train", "diffusion_dpo", "--out", str(tmp_path / "bad"), "seppo.flipper=soft", *common]) == 2
    assert "flipper" in capsys.readouterr().err
