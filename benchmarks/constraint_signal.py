"""Which of the verifier's constraints does a GRPO group's reward vary on, per task type?

Issue 21's located rung: the shipped Flow-GRPO raises single objects, two objects and counting
but not position or colour binding. This samples groups exactly as training does (the preset's
rollout: its sampler, SDE window, shared initial noise, CFG) for training prompts of each task
type, judges every image constraint by constraint, and reports per task type:

- ``score`` / ``partial``: strict pass rate and mean fraction of constraints held;
- ``strict_groups``: fraction of groups whose strict verdicts are not all equal (the groups that
  carry any signal about passing);
- ``std_reward``: mean within-group std of the preset's training reward;
- ``align_strict``: pooled within-group correlation between the GRPO advantage of the training
  reward and the strict verdict (1 when the reward is the strict verdict; how much of the
  push goes towards images that pass);
- ``vary/<constraint>`` and ``align/<constraint>``: the same two figures for each constraint kind
  (``object``, ``no_extra``, ``relation``): how often a group disagrees on it and how much the
  advantage pushes towards holding it;
- ``relation_given_objects``: for position, how often the relation holds when both objects are
  matched exactly (0.5 would be a coin flip).

    python benchmarks/constraint_signal.py --groups 24                     # base model, shipped rollout
    python benchmarks/constraint_signal.py --groups 24 --set rollout.init_noise=independent
    python benchmarks/constraint_signal.py --policy runs/x/flow_grpo-seed0  # a trained run's weights

Prints a table and JSON; ``--json`` writes the JSON to a file too.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _json_out import emit_json

KINDS = ("object", "no_extra", "relation")


def _kind(name: str) -> str:
    return "object" if name.startswith("object") else name.split(":")[0]


def _pooled_corr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Correlation of within-group deviations, pooled over groups (rows); None when ``b`` never varies."""
    da, db = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((da ** 2).sum() * (db ** 2).sum())
    return None if den == 0 else float((da * db).sum() / den)


def task_signal(rewards: np.ndarray, verdicts: list, group_size: int) -> dict:
    """The figures above for one task type's groups; ``rewards`` and ``verdicts`` are group-contiguous."""
    r = rewards.reshape(-1, group_size)
    strict = np.array([v.score for v in verdicts]).reshape(-1, group_size)
    partial = np.array([v.partial for v in verdicts]).reshape(-1, group_size)
    std = r.std(1, keepdims=True)
    adv = (r - r.mean(1, keepdims=True)) / (std + 1e-4)  # GRPO's group-normalised advantage
    out = {"groups": int(r.shape[0]), "score": float(strict.mean()), "partial": float(partial.mean()),
           "strict_groups": float((strict.max(1) != strict.min(1)).mean()),
           "std_reward": float(std.mean()), "align_strict": _pooled_corr(adv, strict)}
    for kind in KINDS:
        if not any(_kind(k) == kind for k in verdicts[0].constraints):  # a task type's prompts share their kinds
            continue
        # a kind holds in an image when every constraint of that kind holds there
        h = np.array([all(ok for k, ok in v.constraints.items() if _kind(k) == kind) for v in verdicts],
                     float).reshape(-1, group_size)
        out[f"held/{kind}"] = float(h.mean())
        out[f"vary/{kind}"] = float((h.max(1) != h.min(1)).mean())
        out[f"align/{kind}"] = _pooled_corr(adv, h)
    rel = [ok for v in verdicts for k, ok in v.constraints.items() if k.startswith("relation")
           and all(o for kk, o in v.constraints.items() if kk.startswith("object"))]
    if rel:
        out["relation_given_objects"] = float(np.mean(rel))
        out["images_with_both_objects"] = len(rel)
    return out


def constraint_signal(policy, rollout_cfg, reward, *, tasks: list[str], groups: int, group_size: int,
                      seed: int = 0, prompt_split: str = "train") -> dict[str, dict]:
    """Per task type: :func:`task_signal` over ``groups`` groups of ``group_size`` rollouts of
    training prompts (one prompt per group, drawn with ``seed``)."""
    from diffalign.sampling.rollout import rollout
    from diffalign.world.grammar import prompt_splits
    from diffalign.world.verify import verify_batch

    split = prompt_splits()[prompt_split]
    rng = np.random.default_rng(seed)
    per_call = max(1, rollout_cfg.batch_size // group_size)
    out = {}
    for t_i, task in enumerate(tasks):
        pool = split[task]
        chosen = [pool[rng.integers(len(pool))] for _ in range(groups)]
        rewards, verdicts = [], []
        for c0 in range(0, groups, per_call):
            gp = chosen[c0:c0 + per_call]
            batch = [p for p in gp for _ in range(group_size)]
            gids = torch.arange(len(gp)).repeat_interleave(group_size)
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, t_i, c0]).generate_state(1)[0]))
            with torch.no_grad():
                traj = rollout(policy, batch, gids, rollout_cfg, generator=gen)
            verdicts += verify_batch(traj.images, batch)
            rewards.append(reward(traj.images, batch, [{} for _ in batch]).scores.float().numpy())
        out[task] = task_signal(np.concatenate(rewards), verdicts, group_size)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flow_grpo")
    ap.add_argument("--policy", default=None, help="a run directory or checkpoint to measure (default: the base)")
    ap.add_argument("--tasks", default="single_object,colors,two_object,counting,position,color_attr")
    ap.add_argument("--groups", type=int, default=24, help="groups per task type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)

    from diffalign.cli import resolve_preset
    from diffalign.config import load_config
    from diffalign.errors import ConfigError
    from diffalign.evaluation.report import load_policy_for_eval
    from diffalign.rewards import build_reward
    from diffalign.runtime import keep_freed_memory
    from diffalign.training.trainer import TrainConfig
    from diffalign.world.grammar import TASKS

    tasks = args.tasks.split(",")
    bad = [t for t in tasks if t not in TASKS]
    if bad or args.groups < 1:
        raise ConfigError(f"--tasks: unknown task type(s) {bad}; choose from {', '.join(TASKS)}" if bad
                          else "--groups must be at least 1")
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, resolve_preset(args.preset), args.set)
    policy, label = load_policy_for_eval(args.policy)
    policy.eval()
    reward = build_reward(cfg.reward, **cfg.reward_kwargs)
    t0 = time.perf_counter()
    res = constraint_signal(policy, cfg.rollout, reward, tasks=tasks, groups=args.groups,
                            group_size=cfg.group_size, seed=args.seed, prompt_split=cfg.prompt_split)
    cols = ["score", "partial", "strict_groups", "std_reward", "align_strict", "align/object", "align/no_extra",
            "align/relation", "relation_given_objects"]
    print(f"{'task':>14} " + " ".join(f"{c.split('/')[-1][:13]:>13}" for c in cols))
    for task, r in res.items():
        cells = ["—" if r.get(c) is None else f"{r[c]:.3f}" for c in cols]
        print(f"{task:>14} " + " ".join(f"{c:>13}" for c in cells))
    out = {"preset": args.preset, "policy": label, "overrides": args.set, "reward": reward.name,
           "group_size": cfg.group_size, "groups_per_task": args.groups, "init_noise": cfg.rollout.init_noise,
           "sde_window": cfg.rollout.sde_window, "images": len(tasks) * args.groups * cfg.group_size,
           "seconds": round(time.perf_counter() - t0, 1), "tasks": res}
    return emit_json(out, args.json)


if __name__ == "__main__":
    main()
