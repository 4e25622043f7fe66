"""Pretraining: checkpoints appear, an interrupted run resumes exactly, bad resumes fail clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.errors import ConfigError
from diffalign.training.pretrain import PretrainConfig, pretrain

TINY = dict(batch_size=4, channels=(8, 16, 16), unet={"groups": 4, "emb_dim": 32, "heads": 2},
            ckpt_every=2, sample_every=0, log_every=1, warmup=2)


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    full = pretrain(PretrainConfig(steps=4, **TINY), tmp_path / "full")
    pretrain(PretrainConfig(steps=4, **TINY), tmp_path / "cut", stop_after=2)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = pretrain(PretrainConfig(steps=4, **TINY), tmp_path / "cut", resume=True)
    a, b = load_file(str(full)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")
    assert (tmp_path / "full" / "ema_step000002.safetensors").exists()


def test_kill_after_a_checkpoint_and_before_the_first_one_leave_clean_metrics(tmp_path):
    from diffalign.errors import CheckpointError

    full = tmp_path / "full"
    pretrain(PretrainConfig(steps=4, **TINY), full)
    cut = tmp_path / "cut"  # killed at step 3: one row past its step-2 checkpoint
    pretrain(PretrainConfig(steps=4, **dict(TINY, ckpt_every=2)), cut, stop_after=3)
    assert len(_losses(cut)) == 3
    pretrain(PretrainConfig(steps=4, **TINY), cut, resume=True)
    assert _losses(cut) == _losses(full)  # step 3 is logged once, not twice

    dead = tmp_path / "dead"  # killed before its first checkpoint
    pretrain(PretrainConfig(steps=4, **dict(TINY, ckpt_every=4)), dead, stop_after=1)
    with pytest.raises(CheckpointError, match="stopped before its first checkpoint.*without --resume"):
        pretrain(PretrainConfig(steps=4, **TINY), dead, resume=True)
    pretrain(PretrainConfig(steps=4, **TINY), dead)  # the same command starts it afresh
    assert _losses(dead) == _losses(full)


def test_existing_run_needs_resume_and_same_config(tmp_path):
    pretrain(PretrainConfig(steps=2, **TINY), tmp_path / "r", stop_after=2)
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(PretrainConfig(steps=2, **TINY), tmp_path / "r")
    with pytest.raises(ConfigError, match="differs from the run's saved config"):
        pretrain(PretrainConfig(steps=2, **dict(TINY, batch_size=2)), tmp_path / "r", resume=True)


def test_bf16_autocast_option_trains(tmp_path):
    final = pretrain(PretrainConfig(steps=2, bf16=True, **TINY), tmp_path / "bf16")
    weights = load_file(str(final))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 2 and all(x == x for x in losses)


def test_init_from_continues_from_saved_weights_and_checks_the_architecture(tmp_path):
    """init_from starts model and EMA at a saved UNet (here: a tiny pretrained one, then trained on
    at a vanishing rate, so the result is those weights); another architecture is refused with
    the fields to set; ``base`` names the shipped model, whose architecture is the default one."""
    from diffalign.models.unet import UNetConfig
    from diffalign.training.pretrain import _initial_weights

    first = pretrain(PretrainConfig(steps=2, **TINY), tmp_path / "a")
    start = load_file(str(first))
    cont = pretrain(PretrainConfig(steps=2, lr=1e-12, init_from=str(first), **TINY), tmp_path / "b")
    after = load_file(str(cont))
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in start.items())
    fresh = load_file(str(pretrain(PretrainConfig(steps=2, lr=1e-12, seed=1, **TINY), tmp_path / "c")))
    assert not all(torch.allclose(fresh[k], v, atol=1e-6) for k, v in start.items())  # a random init differs
    with pytest.raises(ConfigError, match="another architecture.*channels"):
        pretrain(PretrainConfig(steps=2, init_from=str(first), **dict(TINY, channels=(8, 16, 32))), tmp_path / "d")
    shipped = _initial_weights(PretrainConfig(init_from="base"), UNetConfig(channels=(32, 64, 128), blocks_per_level=1))
    assert sum(p.numel() for p in shipped.parameters()) == 3_870_211
