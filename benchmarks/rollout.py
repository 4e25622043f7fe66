"""Rollout speed: how much of a rollout is spent outside the model's forward passes.

    python benchmarks/rollout.py --images 64 --steps 10 --cfg 4.5

For a rollout of N images × T steps with CFG (flow SDE sampler, log-probs stored), times
the whole rollout and, separately, every model forward (the floor); the difference is the
sampler/bookkeeping overhead. Runs float32 and bf16-autocast forwards, and reports peak
resident memory. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _peak_rss import PeakRSS

from diffalign.models.tiny import TinyFlowPolicy
from diffalign.sampling.rollout import RolloutConfig, rollout


def measure(policy: TinyFlowPolicy, images: int, steps: int, cfg: float, bf16: bool, repeats: int) -> dict:
    prompts = ["a red circle to the left of a blue square"] * images
    group_ids = torch.arange(images) // 8
    rc = RolloutConfig(sampler="flow_sde", steps=steps, guidance_scale=cfg, autocast_bf16=bf16, batch_size=images)
    forward_s = 0.0
    inner = policy.unet.forward

    def timed(*a, **k):
        nonlocal forward_s
        t = time.perf_counter()
        out = inner(*a, **k)
        forward_s += time.perf_counter() - t
        return out

    policy.encode(prompts)  # text encodings cached before timing (they are cached in training too)
    rollout(policy, prompts[:8], group_ids[:8], RolloutConfig(steps=2), generator=torch.Generator().manual_seed(0))
    totals, forwards = [], []
    policy.unet.forward = timed
    try:
        with PeakRSS() as mem:
            for r in range(repeats):
                forward_s = 0.0
                t0 = time.perf_counter()
                rollout(policy, prompts, group_ids, rc, generator=torch.Generator().manual_seed(r))
                totals.append(time.perf_counter() - t0)
                forwards.append(forward_s)
    finally:
        policy.unet.forward = inner
    total, fwd = min(totals), forwards[totals.index(min(totals))]
    return {
        "dtype": "bf16-autocast" if bf16 else "float32",
        "images": images, "steps": steps, "cfg": cfg,
        "total_s": total, "forward_s": fwd, "outside_forward_s": total - fwd,
        "outside_forward_frac": (total - fwd) / total,
        "images_per_s": images / total,
        "peak_rss_delta_mb": (mem.peak - mem.base) / 2**20,
        "peak_rss_mb": mem.peak / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 run")
    a = ap.parse_args()
    policy = TinyFlowPolicy.from_checkpoint(a.checkpoint).eval()
    results = [measure(policy, a.images, a.steps, a.cfg, False, a.repeats)]
    if not a.no_bf16:
        results.append(measure(policy, a.images, a.steps, a.cfg, True, 1))
    out = {"torch_threads": torch.get_num_threads(), "results": results}
    print(json.dumps(out, indent=2))
    print("\n| forwards | total s | model forward s | outside forward | images/s | peak RSS Δ MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['total_s']:.2f} | {r['forward_s']:.2f} | {100 * r['outside_forward_frac']:.1f}% "
              f"| {r['images_per_s']:.1f} | {r['peak_rss_delta_mb']:.0f} |")


if __name__ == "__main__":
    main()
