"""Curves of score vs rollout images and vs training minutes for ladder runs (a figure for docs).

Reads the JSON that ``best_of_n.py`` and ``fixed_prompts.py`` write with ``--json`` (each
evaluation row has ``rollout_images``, ``train_s`` and ``score``) and draws one line per file
in two panels, score vs rollout images and score vs training minutes:

    python benchmarks/plot_ladder.py docs/results/ladder_round10/bon_*.json --out docs/img/ladder_round10.png

A label per file comes from ``--labels a,b,...`` (default: the file names).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_curve(path: str | Path) -> tuple[list[float], list[float], list[float]]:
    """``(rollout images, training minutes, score)`` of a ladder run's evaluation rows."""
    rows = json.loads(Path(path).read_text())["evaluations"]
    missing = [k for k in ("rollout_images", "train_s", "score") if k not in rows[0]]
    if missing:
        raise SystemExit(f"{path}: evaluation rows lack {missing}; write it with best_of_n.py or fixed_prompts.py --json")
    return ([r["rollout_images"] for r in rows], [r["train_s"] / 60 for r in rows], [r["score"] for r in rows])


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files written by best_of_n.py / fixed_prompts.py --json")
    ap.add_argument("--labels", default=None, help="comma-separated, one per file")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(r).stem for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error(f"{len(labels)} labels for {len(args.runs)} files")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_images, by_minutes) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run, label in zip(args.runs, labels, strict=True):
        images, minutes, score = load_curve(run)
        by_images.plot(images, score, marker="o", label=label)
        by_minutes.plot(minutes, score, marker="o", label=label)
    by_images.set(xlabel="rollout images", ylabel="strict verifier score (fixed prompts)")
    by_minutes.set(xlabel="training minutes (2 cores)")
    for ax in (by_images, by_minutes):
        ax.grid(alpha=0.3)
    by_minutes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(out)
    return out


if __name__ == "__main__":
    main()
