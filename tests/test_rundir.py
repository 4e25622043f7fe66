"""Run directory: create/open, metrics JSONL + truncate, atomic checkpoints, RNG capture/restore."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.errors import CheckpointError, ConfigError
from diffalign.training import rundir as rd
from diffalign.training.rundir import (
    MetricsLogger,
    RunDir,
    capture_rng,
    generator_state,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    read_metrics,
    restore_rng,
    save_checkpoint,
    set_generator_state,
)


def test_create_then_open(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run").create({"lr": 1e-4, "channels": (8, 16)})
    assert run.config_path.is_file() and run.samples_dir.is_dir() and run.checkpoints_dir.is_dir()
    assert RunDir(run.path).open().config == {"lr": 1e-4, "channels": [8, 16]}


def test_create_refuses_a_run_with_a_checkpoint(tmp_path: Path) -> None:
    RunDir(tmp_path).create({"a": 1})
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"checkpoint \(step 3\).*--resume .*--out.*rm -r"):
        RunDir(tmp_path).create({"a": 2})
    assert RunDir(tmp_path).create({"a": 2}, exist_ok=True).open().config == {"a": 2}


def test_create_restarts_a_run_that_never_checkpointed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = RunDir(tmp_path).create({"a": 1})
    with run.metrics_logger(tensorboard=False) as log:
        log.log(0, {"eval/score": 0.5})
    (run.checkpoints_dir / ".tmp-step_0000001-1").mkdir()  # killed while writing its first checkpoint
    (run.samples_dir / "epoch0000.png").write_bytes(b"png")
    assert not run.has_checkpoint()
    with pytest.raises(CheckpointError, match=r"stopped before its first checkpoint.*without --resume.*"
                                              r"diffalign train .*config.yaml --out"):
        run.require_checkpoint()
    again = RunDir(tmp_path).create({"a": 2})  # the same command works again
    assert "starting it afresh" in capsys.readouterr().err
    assert again.open().config == {"a": 2} and not again.metrics_path.exists()
    assert not any(again.checkpoints_dir.iterdir()) and (again.samples_dir / "epoch0000.png").exists()


def test_open_requires_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory") as e:
        RunDir(tmp_path / "nothing").open()
    assert str(tmp_path / "nothing") in str(e.value)


def test_metrics_jsonl_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as log:
        for step in range(5):
            log.log(step, {"loss": torch.tensor(step / 2), "n": np.int64(3)}, wall_time=100.0 + step)
    rows = read_metrics(path)
    assert rows[2] == {"step": 2, "wall_time": 102.0, "loss": 1.0, "n": 3}
    with path.open("a") as f:
        f.write('{"step": 5, "lo')  # a line half-written by a crash
    assert len(read_metrics(path)) == 5

    log = MetricsLogger(path)
    assert log.truncate_after(2) == 2
    log.log(3, {"loss": 9.0}, wall_time=0.0)
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]
    assert read_metrics(path)[-1]["loss"] == 9.0


def test_metrics_rejects_reserved_names_and_tensors(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="reserved"):
        log.log(0, {"step": 1.0})
    with pytest.raises(ValueError, match="scalar"):
        log.log(0, {"x": torch.zeros(3)})
    log.close()


def test_tensorboard_scalars_written(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create({})
    with run.metrics_logger() as log:
        log.log(1, {"loss": 0.5})
    assert any(run.tb_dir.glob("events.out.tfevents.*"))
    assert json.loads(run.metrics_path.read_text())["loss"] == 0.5


def test_missing_tensorboard_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(rd, "_TB_WARNED", False)
    with pytest.warns(UserWarning, match="tensorboard"), MetricsLogger(tmp_path / "a.jsonl", tb_dir=tmp_path) as log:
        log.log(0, {"x": 1.0})
    with warnings.catch_warnings(), MetricsLogger(tmp_path / "b.jsonl", tb_dir=tmp_path) as log:
        warnings.simplefilter("error")
        log.log(0, {"x": 1.0})
    assert read_metrics(tmp_path / "b.jsonl")[0]["x"] == 1.0


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((2, 2), float(step))}, "opt": {"betas": (0.9, 0.99)},
            "np": np.arange(3), "rng": capture_rng()}


def test_checkpoint_round_trip_and_keep_last(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create({})
    for step in (10, 20, 30):
        save_checkpoint(run, step, _state(step))
    assert list_checkpoints(run) == [20, 30] and latest_step(run) == 30
    assert (run.checkpoints_dir / "latest").read_text().strip() == "step_0000030"
    state = load_checkpoint(run)
    assert state["step"] == 30 and state["opt"]["betas"] == (0.9, 0.99)
    torch.testing.assert_close(state["model"]["w"], torch.full((2, 2), 30.0))
    torch.testing.assert_close(state["np"], torch.arange(3))
    assert load_checkpoint(tmp_path, step=20)["step"] == 20
    with pytest.raises(CheckpointError, match=r"step 10 .*available steps: \[20, 30\]"):
        load_checkpoint(run, step=10)


def test_keep_every_keeps_a_history_beside_the_newest(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create({})
    for step in range(1, 8):
        save_checkpoint(run, step, _state(step), keep_every=3)
    assert list_checkpoints(run) == [3, 6, 7] and latest_step(run) == 7
    assert load_checkpoint(run, step=3)["step"] == 3
    with pytest.raises(ValueError, match="keep_every"):
        save_checkpoint(run, 8, _state(8), keep_every=-1)


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create({})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(run)
    path = save_checkpoint(run, 5, _state(5)) / "state.pt"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load_checkpoint(run)
    assert str(path) in str(e.value)


def test_unsaveable_state_fails_at_save(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['cfg'\]"):
        save_checkpoint(tmp_path, 1, {"cfg": object()})


def test_leftover_temp_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create({})
    save_checkpoint(run, 1, _state(1))
    crashed = run.checkpoints_dir / ".tmp-step_0000002-999"
    crashed.mkdir()
    (crashed / "state.pt").write_bytes(b"half")
    assert list_checkpoints(run) == [1]
    assert load_checkpoint(run)["step"] == 1
    assert not crashed.exists()


def test_latest_missing_falls_back_to_newest(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 3, {"step": 3})
    save_checkpoint(tmp_path, 4, {"step": 4})
    (tmp_path / "checkpoints" / "latest").unlink()  # crash between the rename and `latest`
    assert load_checkpoint(tmp_path)["step"] == 4


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_capture_restore_through_checkpoint(tmp_path: Path) -> None:
    np.random.randn()  # leave a cached gaussian in numpy's state
    save_checkpoint(tmp_path, 1, {"rng": capture_rng()})
    first = _draws()
    restore_rng(load_checkpoint(tmp_path)["rng"])
    assert _draws() == first


def test_explicit_generator_states() -> None:
    gens = [torch.Generator().manual_seed(1), np.random.default_rng(1), random.Random(1)]
    states = [generator_state(g) for g in gens]

    def draw() -> list:
        return [torch.rand(2, generator=gens[0]).tolist(), gens[1].random(), gens[2].random()]

    first = draw()
    for g, s in zip(gens, states, strict=True):
        set_generator_state(g, s)
    assert draw() == first
