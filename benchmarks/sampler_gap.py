"""Score policies under several samplers on the same prompts and initial noise (a diagnostic).

Does a trained policy's gain show under the sampler it was trained with, and does it carry
over to the ODE sampler evaluation uses? For each target (``base``, a run directory, or a
checkpoint) generates ``--images`` task-balanced prompts of ``--split`` (one image each,
independent initial noise, the same noise for every target and sampler) with:

- ``sde``: the rollout sampler of ``flow_grpo.yaml`` (Flow-SDE, a = 0.7, SDE on steps 0–1 of 10);
- ``ode10``: the Euler ODE with the rollout's 10 steps;
- ``ode20``: the Euler ODE with evaluation's 20 steps;
- ``ode10>20``: the Euler ODE on a mixed grid: the 10-step grid's first two steps (σ 1.0 → 0.9 →
  0.8, the ones GRPO trains), then the 20-step grid from 0.8 to 0 (18 steps);
- ``ode20>10``: the reverse: the 20-step grid from 1.0 to 0.8 (4 steps), then the 10-step grid
  (12 steps). If a gain that shows at 10 steps and not at 20 comes back with ``ode10>20``,
  it is carried by the coarse early steps; if it comes back with ``ode20>10``, by the coarse
  late steps;

at each CFG weight of ``--cfgs`` (default 4.5), and prints the verifier's strict and partial
score, overall and per task.

``--fm-loss`` also measures how far the samples lie from the data the model was trained on:
the flow-matching loss of the target's own conditional velocity, ``mean ‖v_θ(x_σ) − (ε − x0)‖²``,
on its samples ``x0`` re-noised at each σ of ``FM_SIGMAS`` (fresh ε, the same for every row),
next to the same loss on renderer images of the same prompts (the pretraining data; a
``renders`` row), plus the fraction of pixels beyond the data range [−1, 1] and the median
absolute Laplacian (residual pixel noise). Methods that fit their own samples (online SFT,
DiffusionNFT, CRD) regress onto exactly these ``x0``.

    python benchmarks/sampler_gap.py --targets base,runs/s9/flow_fast_15min --split train --images 384
    python benchmarks/sampler_gap.py --cfgs 1,4.5 --fm-loss --images 384 --json docs/results/sample_distribution.json

Prints a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from _json_out import emit_json

FM_SIGMAS = (0.05, 0.1, 0.3, 0.5, 0.8)

SAMPLERS = {
    "sde": {"sampler": "flow_sde", "steps": 10, "noise_level": 0.7, "sde_window": (0, 2)},
    "ode10": {"sampler": "ode", "steps": 10},
    "ode20": {"sampler": "ode", "steps": 20},
}

# Euler ODE on explicit σ grids (same initial noise as the samplers above)
GRIDS = {
    "ode10>20": [1.0, 0.9, 0.8] + [round(0.8 - 0.05 * i, 4) for i in range(1, 17)],
    "ode20>10": [1.0, 0.95, 0.9, 0.85, 0.8] + [round(0.8 - 0.1 * i, 4) for i in range(1, 9)],
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="base", help="comma-separated: base, run directories, checkpoints")
    ap.add_argument("--split", default="train", choices=["train", "test", "ood"])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated, of {', '.join([*SAMPLERS, *GRIDS])}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-seed", type=int, default=7)
    ap.add_argument("--cfgs", default="4.5", help="comma-separated CFG weights")
    ap.add_argument("--fm-loss", action="store_true", help="also measure the samples' distance from the training data")
    ap.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)

    from diffalign.evaluation.quick import verdict_stats
    from diffalign.evaluation.report import load_policy_for_eval
    from diffalign.runtime import keep_freed_memory
    from diffalign.sampling.rollout import RolloutConfig, rollout
    from diffalign.world.grammar import eval_prompts
    from diffalign.world.render import render_batch
    from diffalign.world.verify import verify_batch

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    prompts = eval_prompts(args.split, args.images, seed=args.prompt_seed)
    unknown = [s for s in args.samplers.split(",") if s not in SAMPLERS and s not in GRIDS]
    if unknown:
        raise SystemExit(f"error: unknown sampler(s) {', '.join(unknown)}; choose from {', '.join([*SAMPLERS, *GRIDS])}")
    results, grid_noise = [], None
    for target in args.targets.split(","):
        policy, name = load_policy_for_eval(None if target == "base" else target)
        policy.eval()
        if args.fm_loss and target == args.targets.split(",")[0]:
            x0 = policy.encode_images(render_batch(prompts, list(range(len(prompts))), policy.image_size))
            results.append({"target": "renders", "sampler": "renderer", "cfg": None,
                            **verdict_stats(prompts, verify_batch(policy.decode(x0), prompts)),
                            **sample_distance(policy, x0, prompts)})
        for guidance in (float(g) for g in args.cfgs.split(",")):
            for sampler in args.samplers.split(","):
                t0 = time.perf_counter()
                if sampler in GRIDS:
                    if grid_noise is None:  # the same for every target: drawn once
                        grid_noise = initial_noise_of_rollouts(policy, len(prompts))
                    x0, images = grid_sample(policy, prompts, GRIDS[sampler], guidance, noise=grid_noise)
                else:
                    cfg = RolloutConfig(guidance_scale=guidance, batch_size=128, **SAMPLERS[sampler])
                    with torch.no_grad():
                        traj = rollout(policy, prompts, torch.arange(len(prompts)), cfg,
                                       generator=torch.Generator().manual_seed(123))
                    x0, images = traj.latents[:, -1], traj.images
                st = verdict_stats(prompts, verify_batch(images, prompts))
                row = {"target": target, "sampler": sampler, "cfg": guidance,
                       "seconds": round(time.perf_counter() - t0, 1), **st}
                if args.fm_loss:
                    row |= sample_distance(policy, x0, prompts)
                results.append(row)
                print(f"{target} {sampler} cfg {guidance:g}: score {st['score']:.3f} partial {st['partial']:.3f}",
                      flush=True)
    tasks = [k for k in results[0] if k.startswith("score/")]
    fm = [f"fm_loss@{s:g}" for s in FM_SIGMAS] + ["out_of_range", "laplacian"] if args.fm_loss else []
    print("\n| target | sampler | CFG | score | partial | " + " | ".join([t[6:] for t in tasks] + fm) + " |")
    print("|---|---|---|---|---|" + "---|" * len(tasks + fm))
    for r in results:
        print(f"| {r['target']} | {r['sampler']} | {r['cfg'] if r['cfg'] is not None else '—'} | {r['score']:.3f} | "
              f"{r['partial']:.3f} | " + " | ".join(f"{r[t]:.2f}" for t in tasks) + "".join(f" | {r[k]:.3f}" for k in fm)
              + " |")
    out = {"split": args.split, "images": args.images, "fm_sigmas": list(FM_SIGMAS) if args.fm_loss else None,
           "results": results}
    return emit_json(out, args.json)


def initial_noise_of_rollouts(policy, n: int) -> torch.Tensor:
    """The initial noise ``rollout`` draws for ``n`` independent samples from the seed used above."""
    from diffalign.sampling.rollout import RolloutConfig, rollout

    with torch.no_grad():
        traj = rollout(policy, ["a red circle"] * n, torch.arange(n), RolloutConfig(sampler="ode", steps=1),
                       generator=torch.Generator().manual_seed(123))
    return traj.latents[:, 0]


@torch.no_grad()
def grid_sample(policy, prompts: list[str], sigmas: list[float], guidance: float, *, batch: int = 128,
                noise: torch.Tensor | None = None):
    """Euler ODE through the σ grid ``sigmas`` (from 1 to 0) from the rollouts' initial noise
    (``noise`` if given): ``(final latents, images)``."""
    from diffalign.sampling.steps import ode_step

    if sigmas[0] != 1.0 or sigmas[-1] != 0.0 or any(b >= a for a, b in itertools.pairwise(sigmas)):
        raise ValueError(f"a σ grid must fall strictly from 1 to 0; got {sigmas}")
    x_all = initial_noise_of_rollouts(policy, len(prompts)) if noise is None else noise
    lat, img = [], []
    for i in range(0, len(prompts), batch):
        x, cond = x_all[i:i + batch], policy.encode(prompts[i:i + batch])
        for s, s_next in itertools.pairwise(sigmas):
            v = policy.predict(x, torch.tensor(s), cond, guidance_scale=guidance).float()
            x = ode_step(x, v, s, s_next)
        lat.append(x)
        img.append(policy.decode(x).float())
    return torch.cat(lat), torch.cat(img)


@torch.no_grad()
def sample_distance(policy, x0: torch.Tensor, prompts: list[str], *, batch: int = 128) -> dict:
    """How far samples ``x0`` (latents in [−1, 1]) lie from the model's training data: the
    conditional flow-matching loss at each σ of ``FM_SIGMAS`` (fixed ε), the fraction of pixels
    beyond the data range by more than 0.02, and the median absolute Laplacian."""
    from diffalign.algorithms import flow_matching_error, forward_noising

    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    out = {}
    for sigma in FM_SIGMAS:
        losses = []
        for i in range(0, len(x0), batch):
            x_t, target = forward_noising(x0[i:i + batch], sigma, eps[i:i + batch])
            v = policy.predict(x_t, sigma, policy.encode(prompts[i:i + batch]))
            losses.append(flow_matching_error(v, target))
        out[f"fm_loss@{sigma:g}"] = float(torch.cat(losses).mean())
    out["out_of_range"] = float((x0.abs() > 1.02).float().mean())
    lap = 4 * x0[..., 1:-1, 1:-1] - x0[..., :-2, 1:-1] - x0[..., 2:, 1:-1] - x0[..., 1:-1, :-2] - x0[..., 1:-1, 2:]
    out["laplacian"] = float(lap.abs().median())
    return out


if __name__ == "__main__":
    main()
