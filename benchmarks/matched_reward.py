"""Compare finished runs at matched training reward as well as at their final checkpoints.

    python benchmarks/matched_reward.py runs/claims/flow_grpo-seed0 runs/claims/consistent_rft-seed0 ... \
        --eval-images 512 --summary docs/results/claims.json --key consistent_rft/matched

Methods that climb their training reward at different speeds are not comparable at one
budget alone: the faster one may simply be further along (more over-optimised, more
hallucinating). This picks, in every run, the checkpoint whose training reward is nearest a
common value and evaluates it. The runs must keep earlier checkpoints
(``ckpt_keep_every``, e.g. ``--set ckpt_keep_every=10`` in ``benchmarks/convergence.py``).

- Training reward: the mean reward of the rollouts over the ``--window`` epochs ending at a
  checkpoint (``reward`` in ``metrics.jsonl``).
- The common value: ``--reward-value``, or the lowest of the runs' best smoothed rewards
  (the highest value every run reached).
- Each run's matched checkpoint is its kept checkpoint with the smoothed reward nearest that
  value; it is evaluated like the final one (``diffalign eval``: ``--eval-images`` per split,
  ``--images-per-prompt``, 20 steps) into ``<run>/eval_matched/step_<N>`` (one directory per
  checkpoint, so a later call with more runs, hence another common value, never reuses the
  evaluation of a different checkpoint). The final figures come from
  the run's ``eval/eval.json`` (written by ``convergence.py``), or are evaluated the same way.

A run is named by its directory, ``<method>-seed<S>``. ``--summary PATH --key CLAIM`` writes
``{CLAIM: {"matched_reward": v, "methods": {method: {seed: {final, matched, ...}}}}}`` into the
JSON at PATH (other keys kept), e.g. ``docs/results/claims.json``. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FIGURES = ("score", "partial", "high_level_hallucination", "hallucinated", "missing", "misattributed",
           "lowlevel/flat_noise", "lowlevel/laplacian_var", "lowlevel/highpass", "lowlevel/edge_spread",
           "diversity/pixel", "proxy/score")


def smoothed_reward(run: Path, window: int, rows: list[dict] | None = None) -> dict[int, float]:
    """Epoch → mean rollout reward over the ``window`` epochs ending there (``rows``: the run's
    metrics, read from its ``metrics.jsonl`` when not given)."""
    from diffalign.training.rundir import read_metrics

    rows = read_metrics(run / "metrics.jsonl") if rows is None else rows
    # a resumed run rewrites its steps: the last row of a step wins
    by_step = {int(r["step"]): float(r["reward"]) for r in rows if r.get("reward") is not None}
    steps = sorted(by_step)
    out = {}
    for i, s in enumerate(steps):
        w = [by_step[t] for t in steps[max(0, i - window + 1) : i + 1]]
        out[s] = sum(w) / len(w)  # metrics step N is epoch N (1-based), checkpoint step_N is saved after it
    return out


def pick_checkpoint(run: Path, curve: dict[int, float], value: float) -> tuple[int, float]:
    """(epoch, smoothed reward) of the run's kept checkpoint nearest ``value``."""
    from diffalign.training.rundir import list_checkpoints

    kept = [s for s in list_checkpoints(run) if s in curve]
    if not kept:
        raise SystemExit(f"error: {run} has no kept checkpoint with a logged reward; train it with ckpt_keep_every")
    best = min(kept, key=lambda s: (abs(curve[s] - value), s))
    return best, curve[best]


def figures(ev: dict) -> dict:
    out = {}
    for split, fig in ev["splits"].items():
        for k in FIGURES:
            if fig.get(k) is not None:
                out[f"{split}/{k}"] = fig[k]
    return out


