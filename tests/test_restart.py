"""A run directory is resumable or restartable: a start that fails (or is killed) before its first
checkpoint leaves nothing that blocks the same command, and ``--resume`` on it says how to restart."""

import json

import pytest
from tiny import tiny_unet

from diffalign.cli import main
from diffalign.models.checkpoint import save_unet
from diffalign.training.rundir import latest_step, read_metrics


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_failed_start_then_the_same_command_runs(tmp_path, tiny_model, capsys):
    run, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    argv = ["train", "flow_grpo", "--out", str(run), f"model={tiny_model}", f"prompt_file={prompts}",
            "lora_rank=0", "epochs=1", "prompts_per_epoch=2", "group_size=2", "rollout.steps=2",
            "rollout.sde_window=null", "eval.num_images=2", "eval.steps=1", "eval.every=0", "ckpt_every=1",
            "grpo.minibatch_size=4", "reward=jpeg_incompressibility", "reward_kwargs={}", "async_reward=false"]
    # a failed start: the prompt file is missing
    assert main(argv) == 2
    assert "prompt file" in _one_line(capsys.readouterr().err)
    assert (run / "config.yaml").exists() and latest_step(run) is None

    # --resume: nothing to resume, and the message gives the command that restarts it
    assert main(["train", "--resume", str(run)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "stopped before its first checkpoint" in err and f"--out {run}" in err, err

    # the same command, once the file exists, starts the run afresh
    prompts.write_text("a red circle\ntwo blue squares\n")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "starting it afresh" in captured.err and latest_step(run) == 1
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "policy_loss" in r] == [1]

    # a run with a checkpoint is never overwritten: the message names --resume, --out and rm -r
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--resume {run}" in err and "--out" in err and f"rm -r {run}" in err, err
    assert latest_step(run) == 1


def test_python_resume_of_a_run_without_checkpoint_says_how_to_restart(tmp_path, tiny_model):
    from diffalign.config import load_config
    from diffalign.errors import CheckpointError
    from diffalign.training.rundir import RunDir
    from diffalign.training.trainer import TrainConfig, Trainer

    cfg = load_config(TrainConfig, None, [f"model={tiny_model}", "epochs=1"])
    RunDir(tmp_path / "run").create(cfg)  # a start killed before its first checkpoint
    with pytest.raises(CheckpointError, match="stopped before its first checkpoint.*Start it again without --resume"):
        Trainer(cfg, tmp_path / "run", resume=True)


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, tiny_model, capsys):
    """Two processes never train in one directory: a second start (or --resume) while another
    process holds the run stops with the holder's pid; once that process is gone (even killed),
    the same command runs."""
    import subprocess
    import sys

    from diffalign.training.rundir import RunDir

    run, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    argv = ["train", "flow_grpo", "--out", str(run), f"model={tiny_model}", f"prompt_file={prompts}",
            "lora_rank=0", "epochs=1", "prompts_per_epoch=2", "group_size=2", "rollout.steps=2",
            "rollout.sde_window=null", "eval.num_images=2", "eval.steps=1", "eval.every=0", "ckpt_every=1",
            "grpo.minibatch_size=4", "reward=jpeg_incompressibility", "reward_kwargs={}", "async_reward=false"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from diffalign.training.rundir import RunDir; "
         f"RunDir({str(run)!r}).lock(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(argv) == 2
        err = _one_line(capsys.readouterr().err)
        assert "in use" in err and f"pid {holder.pid}" in err and "--out" in err, err
        assert not (run / "config.yaml").exists()  # nothing was written into the held directory
    finally:
        holder.kill()  # killed, not closed cleanly: the kernel drops its lock
        holder.wait()

    assert main(argv) == 0
    capsys.readouterr()
    assert latest_step(run) == 1
    # the finished run released its lock: another process can take the directory (to resume it)
    probe = subprocess.run(
        [sys.executable, "-c", f"from diffalign.training.rundir import RunDir; RunDir({str(run)!r}).lock(); print('ok')"],
        capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "ok", probe.stderr
    # and within one process the lock is re-entrant, then released by unlock
    d = RunDir(run)
    d.lock().lock()
    d.unlock()
