"""Multi-process training: ``torchrun --nproc_per_node 2`` (gloo, CPU) against the single-process run.

One torchrun launch (tests/dist_worker.py) trains GRPO (global-std advantages) for two epochs
on 2 ranks and resumes it from its first-epoch checkpoint, and CRD for one epoch; the same
worker code runs the single-process reference (one epoch each) in this process meanwhile. Both sample the same 4 prompt
groups; rank 0 takes groups 0–1, rank 1 groups 2–3, and the single-process rollout runs the
same two chunks of 8 images, so the first epoch's images, rewards and advantages must match
*exactly*. Later epochs may differ: a 2-rank update (two half-batches with their own
step orders, gradients averaged) is a different optimizer step than the 1-process one.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import accelerate_env, run
from tiny import tiny_unet

from diffalign.config import load_config
from diffalign.distributed import (
    World,
    all_gather_tensor,
    all_reduce_gradients,
    get_world,
    init_distributed,
    launch_sharding,
    resolve_sharding,
    shard_groups,
)
from diffalign.errors import ConfigError
from diffalign.models.checkpoint import load_unet, save_unet
from diffalign.sharding import make_optimizer, partition_parameters, reduce_clip_step
from diffalign.training.rundir import RunDir, load_checkpoint
from diffalign.training.trainer import TrainConfig

WORKER = Path(__file__).with_name("dist_worker.py")
ALGOS = ("grpo", "crd")
EPOCHS = {"grpo": 2, "crd": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = str(save_unet(root / "tiny.safetensors", tiny_unet(0), 32))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), model, str(root / "dist"), "--grad", "--runs",
           "grpo:2:resume,crd:1,grpo_ptx:2:resume,grpo@optimizer:2:resume,crd@optimizer:1,grpo@gradients:2:resume,crd@deepspeed_zero2:1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for algo in ALGOS:  # the single-process reference, while the two ranks run
            run(model, root / "single", algo, 1)
        log, _ = proc.communicate(timeout=float(os.environ.get("DIST_TEST_TIMEOUT", "600")))
    finally:
        if proc.poll() is None:  # torchrun stops its workers on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"torchrun failed:\n{log[-4000:]}"
    return {"root": root, "model": model}


def _load(runs, name):
    return torch.load(runs["root"] / name, weights_only=False)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ALGOS)
def test_each_rank_holds_whole_groups_with_the_single_process_advantages(runs, algo):
    single = _load(runs, f"single/{algo}_rank0.pt")["updates"][0]
    ranks = [_load(runs, f"dist/{algo}_rank{r}.pt") for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    seen = []
    for r, rank in enumerate(ranks):
        first = rank["updates"][0]
        # contiguous whole groups: rank 0 has groups 0-1, rank 1 groups 2-3, all 4 images of each
        assert first["group_ids"].tolist() == [g for g in (2 * r, 2 * r + 1) for _ in range(4)]
        rows = slice(8 * r, 8 * r + 8)
        assert first["prompts"] == single["prompts"][rows]
        # the same images, rewards and (globally normalised for GRPO) advantages, bit for bit
        assert torch.equal(first["advantages"], single["advantages"][rows])
        seen.append(first["advantages"])
    assert torch.cat(seen).abs().sum() > 0  # real signal, not all-zero advantages


@pytest.mark.parametrize("algo", ALGOS)
def test_gathered_reward_means_match_and_rank0_alone_logs(runs, algo):
    single, dist = _metrics(runs["root"] / "single" / f"{algo}_run"), _metrics(runs["root"] / "dist" / f"{algo}_run")
    # one line per step: rank 0 alone writes (the other rank's identical rows are not logged)
    assert [r["step"] for r in dist] == list(range(EPOCHS[algo] + 1)) and [r["step"] for r in single] == [0, 1]
    first_s, first_d = single[1], dist[1]
    for key in [k for k in first_s if k == "reward" or k.startswith("reward/") or k == "zero_signal_groups"]:
        assert first_d[key] == first_s[key], key  # mean over all 16 images, gathered from both ranks
    assert (runs["root"] / "dist" / f"{algo}_run" / "summary.json").exists()


@pytest.mark.parametrize("algo", ALGOS)
def test_parameters_identical_across_ranks_and_trained(runs, algo):
    p0, p1 = (_load(runs, f"dist/{algo}_rank{r}.pt")["params"] for r in range(2))
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    base, _, _ = load_unet(runs["model"])
    base = base.state_dict()
    assert any(not torch.equal(base[k], p0[k]) for k in p0), "the update changed nothing"


def test_render_replay_keeps_ranks_in_sync_resumes_exactly_and_moves_the_update(runs):
    """ptx: every rank renders its own batch; the averaged gradient leaves all ranks with the same
    weights, a resumed epoch repeats the same draws, and the replay term changes the update."""
    p0, p1 = (_load(runs, f"dist/grpo_ptx_rank{r}.pt")["params"] for r in range(2))
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    for r in range(2):
        resumed = _load(runs, f"dist/grpo_ptx_resumed_rank{r}.pt")
        assert all(torch.equal(p0[k], resumed[k]) for k in p0)
    plain = _load(runs, "dist/grpo_rank0.pt")["params"]  # the same run without replay: other weights
    assert any(not torch.equal(plain[k], p0[k]) for k in p0)
    rows = _metrics(runs["root"] / "dist" / "grpo_ptx_run")
    assert all(r["ptx/loss"] > 0 and r["ptx/extra_loss"] > 0 for r in rows if "policy_loss" in r)


def test_every_rank_resumes_from_the_same_checkpoint_exactly(runs):
    for r in range(2):
        full = _load(runs, f"dist/grpo_rank{r}.pt")["params"]
        resumed = _load(runs, f"dist/grpo_resumed_rank{r}.pt")
        assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("algo", ALGOS)
def test_sharded_optimizer_state_gives_the_replicated_run_bit_for_bit(runs, algo):
    """sharding=optimizer (ZeRO-1): same parameters, same logged losses and the same full
    optimizer state in the checkpoint as the replicated 2-rank run."""
    for r in range(2):
        want = _load(runs, f"dist/{algo}_rank{r}.pt")["params"]
        got = _load(runs, f"dist/{algo}_optimizer_rank{r}.pt")["params"]
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a, b = (runs["root"] / "dist" / f"{name}_run" for name in (algo, f"{algo}_optimizer"))
    clock = ("wall_time", "train_time_s", "time/sample_s", "time/update_s")  # timings differ run to run
    assert [{k: v for k, v in row.items() if k not in clock} for row in _metrics(a)] == \
        [{k: v for k, v in row.items() if k not in clock} for row in _metrics(b)]
    sa, sb = load_checkpoint(RunDir(a))["optimizer"], load_checkpoint(RunDir(b))["optimizer"]
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    assert len(sa["state"]) == len(want)  # every parameter's AdamW state, gathered from both shards
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])


def test_sharded_run_resumes_exactly(runs):
    for r in range(2):
        full = _load(runs, f"dist/grpo_optimizer_rank{r}.pt")["params"]
        resumed = _load(runs, f"dist/grpo_optimizer_resumed_rank{r}.pt")
        assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_partition_balances_elements_and_is_deterministic():
    sizes = [100, 10, 60, 50, 5, 5]
    owner = partition_parameters(sizes, 2)
    assert owner == partition_parameters(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owner, strict=True) if o == r) for r in range(2)]
    assert sorted(load) == [115, 115]
    assert partition_parameters([3], 4) == [0]  # ranks may own nothing


def test_sharding_in_one_process_is_the_plain_optimizer_and_bad_values_are_rejected():
    p = torch.nn.Parameter(torch.ones(3))
    assert type(make_optimizer([p], torch.optim.AdamW, "optimizer")) is torch.optim.AdamW
    p.grad = torch.full((3,), 2.0)
    opt = torch.optim.SGD([p], lr=0.5)
    assert reduce_clip_step(opt, [p], max_norm=1e9) == pytest.approx(12 ** 0.5)
    assert torch.equal(p.detach(), torch.zeros(3))
    assert type(make_optimizer([p], torch.optim.AdamW, "gradients")) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="sharding must be one of none, optimizer, gradients"):
        load_config(TrainConfig, None, ["sharding=fsdp"]).validate()


def test_zero2_owners_hold_the_averaged_gradient_and_the_other_ranks_none(runs):
    """sharding=gradients after each backward: every gradient is freed, each rank keeps only its
    own parameters' gradient, summed over ranks (and micro-batches) - the replicated average."""
    parts = [_load(runs, f"dist/zero2_rank{r}.pt") for r in range(2)]
    grads = [_load(runs, f"dist/grad_rank{r}.pt") for r in range(2)]
    live = [i for i, g in enumerate(grads[0]["want"]) if g is not None]
    total = sum(grads[0]["want"][i].numel() * 4 for i in live)
    for micro in (1, 2):
        seen = set()
        for r in range(2):
            z = parts[r][micro]
            assert not any(z["grads_left"])  # no .grad survives the backward on any rank
            mine = {i for i in live if z["owner"][i] == r}
            assert set(z["owned"]) == mine and 0 < len(mine) < len(live)
            for i in mine:
                if micro == 1:  # one backward per step: the replicated arithmetic, bit for bit
                    assert torch.equal(z["owned"][i], grads[r]["got"][i])
                else:  # summed over ranks per micro-batch: float rounding only
                    torch.testing.assert_close(z["owned"][i], grads[r]["got"][i], rtol=1e-6, atol=1e-7)
            held = sum(z["owned"][i].numel() * 4 for i in mine)
            assert z["held"][-1] == held < total
            seen |= mine
            want_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[0]["want"][i]) for i in live]))
            assert z["norm"] == pytest.approx(float(want_norm), rel=1e-5)
        assert seen == set(live)  # every live gradient has exactly one owner