def run_facts(cfg: dict, rows: list[dict], epoch: int | None) -> dict:
    """Training minutes and rollout images up to ``epoch`` (None: the whole run), from the run's
    config and metrics rows."""
    rows = [r for r in rows if r.get("train_time_s") is not None and (epoch is None or int(r["step"]) <= epoch)]
    epochs = len({int(r["step"]) for r in rows if r.get("reward") is not None})  # epochs that rolled out
    per_epoch = (cfg.get("prompts_per_epoch") or 0) * (cfg.get("group_size") or 0)
    return {"epochs": epochs, "train_minutes": round(float(rows[-1]["train_time_s"]) / 60, 2) if rows else 0.0,
            "rollout_images": epochs * per_epoch if per_epoch else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories named <method>-seed<S>")
    ap.add_argument("--reward-value", type=float, default=None, help="the common training reward (default: "
                    "the lowest of the runs' best smoothed rewards)")
    ap.add_argument("--window", type=int, default=10, help="epochs in the training-reward mean")
    ap.add_argument("--eval-images", type=int, default=512)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--summary", default=None, help="claims JSON to update, e.g. docs/results/claims.json")
    ap.add_argument("--key", default=None, help="the claim's key in --summary")
    args = ap.parse_args(argv)
    if args.summary and not args.key:
        ap.error("--summary needs --key (the claim's name)")
    if args.window < 1:
        ap.error("--window must be >= 1")

    import yaml
    from convergence import reusable_eval

    from diffalign.evaluation.report import evaluate
    from diffalign.training.rundir import read_metrics

    curves, metrics = {}, {}
    for run in args.runs:
        if not re.fullmatch(r".+-seed\d+", run.name) or not (run / "metrics.jsonl").is_file():
            raise SystemExit(f"error: {run} is not a run directory named <method>-seed<S> with metrics.jsonl")
        metrics[run] = read_metrics(run / "metrics.jsonl")
        curves[run] = smoothed_reward(run, args.window, metrics[run])
        if not curves[run]:
            raise SystemExit(f"error: {run} logged no training reward")
    value = args.reward_value if args.reward_value is not None else min(max(c.values()) for c in curves.values())
    settings = {"num_images": args.eval_images, "steps": args.eval_steps, "guidance_scale": args.guidance,
                "images_per_prompt": args.images_per_prompt}

    def evaluated(target: Path, out: Path) -> dict:
        return reusable_eval(out, settings) or evaluate(
            target, out, num_images=args.eval_images, steps=args.eval_steps, guidance_scale=args.guidance,
            images_per_prompt=args.images_per_prompt)

    methods: dict = {}
    for run in args.runs:
        method, seed = run.name.rsplit("-seed", 1)
        epoch, reward = pick_checkpoint(run, curves[run], value)
        final_epoch = max(curves[run])
        ckpt = run / "checkpoints" / f"step_{epoch:07d}"
        matched_dir = run / "eval" if epoch == final_epoch else run / "eval_matched" / f"step_{epoch:07d}"
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        methods.setdefault(method, {})[seed] = {
            "final": {**figures(evaluated(run, run / "eval")), **run_facts(cfg, metrics[run], None),
                      "train_reward": curves[run][final_epoch], "epoch": final_epoch},
            "matched": {**figures(evaluated(ckpt, matched_dir)), **run_facts(cfg, metrics[run], epoch),
                        "train_reward": reward, "epoch": epoch},
            "eval_images": args.eval_images}
    result = {"matched_reward": value, "window": args.window, "methods": methods}
    if args.summary:
        from _json_out import merge_summary

        merge_summary(args.summary, args.key, result)
    print(json.dumps(result, indent=2))
    print("\n| method | seed | at | epoch | train reward | test | OOD | high-level halluc. | flat noise | diversity |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, seeds in methods.items():
        for seed, r in seeds.items():
            for at in ("final", "matched"):
                f = r[at]
                cells = [f.get(k) for k in ("test/score", "ood/score", "test/high_level_hallucination",
                                            "test/lowlevel/flat_noise", "test/diversity/pixel")]
                print(f"| {method} | {seed} | {at} | {f['epoch']} | {f['train_reward']:.3f} | "
                      + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    return result


if __name__ == "__main__":
    main()
