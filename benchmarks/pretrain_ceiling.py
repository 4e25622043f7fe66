"""Is the test-score ceiling the fine-tuning's or the base model's? Continue the base's own pretraining.

Rung 0 of the RL-learning diagnosis, test target (docs/results.md, rounds 16–17). Round 16
trained the shipped policy's LoRA on 27,968 renders of the training prompts and the test
score did not move. That leaves two readings: the LoRA (r 32, constant lr, no EMA) cannot take
more from perfect data, or the base model has learnt all its architecture generalises from this
distribution. This benchmark is the complement: it continues the base's *own* pretraining —
every weight, flow matching on fresh renders of the training prompts, AdamW with grad clip 1,
EMA of the weights (full decay from the first step) — from the shipped weights
(``diffalign pretrain init_from=base``), and judges the EMA snapshots on task-balanced images of
each split with the standard evaluation (Euler ODE, 20 steps, CFG 4.5; the same prompts and
seeds as ``diffalign eval``). Step 0 is the shipped base.

The pretraining run in ``--out`` is resumed when it has a checkpoint (``--resume`` semantics of
``diffalign pretrain``), and each snapshot's evaluation is stored in ``OUT/evals/`` and reused,
so a stopped study continues where it stopped.

    python benchmarks/pretrain_ceiling.py --out runs/base_more --steps 1600 --eval-steps 0,800,1600 \\
        --images 512 --json docs/results/ladder_round17/pretrain_ceiling.json \\
        --summary docs/results/learning.json

Prints a line per evaluation and JSON (``--json`` writes it to a file too).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _json_out import emit_json, merge_summary
from best_of_n import evaluate_split


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="pretraining run directory (resumed when it has a checkpoint)")
    ap.add_argument("--steps", type=int, default=1600, help="pretraining steps after the base")
    ap.add_argument("--lr", type=float, default=8e-5, help="constant learning rate (the base's final one: 8e-5)")
    ap.add_argument("--seed", type=int, default=1, help="data seed (the base was trained with seed 0)")
    ap.add_argument("--eval-steps", default="0,800,1600", help="comma-separated steps whose EMA is judged (0: base)")
    ap.add_argument("--images", type=int, default=512, help="images per split")
    ap.add_argument("--splits", default="test,ood")
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="further PretrainConfig overrides (e.g. batch_size=64)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--summary", default=None, help="learning.json to merge the result into")
    ap.add_argument("--summary-key", default="ceiling_test_pretrain")
    args = ap.parse_args(argv)
    try:
        args.eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--eval-steps must be comma-separated integers, got {args.eval_steps!r}")
    if not args.eval_steps or args.eval_steps[0] < 0 or args.eval_steps[-1] > args.steps:
        ap.error(f"--eval-steps must lie in 0..--steps ({args.steps}), got {args.eval_steps}")
    bad = [s for s in args.eval_steps if s and s != args.steps and s % args.ckpt_every]
    if bad:
        ap.error(f"--eval-steps {bad} have no EMA snapshot: use multiples of --ckpt-every ({args.ckpt_every}) "
                 f"or the last step")
    return args


def _config(args):
    from diffalign.config import load_config
    from diffalign.training.pretrain import PretrainConfig

    over = [f"steps={args.steps}", f"lr={args.lr}", f"seed={args.seed}", "warmup=0", "min_lr_frac=1",
            f"ckpt_every={args.ckpt_every}", "sample_every=0", f"threads={args.threads}", *args.set]
    if not any(o.startswith("init_from=") for o in args.set):
        over.append("init_from=base")
    return load_config(PretrainConfig, None, over)


def _snapshot(out: Path, step: int, init_from: str) -> str | None:
    """The EMA weights of ``step`` (``None``: the shipped base, for step 0 from ``base``)."""
    from diffalign.training.pretrain import ema_snapshot_path

    if step == 0:
        return None if init_from == "base" else init_from
    return str(ema_snapshot_path(out, step))


def _elapsed(out: Path, step: int) -> float:
    """Training seconds to ``step``, as its EMA snapshot records them (0 for the start)."""
    from diffalign.models.checkpoint import read_metadata

    if step == 0:
        return 0.0
    return float(json.loads(read_metadata(_snapshot(out, step, ""))["info"])["elapsed_s"])


def evaluate_snapshot(path: str | None, splits: list[str], images: int) -> dict:
    """Verifier figures per split (overall and per task), the standard evaluation protocol."""
    from diffalign.models.tiny import TinyFlowPolicy

    policy = TinyFlowPolicy.from_checkpoint(path)
    return {split: evaluate_split(policy, split, images) for split in splits}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    import torch

    from diffalign.training.pretrain import ema_snapshot_path, pretrain

    torch.set_num_threads(args.threads)
    cfg = _config(args)
    out = Path(args.out)
    t0 = time.time()
    resume = (out / "checkpoint" / "state.json").exists()
    if not ema_snapshot_path(out, args.steps).exists():
        pretrain(cfg, out, resume=resume)
    train_s = time.time() - t0
    splits = [s for s in args.splits.split(",") if s]
    (out / "evals").mkdir(exist_ok=True)
    rows = []
    for step in args.eval_steps:
        cache = out / "evals" / f"step{step:06d}_{args.images}.json"
        if cache.exists():
            res = json.loads(cache.read_text())
        else:
            res = evaluate_snapshot(_snapshot(out, step, cfg.init_from), splits, args.images)
            cache.write_text(json.dumps(res, indent=2))
        row = {"step": step, "renders": step * cfg.batch_size, "train_s": _elapsed(out, step)} | {
            f"{s}/{k}": v for s in splits for k, v in res[s].items()}
        rows.append(row)
        print(f"step {step:5d} ({row['renders']:7d} renders, {row['train_s'] / 60:5.1f} min): "
              + "  ".join(f"{s} {res[s]['score']:.3f}" for s in splits), flush=True)
    first, last = rows[0], rows[-1]
    result = {
        "data": "renders of the training prompts (pretraining continued, all weights, EMA)",
        "init_from": cfg.init_from, "lr": cfg.lr, "lr_schedule": "constant", "batch_size": cfg.batch_size,
        "ema_decay": cfg.ema_decay, "seed": cfg.seed, "steps": args.steps, "threads": args.threads,
        "eval_images": args.images, "eval_cfg": 4.5, "eval_steps": 20, "splits": splits,
        "base": first[f"{splits[0]}/score"], "final": last[f"{splits[0]}/score"],
        "images": last["renders"], "train_minutes": last["train_s"] / 60,
        "this_call_s": train_s, "evaluations": rows,
        "curve": [[r["renders"], r["train_s"], r[f"{splits[0]}/score"]] for r in rows],
        "curve_columns": ["rollout_images", "train_s", "score"],
    }
    if args.summary:
        merge_summary(args.summary, args.summary_key, {k: v for k, v in result.items() if k != "evaluations"})
    return emit_json(result, args.json)


if __name__ == "__main__":
    main()
