"""Where does the verifier's signal sit? Resample one sampler step's noise, hold the rest.

Rung 3 of the RL-learning diagnosis (docs/results.md). For each prompt of ``--prompts`` and
``--noises`` initial noises, and for each step ``k`` of the preset's rollout schedule, sample
``--resamples`` images that share the initial noise and every other step (the deterministic
ODE step) and differ only in step ``k``'s SDE noise. A step whose noise never changes the
verdict adds only noise to the policy gradient; one that often does is where the signal
is. Per step it reports:

- ``flip``: the fraction of (prompt, noise) sets whose strict verdicts are not all equal;
- ``reward_std``: the mean within-set std of the preset's reward (what a GRPO group sees
  when only that step is stochastic);
- ``score``: the mean strict score of the step's images.

    python benchmarks/signal_steps.py --prompts fixed4.txt --noises 12 --resamples 8

Prints a table and JSON; ``--json`` writes the JSON to a file too.
"""

from __future__ import annotations

import argparse
import time

import torch
from _json_out import emit_json


def step_signal(policy, prompts: list[str], rollout_cfg, reward, *, noises: int, resamples: int, seed: int = 0,
                steps: list[int] | None = None) -> list[dict]:
    """Per step ``k``: flip fraction, within-set reward std and score (see the module docstring)."""
    from dataclasses import replace

    from diffalign.sampling.rollout import rollout
    from diffalign.world.verify import verify_batch

    batch = [p for p in prompts for _ in range(noises) for _ in range(resamples)]
    gids = torch.arange(len(prompts) * noises).repeat_interleave(resamples)
    rows = []
    for k in steps if steps is not None else range(rollout_cfg.steps):
        cfg = replace(rollout_cfg, sde_window=(k, k + 1), init_noise="shared")
        # the same generator seed for every k: the same shared initial noises
        traj = rollout(policy, batch, gids, cfg, generator=torch.Generator().manual_seed(seed))
        strict = torch.tensor([v.score for v in verify_batch(traj.images, batch)]).view(-1, resamples)
        r = reward(traj.images, batch, [{} for _ in batch]).scores.view(-1, resamples)
        rows.append({"step": k, "sigma": round(float(traj.sigmas[k]), 4),
                     "flip": float((strict.amax(1) != strict.amin(1)).float().mean()),
                     "reward_std": float(r.std(1, correction=0).mean()),
                     "score": float(strict.mean())})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flow_grpo")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ap.add_argument("--noises", type=int, default=12, help="initial noises per prompt")
    ap.add_argument("--resamples", type=int, default=8, help="draws of the one stochastic step per noise")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)

    from diffalign.cli import resolve_preset
    from diffalign.config import load_config
    from diffalign.models.factory import build_policy
    from diffalign.rewards import build_reward
    from diffalign.runtime import keep_freed_memory
    from diffalign.training.prompts import read_prompt_file
    from diffalign.training.trainer import TrainConfig

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, resolve_preset(args.preset), args.set)
    policy = build_policy(cfg.model_family, cfg.model, image_size=cfg.image_size)
    reward = build_reward(cfg.reward, **cfg.reward_kwargs)
    prompts = read_prompt_file(args.prompts)
    t0 = time.perf_counter()
    rows = step_signal(policy, prompts, cfg.rollout, reward, noises=args.noises, resamples=args.resamples)
    print(f"{'step':>4} {'sigma':>6} {'flip':>6} {'reward_std':>10} {'score':>6}")
    for r in rows:
        print(f"{r['step']:4d} {r['sigma']:6.3f} {r['flip']:6.3f} {r['reward_std']:10.4f} {r['score']:6.3f}")
    out = {"preset": args.preset, "overrides": args.set, "prompts": prompts, "noises": args.noises,
           "resamples": args.resamples, "noise_level": cfg.rollout.noise_level,
           "images": len(rows) * len(prompts) * args.noises * args.resamples,
           "seconds": round(time.perf_counter() - t0, 1), "steps": rows}
    return emit_json(out, args.json)


if __name__ == "__main__":
    main()
