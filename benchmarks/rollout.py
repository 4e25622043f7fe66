"""Rollout speed: how much of a rollout is spent outside the model's forward passes.

    python benchmarks/rollout.py --images 64 --steps 10 --cfg 4.5

For a rollout of N images × T steps with CFG (flow SDE sampler, log-probs stored) by the
ShapesWorld policy with LoRA adapters (rank ``--lora-rank``, as the presets train), times
the whole rollout and, separately, every model forward (the floor); the difference is the
sampler/bookkeeping overhead. Each configuration runs in its own process (the allocator
setting is process-wide):

- ``malloc default``: glibc's default thresholds, adapters unmerged (the runtime before
  :func:`diffalign.runtime.keep_freed_memory` and ``sampling_weights``);
- ``freed memory kept``: :func:`~diffalign.runtime.keep_freed_memory`, adapters unmerged;
- ``+ merged LoRA``: as above, sampling through ``TinyFlowPolicy.sampling_weights`` (what
  rollouts do);
- ``--bf16`` adds the last one with bf16-autocast forwards.

Reports peak resident memory. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

import torch
from _peak_rss import PeakRSS

from diffalign.models.tiny import TinyFlowPolicy
from diffalign.sampling.rollout import RolloutConfig, rollout

CONFIGS = {
    "default": ("malloc default", False, False, False),
    "kept": ("freed memory kept", True, False, False),
    "merged": ("+ merged LoRA", True, True, False),
    "bf16": ("+ merged LoRA, bf16-autocast", True, True, True),
}


def measure(policy: TinyFlowPolicy, images: int, steps: int, cfg: float, bf16: bool, repeats: int) -> dict:
    prompts = ["a red circle to the left of a blue square"] * images
    group_ids = torch.arange(images) // 8
    rc = RolloutConfig(sampler="flow_sde", steps=steps, guidance_scale=cfg, autocast_bf16=bf16, batch_size=images)
    forward_s = 0.0
    inner = policy.forward  # the adapted UNet, or the merged copy inside sampling_weights

    def timed(*a, **k):
        nonlocal forward_s
        t = time.perf_counter()
        out = inner(*a, **k)
        forward_s += time.perf_counter() - t
        return out

    policy.encode(prompts)  # text encodings cached before timing (they are cached in training too)
    rollout(policy, prompts[:8], group_ids[:8], RolloutConfig(steps=2), generator=torch.Generator().manual_seed(0))
    totals, forwards = [], []
    policy.forward = timed
    try:
        with PeakRSS() as mem:
            for r in range(repeats):
                forward_s = 0.0
                t0 = time.perf_counter()
                rollout(policy, prompts, group_ids, rc, generator=torch.Generator().manual_seed(r))
                totals.append(time.perf_counter() - t0)
                forwards.append(forward_s)
    finally:
        del policy.forward  # the class's method again
    total, fwd = min(totals), forwards[totals.index(min(totals))]
    return {
        "dtype": "bf16-autocast" if bf16 else "float32", "lora_rank": policy.lora_rank,
        "images": images, "steps": steps, "cfg": cfg,
        "total_s": total, "forward_s": fwd, "outside_forward_s": total - fwd,
        "outside_forward_frac": (total - fwd) / total,
        "images_per_s": images / total,
        "peak_rss_delta_mb": (mem.peak - mem.base) / 2**20,
        "peak_rss_mb": mem.peak / 2**20,
    }


def worker(a) -> dict:
    from diffalign.runtime import keep_freed_memory

    name, keep, merged, bf16 = CONFIGS[a.worker]
    if keep:
        assert keep_freed_memory()
    torch.set_num_threads(a.threads)
    policy = TinyFlowPolicy.from_checkpoint(a.checkpoint, lora_rank=a.lora_rank).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters (B = 0 at init would make them no-ops)
        for p in policy.trainable_parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    if not merged:
        policy.sampling_weights = contextlib.nullcontext  # the adapted UNet for every forward
    return {"config": name} | measure(policy, a.images, a.steps, a.cfg, bf16, 1 if bf16 else a.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--bf16", action="store_true", help="also run bf16-autocast forwards (slow on CPU: minutes)")
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    results = []
    for key in [k for k in CONFIGS if k != "bf16" or a.bf16]:
        args = [arg for arg in sys.argv[1:] if arg != "--bf16"]
        out = subprocess.run([sys.executable, __file__, *args, "--worker", key], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"worker {key} failed:\n{out.stderr}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    out = {"torch_threads": a.threads, "results": results}
    print(json.dumps(out, indent=2))
    print("\n| configuration | forwards | total s | model forward s | outside forward | images/s | peak RSS Δ MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['dtype']} | {r['total_s']:.2f} | {r['forward_s']:.2f} "
              f"| {100 * r['outside_forward_frac']:.1f}% | {r['images_per_s']:.1f} | {r['peak_rss_delta_mb']:.0f} |")


if __name__ == "__main__":
    main()
