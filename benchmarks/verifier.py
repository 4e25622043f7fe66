"""Verifier exactness: renders over all task types must score 1; every near-miss must fail.

    python benchmarks/verifier.py --renders 5000 --near-misses 1000

Prints JSON (and a markdown table) with the pass rate on renders and the failure rate
on each near-miss kind. Also used by tests/test_world.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from diffalign.world.grammar import TASKS, eval_prompts, parse_prompt
from diffalign.world.nearmiss import NEAR_MISS_KINDS, near_miss
from diffalign.world.render import render
from diffalign.world.verify import verify


def run(renders: int = 5000, near_misses: int = 1000, size: int = 32) -> dict:
    t0 = time.perf_counter()
    per_task = collections.defaultdict(lambda: [0, 0])
    # Train, test and out-of-domain prompts alike; free colours may be held-out combos here.
    prompts = [p for split in ("train", "test", "ood") for p in eval_prompts(split, renders // 3 + 1, seed=11)]
    for i, p in enumerate(prompts[:renders]):
        img, _ = render(p, 100_000 + i, size, avoid_held_out=False)
        stats = per_task[parse_prompt(p).task]
        stats[0] += 1
        stats[1] += verify(img, p).score == 1.0
    render_s = time.perf_counter() - t0
    nm = {k: [0, 0] for k in NEAR_MISS_KINDS}
    for i, p in enumerate(eval_prompts("train", near_misses, seed=12)):
        for kind in NEAR_MISS_KINDS:
            img = near_miss(p, 200_000 + i, kind, size)
            if img is None:
                continue
            nm[kind][0] += 1
            nm[kind][1] += verify(img, p).score == 0.0
    n = sum(v[0] for v in per_task.values())
    passed = sum(v[1] for v in per_task.values())
    return {
        "image_size": size,
        "renders": n,
        "render_pass_rate": passed / n,
        "render_pass_rate_by_task": {t: per_task[t][1] / per_task[t][0] for t in TASKS if per_task[t][0]},
        "near_miss_fail_rate": {k: v[1] / v[0] for k, v in nm.items() if v[0]},
        "near_miss_counts": {k: v[0] for k, v in nm.items()},
        "render_and_verify_ms_per_image": 1000 * render_s / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", type=int, default=5000)
    ap.add_argument("--near-misses", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32)
    a = ap.parse_args()
    r = run(a.renders, a.near_misses, a.size)
    print(json.dumps(r, indent=2))
    print("\n| check | n | rate |\n|---|---|---|")
    print(f"| renders scored 1.0 | {r['renders']} | {r['render_pass_rate']:.4f} |")
    for k, v in r["near_miss_fail_rate"].items():
        print(f"| near miss '{k}' scored 0 | {r['near_miss_counts'][k]} | {v:.4f} |")


if __name__ == "__main__":
    main()
