"""Where along the noise levels did training change the model? ``‖v_θ − v_base‖`` per σ.

    python benchmarks/velocity_change.py runs/study_kl01cos/flow_grpo-seed0 --images 64 --grid 40

GRPO trains only the steps of its SDE window (σ = 1.0 and 0.9 for the shipped 10-step
recipe). A sampler with another step count visits other noise levels (20 steps: 1.0, 0.95,
0.9, 0.85, …). If the trained change lives only at the noise levels it was trained at, a
20-step sampler meets it at half of its early steps and keeps about half the gain. This
measures it directly: the base model's own Euler-ODE trajectories on a fine grid of ``--grid``
steps (CFG ``--cfg``, ``--images`` task-balanced prompts of ``--split``, one image each) give
states ``x_σ``; at every grid σ both models predict the guided velocity on the same states,
and the table lists the relative change ``mean_i ‖v_θ − v_base‖ / mean_i ‖v_base‖`` and the
cosine between the change and the base velocity, flagging the σ of the 10- and 20-step grids
and the trained window. Prints JSON and a table; ``--json PATH`` also writes the JSON.
"""

from __future__ import annotations

import argparse

import torch
from _json_out import emit_json


def _on_grid(sigma: float, steps: int) -> bool:
    return abs(sigma * steps - round(sigma * steps)) < 1e-4


def profile(policy, base, prompts: list[str], grid: int, cfg: float, seed: int, batch: int = 64) -> list[dict]:
    """Per grid step: σ, relative velocity change and its cosine with the base velocity."""
    from diffalign.sampling.generate import initial_noise
    from diffalign.sampling.steps import flow_sigmas, ode_step

    sigmas = flow_sigmas(grid)
    diff = torch.zeros(grid)
    ref = torch.zeros(grid)
    cos = torch.zeros(grid)
    shape = base.latent_shape(base.image_size, base.image_size)
    for i in range(0, len(prompts), batch):
        p = prompts[i : i + batch]
        x = initial_noise(shape, [seed + j for j in range(i, i + len(p))])
        cond_b, cond_p = base.encode(p), policy.encode(p)
        for k in range(grid):
            with torch.no_grad():
                vb = base.predict(x, sigmas[k], cond_b, guidance_scale=cfg).float()
                vp = policy.predict(x, sigmas[k], cond_p, guidance_scale=cfg).float()
            d = (vp - vb).flatten(1)
            diff[k] += d.norm(dim=1).sum()
            ref[k] += vb.flatten(1).norm(dim=1).sum()
            cos[k] += torch.nn.functional.cosine_similarity(d, vb.flatten(1), dim=1).sum()
            x = ode_step(x, vb, sigmas[k], sigmas[k + 1])
    n = len(prompts)
    return [{"step": k, "sigma": round(float(sigmas[k]), 4), "rel_change": float(diff[k] / ref[k]),
             "cos_with_base": float(cos[k] / n), "on_10": _on_grid(float(sigmas[k]), 10),
             "on_20": _on_grid(float(sigmas[k]), 20)} for k in range(grid)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run directory or checkpoint of the trained policy")
    ap.add_argument("--base", default=None, help="base checkpoint (default: the shipped base model)")
    ap.add_argument("--split", default="test", choices=["train", "test", "ood"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--grid", type=int, default=40, help="Euler steps of the base trajectories (a multiple of 20)")
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--trained", default="1.0,0.9", help="comma-separated σ of the trained SDE window (flagged)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if args.grid < 1 or args.images < 1:
        raise SystemExit("error: --grid and --images must be >= 1")

    from diffalign.evaluation.report import load_policy_for_eval
    from diffalign.world.grammar import eval_prompts

    torch.set_num_threads(args.threads)
    policy, name = load_policy_for_eval(args.run)
    base, base_name = load_policy_for_eval(args.base)
    policy.eval()
    base.eval()
    prompts = eval_prompts(args.split, args.images, seed=args.prompt_seed)
    rows = profile(policy, base, prompts, args.grid, args.cfg, args.seed)
    trained = [float(s) for s in args.trained.split(",") if s]
    for r in rows:
        r["trained"] = any(abs(r["sigma"] - s) < 1e-4 for s in trained)

    def mean_of(key):
        vals = [r["rel_change"] for r in rows if r[key]]
        return sum(vals) / len(vals) if vals else None

    early = [r for r in rows if r["sigma"] >= min(trained, default=1.0) - 0.1 + 1e-6]
    result = {"policy": name, "base": base_name, "split": args.split, "images": len(prompts), "grid": args.grid,
              "cfg": args.cfg, "trained_sigmas": trained, "rows": rows,
              "mean_rel_change": {"trained": mean_of("trained"),
                                  "untrained_early": (sum(r["rel_change"] for r in early if not r["trained"])
                                                      / max(1, sum(not r["trained"] for r in early))),
                                  "all": sum(r["rel_change"] for r in rows) / len(rows)}}
    emit_json(result, args.json)
    print("\n| σ | ‖Δv‖/‖v_base‖ | cos(Δv, v_base) | 10-step grid | 20-step grid | trained |\n|---|---|---|---|---|---|")
    for r in rows:
        flags = ["yes" if r[k] else "" for k in ("on_10", "on_20", "trained")]
        print(f"| {r['sigma']:.3f} | {r['rel_change']:.4f} | {r['cos_with_base']:+.3f} | " + " | ".join(flags) + " |")
    return result


if __name__ == "__main__":
    main()
