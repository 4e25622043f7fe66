"""One process of the multi-process tests (tests/test_distributed.py), or the single-process reference.

Run under ``torchrun --nproc_per_node 2 tests/dist_worker.py MODEL OUT`` (gloo on CPU), or as
``python tests/dist_worker.py MODEL OUT`` for the one-process run. For each algorithm it trains
a tiny model for a few epochs and saves, per rank, ``OUT/<algo>_rank<r>.pt``: the advantages
and group ids each update received, the final trainable parameters, and the run directory
(rank 0's metrics hold the gathered reward means). ``--grad`` also checks that
:func:`diffalign.distributed.all_reduce_gradients` yields the gradient of the whole batch, and
records what ``sharding: gradients`` (ZeRO-2) holds per rank after one and two micro-batches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from diffalign.config import load_config  # noqa: E402
from diffalign.distributed import all_reduce_gradients, barrier, get_world, init_distributed  # noqa: E402
from diffalign.sharding import SHARDING_MODES, make_optimizer, reduce_clip_step  # noqa: E402
from diffalign.training.trainer import TrainConfig, Trainer  # noqa: E402

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "shapes"

# 4 prompt groups of 4 images; 2 ranks take 2 groups each. rollout.batch_size = 8 makes the
# single-process rollout run in the same two chunks of 8 images as the ranks (identical model
# batches, so identical floats on CPU).
COMMON = ["lora_rank=0", "prompts_per_epoch=4", "group_size=4", "rollout.steps=2", "rollout.batch_size=8",
          "rollout.guidance_scale=1.0",
          "rollout.sde_window=null", "eval.num_images=2", "eval.steps=1", "eval.every=0", "ckpt_every=1",
          "lr=1e-3", "reward=jpeg_incompressibility", "reward_kwargs={}", "async_reward=false"]
ALGOS = {
    # global-std advantages: the std runs over every rank's rewards (gathered)
    "grpo": ("flow_grpo.yaml", ["grpo.minibatch_size=4", "grpo.clip_range=0.2", "grpo.adv_std=global"]),
    # pretraining-data replay: each rank adds its own renders' flow-matching loss to its gradient
    "grpo_ptx": ("flow_grpo.yaml", ["grpo.minibatch_size=4", "grpo.clip_range=0.2", "ptx.weight=0.5",
                                    "ptx.batch_size=2", "ptx.extra_steps=1"]),
    "crd": (None, ["algorithm=crd", "rollout.sampler=flow_sde", "crd.groups_per_microbatch=1", "crd.beta_kl=0.01",
                   "crd.beta_min=0.001", "crd.kl_guidance=1.0"]),
}


def config(model: str, algo: str, *extra: str) -> TrainConfig:
    preset, args = ALGOS[algo]
    return load_config(TrainConfig, str(PRESETS / preset) if preset else None,
                       [f"model={model}", *COMMON, *args, *extra])


def accelerate_env(launch_config: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file configs/accelerate/<launch_config>.yaml``
    gives its processes, built by accelerate's own launcher code (no GPU needed to build it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{launch_config}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "diffalign.cli", "train", "x"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def run(model: str, out: Path, algo: str, epochs: int, *, resume: bool = False, sharding: str = "none") -> None:
    """``sharding``: the config's mode (none / optimizer / gradients), or the name of a shipped
    accelerate launch config (e.g. deepspeed_zero2) whose environment sets the mode instead."""
    world = get_world()
    launch = sharding if sharding not in SHARDING_MODES else None
    extra = [f"epochs={epochs}", f"sharding={'none' if launch else sharding}"]
    name = algo if sharding == "none" else f"{algo}_{sharding}"
    run_dir = out / f"{name}_run"
    saved = dict(os.environ)
    if launch:
        os.environ.update({k: v for k, v in accelerate_env(launch).items()
                           if k.startswith(("ACCELERATE_USE", "ACCELERATE_DEEPSPEED", "FSDP_"))})
    try:
        trainer = Trainer(config(model, algo, *extra), run_dir)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    seen = []
    update = trainer.algo.update

    def recording_update(policy, optimizer, traj, advantages, generator):
        seen.append({"group_ids": traj.group_ids.cpu().clone(), "advantages": advantages.cpu().clone(),
                     "prompts": list(traj.prompts)})
        return update(policy, optimizer, traj, advantages, generator)

    trainer.algo.update = recording_update
    trainer.train()
    params = {k: v.detach().clone() for k, v in trainer.policy.trainable_state().items()}
    opt = trainer.optimizer
    torch.save({"updates": seen, "params": params, "world_size": world.world_size, "sharding": trainer.sharding,
                "shard_gradients": bool(getattr(opt, "shard_gradients", False))},
               out / f"{name}_rank{world.rank}.pt")

    if not resume:
        return
    # resume from the previous epoch's checkpoint (rank 0 drops the last one) and redo the last epoch
    if world.is_main:
        shutil.rmtree(run_dir / "checkpoints" / f"step_{epochs:07d}")
    barrier()
    resumed = Trainer(config(model, algo, *extra), run_dir, resume=True)
    assert resumed.start_epoch == epochs - 1, resumed.start_epoch
    resumed.train()
    torch.save({k: v.detach().clone() for k, v in resumed.policy.trainable_state().items()},
               out / f"{name}_resumed_rank{world.rank}.pt")


def grad_check(out: Path) -> None:
    """Per-rank half-batch gradients, averaged, equal the gradient of the whole batch's mean loss."""
    world = get_world()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    unused = torch.nn.Linear(2, 2)  # a parameter no rank touches keeps grad None
    x, y = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), torch.randn(8, 1)
    params = [*net.parameters(), *unused.parameters()]
    n = len(x) // world.world_size
    rows = slice(world.rank * n, (world.rank + 1) * n)
    ((net(x[rows]) - y[rows]) ** 2).mean().backward()
    all_reduce_gradients(params)
    got = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ((net(x) - y) ** 2).mean().backward()
    want = [None if p.grad is None else p.grad.clone() for p in params]
    torch.save({"got": got, "want": want}, out / f"grad_rank{world.rank}.pt")
    # ZeRO-2: two micro-batches per step, gradients reduced to their owners during each backward
    zero2 = {}
    for micro in (1, 2):
        for p in params:
            p.grad = None
        opt = make_optimizer(params, lambda ps: torch.optim.SGD(ps, lr=0.0), "gradients")
        held = []
        for part in torch.arange(n).chunk(micro):
            r = rows.start + part
            (((net(x[r]) - y[r]) ** 2).sum() / n).backward()
            held.append(opt.gradient_bytes())
        owned = opt.owned_gradients()
        zero2[micro] = {"owned": owned, "owner": opt.owner, "held": held, "grads_left": [p.grad is not None for p in params],
                        "norm": reduce_clip_step(opt, params, 1e9)}
        opt.remove_hooks()
    torch.save(zero2, out / f"zero2_rank{world.rank}.pt")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--runs", default="grpo:2:resume,crd:1",
                    help="ALGO[@SHARDING]:EPOCHS[:resume] items; resume redoes the last epoch from the previous "
                         "checkpoint; SHARDING is the config's sharding (default none)")
    ap.add_argument("--grad", action="store_true")
    args = ap.parse_args()
    init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.grad:
        grad_check(out)
    for item in args.runs.split(","):
        spec, epochs, *flag = item.split(":")
        algo, _, sharding = spec.partition("@")
        run(args.model, out, algo, int(epochs), resume=flag == ["resume"], sharding=sharding or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
