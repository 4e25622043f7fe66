"""Runs' periodic evaluations side by side: one row per evaluated epoch, one column group per run.

    python benchmarks/periodic_curves.py flow_grpo=runs/study_claims_rft/flow_grpo-seed0 \
        crft=runs/diag20/consistent_rft_authors-seed0 --max-epoch 24 \
        --json docs/results/claims_round20/early_curves.json

Each run is ``NAME=RUN_DIR`` (or a bare run directory, named by its folder). Reads the
``eval/*`` figures the trainer logs with its periodic evaluation (``eval.every``; 128 images
by default, ±0.04 on the score) from ``metrics.jsonl``, and the mean training reward of the
epochs since the previous evaluation. Prints JSON and a markdown table; ``--json`` also writes
the JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _json_out import emit_json

FIGURES = {"score": "eval/score", "flat_noise": "eval/lowlevel/flat_noise",
           "high_level": "eval/high_level_hallucination", "missing": "eval/missing"}


def curves(run: Path, max_epoch: int | None = None) -> list[dict]:
    from diffalign.training.rundir import read_metrics

    rows, rewards = [], []
    for r in read_metrics(run / "metrics.jsonl"):
        if max_epoch is not None and r["step"] > max_epoch:
            break
        if "reward" in r:
            rewards.append(r["reward"])
        if "eval/score" in r:
            row = {"epoch": r["step"], **{k: r[v] for k, v in FIGURES.items() if v in r}}
            row["train_reward"] = sum(rewards) / len(rewards) if rewards else None
            rows.append(row)
            rewards = []
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR or RUN_DIR")
    ap.add_argument("--max-epoch", type=int, default=None, help="ignore epochs after this one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, _, path = spec.rpartition("=")
        path = Path(path)
        if not (path / "metrics.jsonl").is_file():
            ap.error(f"{path} has no metrics.jsonl: give a run directory (NAME=RUN_DIR)")
        runs[name or path.name] = {"run_dir": str(path), "curve": curves(path, args.max_epoch)}
    out = emit_json({"max_epoch": args.max_epoch, "runs": runs}, args.json)
    epochs = sorted({row["epoch"] for r in runs.values() for row in r["curve"]})
    names = list(runs)
    head = " | ".join(f"{n} score | {n} flat noise" for n in names)
    print(f"\n| epoch | {head} |", file=sys.stderr)
    print("|---|" + "---|" * (2 * len(names)), file=sys.stderr)
    for e in epochs:
        cells = []
        for n in names:
            row = next((x for x in runs[n]["curve"] if x["epoch"] == e), None)
            cells += ["—", "—"] if row is None else [f"{row['score']:.3f}", f"{row.get('flat_noise', float('nan')):.5f}"]
        print(f"| {e} | " + " | ".join(cells) + " |", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
