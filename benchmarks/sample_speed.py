"""`diffalign sample` speed: images/s with the Euler ODE sampler and batched CFG.

    python benchmarks/sample_speed.py --images 64 --steps 20 --cfg 4.5

Generates with the shipped base model (text encodings warmed up first, as a running
sampler has them cached) and prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffalign.models.tiny import TinyFlowPolicy
from diffalign.sampling.generate import generate
from diffalign.world.grammar import eval_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoint", default=None)
    a = ap.parse_args()
    policy = TinyFlowPolicy.from_checkpoint(a.checkpoint).eval()
    prompts = eval_prompts("test", a.images, seed=0)
    generate(policy, prompts[:4], [0, 1, 2, 3], steps=2, cfg=a.cfg)  # warm-up, encodes prompts
    policy.encode(prompts)
    times = []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        generate(policy, prompts, list(range(r * a.images, (r + 1) * a.images)), steps=a.steps, cfg=a.cfg)
        times.append(time.perf_counter() - t0)
    best = min(times)
    out = {"images": a.images, "steps": a.steps, "cfg": a.cfg, "torch_threads": torch.get_num_threads(),
           "seconds": best, "images_per_s": a.images / best, "all_seconds": times}
    print(json.dumps(out, indent=2))
    print("\n| images | steps | CFG | threads | seconds | images/s |\n|---|---|---|---|---|---|")
    print(f"| {a.images} | {a.steps} | {a.cfg} | {out['torch_threads']} | {best:.2f} | {out['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
