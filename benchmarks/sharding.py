"""Optimizer-state sharding (``sharding: optimizer``): AdamW state held per rank, and step time.

Launches ``torchrun --nproc_per_node N`` (gloo on CPU) on the shipped ShapesWorld base model,
full fine-tuning (every weight trainable, the case sharding is for), and for ``none`` and
``optimizer`` takes a few optimizer steps on a fixed random batch, measuring per rank the
bytes of AdamW state held and the time of the reduce/clip/step/broadcast part; checks that
the two give bit-identical weights.

    python benchmarks/sharding.py --procs 2

Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(out: str, steps: int) -> None:
    import torch

    from diffalign.distributed import get_world, init_distributed
    from diffalign.models.factory import build_policy
    from diffalign.sharding import make_optimizer, reduce_clip_step

    torch.set_num_threads(1)
    init_distributed()
    world = get_world()
    res = {}
    weights = {}
    for mode in ("none", "optimizer"):
        torch.manual_seed(0)
        policy = build_policy("tiny", None, lora_rank=0)
        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        opt = make_optimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1e-4), mode)
        gen = torch.Generator().manual_seed(1 + world.rank)
        t_step = 0.0
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = sum((p.float() * torch.randn(p.shape, generator=gen)).sum() for p in params) * 1e-3
            loss.backward()
            t0 = time.perf_counter()
            reduce_clip_step(opt, params, 1.0)
            t_step += time.perf_counter() - t0
        inner = opt.inner if mode == "optimizer" else opt
        state_bytes = 0 if inner is None else sum(
            v.numel() * v.element_size() for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
        res[mode] = {"state_mb": state_bytes / 2**20, "step_ms": 1000 * t_step / steps,
                     "params": sum(p.numel() for p in params)}
        weights[mode] = [p.detach().clone() for p in params]
    res["identical"] = all(torch.equal(a, b) for a, b in zip(weights["none"], weights["optimizer"], strict=True))
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.procs),
               __file__, "--worker", tmp, "--steps", str(args.steps)]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.procs)]
    out = {"procs": args.procs, "steps": args.steps, "params": ranks[0]["none"]["params"], "ranks": ranks,
           "identical": all(r["identical"] for r in ranks)}
    print(json.dumps(out, indent=1))
    print(f"\nShapesWorld base, full fine-tuning ({out['params']:,} parameters), {args.procs} processes, "
          f"bit-identical weights: {out['identical']}\n", file=sys.stderr)
    print("| rank | AdamW state, replicated (MB) | sharded (MB) | step time replicated (ms) | sharded (ms) |", file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for r, x in enumerate(ranks):
        print(f"| {r} | {x['none']['state_mb']:.2f} | {x['optimizer']['state_mb']:.2f} | {x['none']['step_ms']:.1f} "
              f"| {x['optimizer']['step_ms']:.1f} |", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
