"""Optimizer-state and gradient sharding (``sharding: optimizer`` / ``gradients``, ZeRO-1 / ZeRO-2):
memory held per rank, step time, and agreement with the replicated run.

Launches ``torchrun --nproc_per_node N`` (gloo on CPU) on the shipped ShapesWorld base model,
full fine-tuning (every weight trainable, the case sharding is for), and for ``none``,
``optimizer`` and ``gradients`` takes a few optimizer steps of ``--micro`` backward passes each
(gradient accumulation) on fixed random losses, measuring per rank: the bytes of AdamW state
held, the peak bytes of gradients held during backward (``.grad`` tensors plus ZeRO-2's owned
accumulators, sampled after every parameter's gradient hook) and after it, and the time of
backward plus the reduce/clip/step/broadcast part. Reports the largest weight difference from
the replicated run (ZeRO-1: bit-identical; ZeRO-2 sums over ranks per backward, so float
rounding may differ).

``--bucket-mb`` sets ZeRO-2's bucket size: the 3.9 M-parameter base (15 MB of float32
gradients) fits in one default 25 MB bucket, which would only be freed at the end of backward;
1 MB buckets show the in-backward freeing a billion-parameter model gets with 25 MB ones.

    python benchmarks/sharding.py --procs 2 --micro 2 --bucket-mb 1

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
from functools import partial
from pathlib import Path


def _held(opt, params) -> int:
    """Gradient bytes held: ``.grad`` tensors, plus ZeRO-2's owned accumulators."""
    if hasattr(opt, "gradient_bytes"):
        return opt.gradient_bytes()
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def _sample(peak: list[int], opt, params, _param) -> None:
    peak[0] = max(peak[0], _held(opt, params))


def worker(out: str, steps: int, micro: int, bucket_mb: float) -> None:
    import torch

    from diffalign.distributed import get_world, init_distributed
    from diffalign.models.factory import build_policy
    from diffalign.sharding import make_optimizer, reduce_clip_step

    torch.set_num_threads(1)
    init_distributed()
    world = get_world()
    res = {}
    weights = {}
    for mode in ("none", "optimizer", "gradients"):
        torch.manual_seed(0)
        policy = build_policy("tiny", None, lora_rank=0)
        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        opt = make_optimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1e-4), mode, bucket_mb=bucket_mb)
        peak = [0]
        # runs after the optimizer's own hook (registered later), so sees what it left
        hooks = [p.register_post_accumulate_grad_hook(partial(_sample, peak, opt, params)) for p in params]
        gen = torch.Generator().manual_seed(1 + world.rank)
        t_step, after = 0.0, 0
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            for _ in range(micro):
                loss = sum((p.float() * torch.randn(p.shape, generator=gen)).sum() for p in params) * 1e-3
                loss.backward()
            after = _held(opt, params)
            reduce_clip_step(opt, params, 1.0)
            t_step += time.perf_counter() - t0
        for h in hooks:
            h.remove()
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        inner = opt.inner if mode != "none" else opt
        state_bytes = 0 if inner is None else sum(
            v.numel() * v.element_size() for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
        res[mode] = {"state_mb": state_bytes / 2**20, "grad_peak_mb": peak[0] / 2**20, "grad_after_mb": after / 2**20,
                     "step_ms": 1000 * t_step / steps, "params": sum(p.numel() for p in params)}
        weights[mode] = [p.detach().clone() for p in params]
    for mode in ("optimizer", "gradients"):
        res[mode]["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(weights["none"], weights[mode], strict=True))
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro", type=int, default=2, help="backward passes per optimizer step")
    ap.add_argument("--bucket-mb", type=float, default=1.0, help="ZeRO-2 bucket size")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.micro, args.bucket_mb)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.procs),
               __file__, "--worker", tmp, "--steps", str(args.steps), "--micro", str(args.micro),
               "--bucket-mb", str(args.bucket_mb)]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.procs)]
    out = {"procs": args.procs, "steps": args.steps, "micro": args.micro, "bucket_mb": args.bucket_mb,
           "params": ranks[0]["none"]["params"], "ranks": ranks,
           "max_abs_diff": {m: max(r[m]["max_abs_diff"] for r in ranks) for m in ("optimizer", "gradients")}}
    print(json.dumps(out, indent=1))
    print(f"\nShapesWorld base, full fine-tuning ({out['params']:,} parameters), {args.procs} processes, "
          f"{args.steps} steps of {args.micro} backward passes, ZeRO-2 buckets {args.bucket_mb:g} MB. Largest weight "
          f"difference from the replicated run: ZeRO-1 {out['max_abs_diff']['optimizer']:.1e}, "
          f"ZeRO-2 {out['max_abs_diff']['gradients']:.1e}\n", file=sys.stderr)
    print("| rank | sharding | AdamW state (MB) | gradients, peak in backward (MB) | gradients after backward (MB) "
          "| backward + step (ms) |", file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for r, x in enumerate(ranks):
        for m in ("none", "optimizer", "gradients"):
            print(f"| {r} | {m} | {x[m]['state_mb']:.2f} | {x[m]['grad_peak_mb']:.2f} | {x[m]['grad_after_mb']:.2f} "
                  f"| {x[m]['step_ms']:.1f} |", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
