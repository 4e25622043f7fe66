"""Memory of a training iteration vs the number of sampling steps: CRD against Flow-GRPO.

    python benchmarks/memory.py --images 64 --steps 10 40

Forward-process methods (CRD, DiffusionNFT) keep only the clean samples of a rollout and train
on freshly re-noised copies, so their memory should not depend on the number of sampling steps
``T``. Flow-GRPO stores every state, log-prob and clean estimate of the trajectory:
``O(B·T)``. For each method and each ``T`` this runs, in a fresh subprocess (so one
measurement's allocations cannot hide another's), one rollout of ``--images`` images
(8 per prompt) from the shipped ShapesWorld base followed by one update, and reports:

- ``stored_mb``: bytes of every tensor the rollout hands to the update (exact);
- ``peak_rss_delta_mb``: peak resident memory during rollout + update above the level after a
  small warm-up iteration (model, text encoder and optimizer state already allocated),
  sampled every 2 ms.

Flow-GRPO samples with its SDE on every step and trains ``--grpo-train-steps`` of them per
image (the update's peak does not depend on how many: gradients are accumulated step by step,
each freed after its backward). CRD samples with the Euler ODE and trains on one fresh
``(σ, ε)`` draw per image, CRD's KL anchor (CFG-guided base) included. Full fine-tuning,
float32, CPU. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import fields

import torch
from _peak_rss import PeakRSS

from diffalign.algorithms.flow_grpo import GRPO, GRPOConfig
from diffalign.algorithms.forward import CRDConfig, ForwardProcess
from diffalign.models.tiny import TinyFlowPolicy
from diffalign.sampling.rollout import RolloutConfig, rollout

PROMPTS = ["a red circle to the left of a blue square", "three green triangles", "a purple square",
           "a yellow circle above an orange triangle", "two blue circles", "a red triangle and a green square",
           "an orange circle", "four purple triangles"]


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor field of a rollout container."""
    return sum(v.nbytes for v in (getattr(obj, f.name) for f in fields(obj)) if isinstance(v, torch.Tensor))


def _iteration(method: str, policy, opt, images: int, steps: int, train_steps: int, seed: int):
    prompts = [PROMPTS[i // 8 % len(PROMPTS)] for i in range(images)]
    gids = torch.arange(images) // 8
    gen = torch.Generator().manual_seed(seed)
    if method == "crd":
        algo = ForwardProcess("crd", CRDConfig(groups_per_microbatch=max(1, images // 8)))
        out = algo.rollout(policy, prompts, gids, RolloutConfig(sampler="ode", steps=steps, guidance_scale=1.0,
                                                                batch_size=images), generator=gen)
    else:
        algo = GRPO(GRPOConfig(clip_range=1e-3, train_fraction=min(1.0, train_steps / steps), minibatch_size=images))
        out = rollout(policy, prompts, gids, RolloutConfig(sampler="flow_sde", steps=steps, guidance_scale=4.5,
                                                           batch_size=images), generator=gen)
    rewards = torch.rand(images, generator=gen)
    adv, _ = algo.advantages(rewards, gids, prompts)
    algo.update(policy, opt, out, adv, gen)
    return out


def worker(method: str, images: int, steps: int, train_steps: int) -> dict:
    torch.manual_seed(0)
    policy = TinyFlowPolicy.from_checkpoint(None)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    _iteration(method, policy, opt, 8, 2, 1, seed=1)  # warm-up: lazy loads, Adam state, allocator
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        out = _iteration(method, policy, opt, images, steps, train_steps, seed=0)
    return {"method": method, "images": images, "steps": steps, "seconds": time.perf_counter() - t0,
            "stored_mb": _tensor_bytes(out) / 2**20, "peak_rss_delta_mb": (mem.peak - mem.base) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="images per rollout (8 per prompt)")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 40], help="sampling steps to compare")
    ap.add_argument("--methods", nargs="+", default=["crd", "flow_grpo"], choices=["crd", "flow_grpo"])
    ap.add_argument("--grpo-train-steps", type=int, default=2,
                    help="sampling steps Flow-GRPO trains on per image (time only; not the peak)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="measurements run at once (each in its own process, so peaks stay separate)")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.images, int(a.worker[1]), a.grpo_train_steps)))
        return
    cmds = [[sys.executable, __file__, "--images", str(a.images), "--threads", str(a.threads),
             "--grpo-train-steps", str(a.grpo_train_steps), "--worker", method, str(steps)]
            for method in a.methods for steps in a.steps]
    results = []
    for start in range(0, len(cmds), a.jobs):
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True, env=os.environ)
                 for c in cmds[start : start + a.jobs]]
        for proc, cmd in zip(procs, cmds[start : start + a.jobs], strict=True):
            stdout, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"measurement {cmd[-2:]} failed with exit status {proc.returncode}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    out = {"torch_threads": a.threads or torch.get_num_threads(), "results": results}
    for method in a.methods:
        rows = [r for r in results if r["method"] == method]
        lo, hi = min(rows, key=lambda r: r["steps"]), max(rows, key=lambda r: r["steps"])
        out[f"{method}_peak_growth_mb"] = hi["peak_rss_delta_mb"] - lo["peak_rss_delta_mb"]
        out[f"{method}_stored_growth_mb"] = hi["stored_mb"] - lo["stored_mb"]
    print(json.dumps(out, indent=2))
    print("\n| method | images | sampling steps | stored rollout MB | peak RSS Δ MB | seconds |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['images']} | {r['steps']} | {r['stored_mb']:.1f} | {r['peak_rss_delta_mb']:.0f} "
              f"| {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
