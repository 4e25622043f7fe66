"""The preference trainer: SePPO's reference pool, DPO equivalence, exact resume, the CLI."""

import json
import math

import pytest
import torch
from tiny import tiny_policy, tiny_unet, write_render_prefs

from diffalign.algorithms.preference import flow_matching_error, seppo_flip, seppo_loss
from diffalign.cli import main
from diffalign.config import load_config
from diffalign.data.preference import PreferenceWriter
from diffalign.errors import ConfigError
from diffalign.models.checkpoint import load_unet, save_unet
from diffalign.training.preference import PreferenceConfig, PreferenceTrainer, ReferencePool
from diffalign.training.rundir import list_checkpoints, load_checkpoint, read_metrics
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


def _fit_winners(policy, x_w, cond, sigma, eps, steps=40):
    """Fit the policy to the winners under fixed ``(σ, ε)`` (a few Adam steps on their
    flow-matching error), so it explains them better than it did before."""
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=3e-3)
    x_t, v_star = (1 - sigma.view(-1, 1, 1, 1)) * x_w + sigma.view(-1, 1, 1, 1) * eps, eps - x_w
    for _ in range(steps):
        opt.zero_grad()
        flow_matching_error(policy.predict(x_t, sigma, cond), v_star).mean().backward()
        opt.step()


def test_seppo_anchor_criterion_on_a_case_with_a_known_answer(tmp_path, tiny_model, prefs):
    """SePPO's anchor (the paper's and ALGORITHMS.md's): the reference sample's role is decided by
    which model explains the *winner* better. Built so the answer is known, through the trainer's
    own error computation and pool: (1) a policy fitted to the winners against the base
    reference → the policy is better, every reference sample stays a loser (s = +1) and the loss
    pushes its error up; (2) the same fitted weights as the pool's reference and the policy back
    at the base → the reference is better, every reference sample is learned as a winner (s = −1)
    and the loss pulls its error down; (3) reference = policy → ties → s = +1."""
    t = PreferenceTrainer(_cfg(tiny_model, prefs, "seppo"), tmp_path / "r")
    batch = t.data.batch(torch.arange(4))
    g = torch.Generator().manual_seed(0)
    sigma, eps = torch.full((4,), 0.5), torch.randn(4, 3, 32, 32, generator=g)
    cond, x_w = t.policy.encode(batch.prompts), t.policy.encode_images(batch.winners)
    x_s = torch.rand(4, 3, 32, 32, generator=g)  # any reference sample: the anchor never looks at it
    start = {k: v.detach().clone() for k, v in t.policy.trainable_state().items()}
    _fit_winners(t.policy, x_w, cond, sigma, eps)
    t.pool.add(t.policy, 1)  # entry 1 = the fitted weights; entry 0 = the base

    def decide(ref_index):
        (err_w, err_s), (ref_w, ref_s) = t._errors([x_w, x_s], cond, sigma, eps, t.pool.context(t.policy, ref_index))
        err_s = err_s.detach().requires_grad_(True)
        loss, m = seppo_loss(err_w.detach(), ref_w, err_s, ref_s, beta=50.0, flipper="sign")
        loss.backward()
        return seppo_flip(err_w, ref_w, "sign"), err_w.detach(), ref_w, err_s.grad, m

    s, err_w, ref_w, grad_s, m = decide(0)  # policy fitted, reference = base
    assert (err_w < ref_w).all() and torch.equal(s, torch.ones(4))
    assert float(m["flip_fraction"]) == 0 and (grad_s < 0).all()  # loser: descending raises err_s

    with torch.no_grad():
        for k, v in t.policy.trainable_state().items():
            v.copy_(start[k])  # the policy back at the base; the fitted weights live on in the pool
    s, err_w, ref_w, grad_s, m = decide(1)
    assert (ref_w < err_w).all() and torch.equal(s, -torch.ones(4))
    assert float(m["flip_fraction"]) == 1 and (grad_s > 0).all()  # winner: descending lowers err_s

    s, err_w, ref_w, _, _ = decide(0)  # reference = base = policy
    torch.testing.assert_close(err_w, ref_w)
    assert torch.equal(s, torch.ones(4))


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
    # the compare page's lower curves show what preference runs log: no reward, the preference accuracy
    from diffalign.evaluation.compare import load_run, training_curve
    assert training_curve([[load_run(dpo)], [load_run(sep)]]) == ("accuracy", "train preference accuracy")


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
    t = PreferenceTrainer(_cfg(tiny_model, prefs, "sft", "max_updates=null", "epochs=2", "eval.every=0",
                               "ckpt_keep_every=3"), tmp_path / "s")
    assert len(t.data) == 16 and t.batches_per_epoch == 4 and t.total_updates == 8
    e0 = torch.cat([t.micro_batch_indices(m) for m in range(4)])
    e1 = torch.cat([t.micro_batch_indices(m) for m in range(4, 8)])
    assert sorted(e0.tolist()) == list(range(16)) == sorted(e1.tolist()) and not torch.equal(e0, e1)
    summary = t.train()
    rows = [r for r in read_metrics(tmp_path / "s" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 8 and rows[-1]["epoch"] == 2.0 and "err_w" in rows[0]
    assert summary["updates"] == 8
    assert list_checkpoints(tmp_path / "s") == [3, 6, 7, 8]  # ckpt_every=1, the newest two + multiples of 3


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


# ---------------------------------------------------------------- benchmarks/seppo_criterion.py


def test_seppo_criterion_stats_on_a_known_answer():
    import numpy as np
    from tiny import load_benchmark

    bench = load_benchmark("seppo_criterion")
    delta = np.array([[1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]])  # means 1/3 (reference better) and -1
    r = bench.criterion_stats(delta)
    assert r["flip_single"] == pytest.approx(2 / 6) and r["flip_mean"] == 0.5
    assert r["agreement"] == pytest.approx(5 / 6)  # row 0: 2 of 3 draws agree with the mean; row 1: all
    assert r["winners"] == 2 and r["draws"] == 3 and r["snr_median"] == np.inf  # row 1 has no spread
    with pytest.raises(ValueError, match="winners, draws"):
        bench.criterion_stats(np.zeros(3))


def test_seppo_criterion_on_a_real_run(tmp_path, tiny_model, prefs):
    """A finished tiny SePPO run: with one draw per winner the single-draw decision is its own mean
    (agreement exactly 1); with the reference equal to the policy itself every Δ is 0 (no flips)."""
    from tiny import load_benchmark

    run = tmp_path / "seppo-seed0"
    PreferenceTrainer(_cfg(tiny_model, prefs, "seppo", "max_updates=3"), run).train()
    bench = load_benchmark("seppo_criterion")
    one = bench.main([str(run), "--pairs", "8", "--draws", "1", "--batch", "4"])
    assert one["agreement"] == 1.0 and one["flip_single"] == one["flip_mean"] and one["winners"] == 8
    many = bench.main([str(run), "--pairs", "8", "--draws", "4", "--batch", "8", "--out", str(tmp_path / "c.json")])
    assert 0 <= many["agreement"] <= 1 and many["draws"] == 4 and json.loads((tmp_path / "c.json").read_text()) == many
    latest = load_checkpoint(run)["pool"]["entries"].index("seppo_pool_3")  # saved after the last update
    same = bench.main([str(run), "--pairs", "4", "--draws", "2", "--ref", str(latest)])
    assert same["mean_delta"] == 0.0 and same["flip_single"] == 0.0
    with pytest.raises(SystemExit, match="not in the run's pool"):
        bench.main([str(run), "--pairs", "2", "--draws", "1", "--ref", "9"])