def test_gradient_sharded_run_matches_the_replicated_run(runs):
    """sharding=gradients (ZeRO-2), GRPO over 2 epochs: several backwards per optimizer step, so
    the sum over ranks is taken per backward - equal to the replicated run up to float rounding."""
    for r in range(2):
        got = _load(runs, f"dist/grpo_gradients_rank{r}.pt")
        want = _load(runs, f"dist/grpo_rank{r}.pt")
        assert got["sharding"] == "gradients" and got["shard_gradients"]
        assert torch.equal(got["updates"][0]["advantages"], want["updates"][0]["advantages"])
        assert want["params"].keys() == got["params"].keys()
        base = load_unet(runs["model"])[0].state_dict()
        moved = max(float((want["params"][k] - base[k]).abs().max()) for k in want["params"])
        for k in want["params"]:
            torch.testing.assert_close(got["params"][k], want["params"][k], rtol=0, atol=1e-6)
        assert moved > 1e-4  # the tolerance is far below what the updates moved
    a, b = (runs["root"] / "dist" / name for name in ("grpo_run", "grpo_gradients_run"))
    assert [row.get("reward") for row in _metrics(a)] == [row.get("reward") for row in _metrics(b)]
    state = load_checkpoint(RunDir(b))["optimizer"]
    assert len(state["state"]) == len(want["params"])  # the full AdamW state, gathered


