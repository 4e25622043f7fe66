"""CPGO scale: how large the CPGO gradient is next to the GRPO policy gradient and the KL term.

ConsistentRFT adds ``λ·‖x̂0_θ(x_k) − sg(x̂0_old(x_{k+1}))‖₂`` to the GRPO loss (ALGORITHMS.md §2).
Whether a given λ matters depends on the size of that term's gradient relative to the policy
gradient, which differs between models and step schedules. This script draws one epoch of
rollouts with a ShapesWorld preset, scores them, and measures, for each trainable step k of the
SDE window, the gradient norm (over the trainable parameters) of

- the PPO-clip policy loss (first inner step, ratio 1),
- the KL term ``β_KL·KL`` of the preset,
- the CPGO term at λ = 1 (applied to every sample: gate and probability off),

and the CPGO distance itself. λ that puts the CPGO gradient at a fraction f of the policy
gradient is ``f·|∇policy| / |∇CPGO(λ=1)|``. The distance is the preset's ``cpgo.distance``.

It also measures the CPGO term at λ = 1 at every step of the trajectory (``all_steps``, ODE steps
included: where ``cpgo.steps: gated`` applies it), against the mean policy gradient over the SDE
steps, and reads the preset's λ (with its probability) as a fraction of that gradient.

    python benchmarks/cpgo_scale.py --preset consistent_rft --prompts 4 --set reward=shapes_score --set reward_kwargs={}

Prints JSON (all figures) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="consistent_rft", help="a GRPO-family preset in configs/shapes")
    ap.add_argument("--prompts", type=int, default=4, help="prompt groups in the measured rollout")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from diffalign.algorithms.consistent_rft import cpgo_loss
    from diffalign.algorithms.flow_grpo import _kl
    from diffalign.algorithms.grpo import ppo_clip_loss
    from diffalign.config import load_config
    from diffalign.sampling.rollout import predict_x0, recompute_step
    from diffalign.training.trainer import TrainConfig, Trainer, epoch_generator, sample_prompts_with_tasks

    cfg = load_config(TrainConfig, f"configs/shapes/{args.preset}.yaml",
                      [f"prompts_per_epoch={args.prompts}", f"seed={args.seed}", "eval.every=0", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        gen = epoch_generator(cfg.seed, 0)
        prompts, group_ids, _ = sample_prompts_with_tasks(cfg, 0, None)
        trainer.policy.eval()
        shared = trainer.algo.shared_groups(0, cfg.prompts_per_epoch, gen)
        traj, rewards, _ = trainer.sample_and_score(prompts, group_ids, gen, shared)
        adv, _ = trainer.algo.advantages(rewards, group_ids, prompts)
        policy = trainer.policy
        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        idx = torch.arange(len(traj))
        cond = policy.encode(traj.prompts)
        rows = []
        for k_int in traj.sde_mask.nonzero().flatten().tolist():
            k = torch.full((len(idx),), k_int)
            step, _, x0 = recompute_step(policy, traj, idx, k, cond=cond)
            pol, _ = ppo_clip_loss(step.log_prob, traj.log_probs[idx, k], adv, cfg.grpo.clip_range)
            with torch.no_grad(), policy.reference():
                ref_step, _, _ = recompute_step(policy, traj, idx, k, cond=cond)
            kl = cfg.grpo.beta_kl * _kl(step, ref_step, traj, k).mean()
            target = traj.next_x0_pred()[idx, k]
            cp, m = cpgo_loss(x0, target, 1.0, cfg.cpgo.distance)
            g_pol, g_kl, g_cp = grad_norm(pol, params), grad_norm(kl, params), grad_norm(cp, params)
            rows.append({"k": k_int, "sigma": float(traj.sigmas[k_int]), "grad_policy": g_pol, "grad_kl": g_kl,
                         "grad_cpgo_lambda1": g_cp, "cpgo_dist": float(m["cpgo_dist"]),
                         "lambda_for_10pct": 0.1 * g_pol / g_cp, "lambda_for_30pct": 0.3 * g_pol / g_cp})
        mean_pol = sum(r["grad_policy"] for r in rows) / len(rows)
        all_steps = []
        for k_int in range(traj.num_steps):
            k = torch.full((len(idx),), k_int)
            x0 = predict_x0(policy, traj, idx, k, cond=cond)
            cp, m = cpgo_loss(x0, traj.next_x0_pred()[idx, k], 1.0, cfg.cpgo.distance)
            g_cp = grad_norm(cp, params)
            all_steps.append({"k": k_int, "sigma": float(traj.sigmas[k_int]), "sde": bool(traj.sde_mask[k_int]),
                              "grad_cpgo_lambda1": g_cp, "cpgo_dist": float(m["cpgo_dist"]),
                              "preset_lambda_vs_policy": cfg.cpgo.weight * cfg.cpgo.prob * g_cp / mean_pol})
    out = {"preset": args.preset, "overrides": args.overrides, "images": len(traj),
           "reward_mean": float(rewards.mean()), "distance": cfg.cpgo.distance, "cpgo_weight": cfg.cpgo.weight,
           "cpgo_prob": cfg.cpgo.prob, "mean_grad_policy": mean_pol, "steps": rows, "all_steps": all_steps}
    print(json.dumps(out, indent=1))
    print("\n| k | σ_k | ‖∇ policy‖ | ‖∇ β_KL·KL‖ | ‖∇ CPGO(λ=1)‖ | CPGO dist | λ for 10 % | λ for 30 % |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['k']} | {r['sigma']:.3f} | {r['grad_policy']:.3g} | {r['grad_kl']:.3g} | {r['grad_cpgo_lambda1']:.3g} "
              f"| {r['cpgo_dist']:.3g} | {r['lambda_for_10pct']:.3g} | {r['lambda_for_30pct']:.3g} |", file=sys.stderr)
    print(f"\nEvery step, distance {cfg.cpgo.distance}; preset λ·p = {cfg.cpgo.weight}·{cfg.cpgo.prob} vs the mean "
          f"policy gradient {mean_pol:.3g}:\n", file=sys.stderr)
    print("| k | σ_k | SDE | ‖∇ CPGO(λ=1)‖ | CPGO dist | λ·p·‖∇ CPGO‖ / ‖∇ policy‖ |", file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for r in all_steps:
        print(f"| {r['k']} | {r['sigma']:.2f} | {'yes' if r['sde'] else 'no'} | {r['grad_cpgo_lambda1']:.3g} | "
              f"{r['cpgo_dist']:.3g} | {r['preset_lambda_vs_policy']:.3g} |", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
