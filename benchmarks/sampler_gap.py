"""Score policies under several samplers on the same prompts and initial noise (a diagnostic).

Does a trained policy's gain show under the sampler it was trained with, and does it carry
over to the ODE sampler evaluation uses? For each target (``base``, a run directory, or a
checkpoint) generates ``--images`` task-balanced prompts of ``--split`` (one image each,
independent initial noise, the same noise for every target and sampler) with:

- ``sde``: the rollout sampler of ``flow_grpo.yaml`` (Flow-SDE, a = 0.7, SDE on steps 0–1 of 10);
- ``ode10``: the Euler ODE with the rollout's 10 steps;
- ``ode20``: the Euler ODE with evaluation's 20 steps;

all at CFG 4.5, and prints the verifier's strict and partial score, overall and per task.

    python benchmarks/sampler_gap.py --targets base,runs/s9/flow_fast_15min --split train --images 384

Prints a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SAMPLERS = {
    "sde": {"sampler": "flow_sde", "steps": 10, "noise_level": 0.7, "sde_window": (0, 2)},
    "ode10": {"sampler": "ode", "steps": 10},
    "ode20": {"sampler": "ode", "steps": 20},
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="base", help="comma-separated: base, run directories, checkpoints")
    ap.add_argument("--split", default="train", choices=["train", "test", "ood"])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-seed", type=int, default=7)
    args = ap.parse_args(argv)

    from diffalign.evaluation.quick import verdict_stats
    from diffalign.evaluation.report import load_policy_for_eval
    from diffalign.runtime import keep_freed_memory
    from diffalign.sampling.rollout import RolloutConfig, rollout
    from diffalign.world.grammar import eval_prompts
    from diffalign.world.verify import verify_batch

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    prompts = eval_prompts(args.split, args.images, seed=args.prompt_seed)
    results = []
    for target in args.targets.split(","):
        policy, name = load_policy_for_eval(None if target == "base" else target)
        policy.eval()
        for sampler in args.samplers.split(","):
            cfg = RolloutConfig(guidance_scale=4.5, batch_size=128, **SAMPLERS[sampler])
            t0 = time.perf_counter()
            with torch.no_grad():
                traj = rollout(policy, prompts, torch.arange(len(prompts)), cfg,
                               generator=torch.Generator().manual_seed(123))
            st = verdict_stats(prompts, verify_batch(traj.images, prompts))
            results.append({"target": target, "sampler": sampler, "seconds": round(time.perf_counter() - t0, 1), **st})
            print(f"{target} {sampler}: score {st['score']:.3f} partial {st['partial']:.3f}", flush=True)
    tasks = [k for k in results[0] if k.startswith("score/")]
    print("\n| target | sampler | score | partial | " + " | ".join(t[6:] for t in tasks) + " |")
    print("|---|---|---|---|" + "---|" * len(tasks))
    for r in results:
        print(f"| {r['target']} | {r['sampler']} | {r['score']:.3f} | {r['partial']:.3f} | "
              + " | ".join(f"{r[t]:.2f}" for t in tasks) + " |")
    out = {"split": args.split, "images": args.images, "results": results}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