def test_gradient_sharded_run_resumes_exactly(runs):
    for r in range(2):
        full = _load(runs, f"dist/grpo_gradients_rank{r}.pt")["params"]
        resumed = _load(runs, f"dist/grpo_gradients_resumed_rank{r}.pt")
        assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_deepspeed_zero2_launch_config_trains_with_gradient_sharding(runs):
    """configs/accelerate/deepspeed_zero2.yaml as accelerate's launcher passes it on (its
    environment, built by accelerate's own code): the trainer runs ZeRO-2 and CRD's result
    matches the replicated run."""
    for r in range(2):
        got = _load(runs, f"dist/crd_deepspeed_zero2_rank{r}.pt")
        want = _load(runs, f"dist/crd_rank{r}.pt")
        assert got["sharding"] == "gradients" and got["shard_gradients"]
        for k in want["params"]:
            torch.testing.assert_close(got["params"][k], want["params"][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("launch_config,mode", [("deepspeed_zero2", "gradients"), ("fsdp", "gradients"), ("ddp", None)])
def test_shipped_launch_configs_map_to_a_sharding_mode(launch_config, mode):
    got = launch_sharding(accelerate_env(launch_config))
    assert (got and got[0]) == mode
    assert resolve_sharding("none", accelerate_env(launch_config))[0] == (mode or "none")


@pytest.mark.parametrize("env,needle", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO stage 3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer_device"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, "use SHARD_GRAD_OP"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1"}, "FULL_SHARD"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"},
     "fsdp_reshard_after_forward: false"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_OFFLOAD_PARAMS": "true"},
     "does not implement offloading"),
])
def test_unsupported_launch_configs_are_refused_with_the_fix(env, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        launch_sharding(env)
    assert "docs/distributed.md" in str(e.value)


def test_deepspeed_json_config_file_gives_the_stage(tmp_path):
    """accelerate's deepspeed_config_file form: the stage is read from the DeepSpeed JSON."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    assert launch_sharding(env)[0] == "gradients"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        launch_sharding(env)


def test_launch_config_and_training_config_must_agree():
    zero1 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}
    assert resolve_sharding("optimizer", zero1) == ("optimizer", "config")
    assert resolve_sharding("none", zero1)[0] == "optimizer"
    with pytest.raises(ConfigError, match="sharding=gradients in the training config, but the DeepSpeed ZeRO stage 1"):
        resolve_sharding("gradients", zero1)
    assert resolve_sharding("gradients", {}) == ("gradients", "config")


def test_averaged_gradients_equal_the_whole_batch_gradient(runs):
    for r in range(2):
        g = _load(runs, f"dist/grad_rank{r}.pt")
        for got, want in zip(g["got"], g["want"], strict=True):
            if want is None:  # untouched on every rank: stays None, as in one process
                assert got is None
            else:
                # mean of two half-batch means vs one mean of 8: equal up to float32 rounding
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_groups_are_never_split_and_shards_are_equal():
    assert [shard_groups(8, World(r, 4, r, "gloo")) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                                             slice(6, 8)]
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        shard_groups(3, World(1, 2, 1, "gloo"))


def test_single_process_collectives_are_identity():
    t = torch.arange(6.0)
    assert all_gather_tensor(t) is t
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT unset"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "ACCELERATE_USE_FSDP": "true"},
     "fsdp_sharding_strategy FULL_SHARD"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
      "ACCELERATE_USE_DEEPSPEED": "true"}, "names no ZeRO stage"),
])
def test_bad_launch_environment_fails_before_joining(monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=needle):
        init_distributed()


def test_single_process_without_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == World(0, 1, 0, None) and get_world().is_main
