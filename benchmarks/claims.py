"""The seed-claims study's figures per claim, method and seed, written to ``docs/results/claims.json``.

    python benchmarks/claims.py runs/study_claims_rft/*-seed* --base runs/study_claims_rft/base-cfg4.5 \
        --key consistent_rft --summary docs/results/claims.json

For every finished run directory ``<method>-seed<S>`` (``summary.json`` and the 512-image
``eval/eval.json`` that ``benchmarks/convergence.py`` writes) it records:

- the final evaluation per split (``test/score``, ``ood/score``, ``test/proxy/score``, the
  hallucination, low-level and diversity figures; see ``matched_reward.FIGURES``),
- the budget: training minutes, epochs (RL) or updates (preference), the **rollout images** the
  run generated while training (RL rollouts; SePPO's reference samples) and the **dataset
  images** it read (preference pairs: winners, and losers for Diffusion-DPO),
- the evaluation's image count per split and its CFG.

``--base DIR`` adds the base model's evaluation (``base-cfg<G>/eval.json``) at the same settings.
Per method it also writes the mean, min and max over seeds of the headline figures. The entry is
written as ``KEY/final``, ``KEY/aggregate`` and ``KEY/base`` (other keys kept), so
``matched_reward.py --key KEY/matched`` and ``time_to_score.py --key KEY/time_to_score`` fill
the same claim. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HEADLINE = ("test/score", "ood/score", "test/proxy/score", "test/high_level_hallucination",
            "test/lowlevel/flat_noise", "test/lowlevel/laplacian_var", "test/diversity/pixel",
            "train_minutes", "rollout_images", "dataset_images")
PREFERENCE = ("diffusion_dpo", "sft", "seppo")


def budget(cfg: dict, rows: list[dict], summary: dict) -> dict:
    """Training minutes, epochs or updates, rollout images and dataset images of a finished run."""
    from matched_reward import run_facts

    algorithm = cfg.get("algorithm")
    if algorithm not in PREFERENCE:
        facts = run_facts(cfg, rows, None)
        return {**facts, "dataset_images": 0}
    updates = int(summary.get("updates") or 0)
    pairs = updates * int(cfg.get("batch_size") or 0) * int(cfg.get("grad_accum") or 1)
    seppo_reads_losers = algorithm == "seppo" and bool((cfg.get("seppo") or {}).get("dataset_losers"))
    per_pair = 2 if algorithm == "diffusion_dpo" or seppo_reads_losers else 1
    return {"updates": updates, "train_minutes": round(float(summary.get("train_time_s") or 0.0) / 60, 2),
            "rollout_images": pairs if algorithm == "seppo" and not seppo_reads_losers else 0,
            "dataset_images": pairs * per_pair}


def eval_entry(ev: dict) -> dict:
    """An evaluation's figures per split, its image count per split and its CFG."""
    from matched_reward import figures

    return {**figures(ev), "eval_images": ev["num_images"], "eval_guidance": ev["guidance_scale"]}


def run_entry(run: Path) -> dict:
    """One finished run's final figures, budget and evaluation settings."""
    import yaml

    from diffalign.training.rundir import read_metrics

    ev_path = run / "eval" / "eval.json"
    if not (run / "summary.json").is_file() or not ev_path.is_file():
        raise SystemExit(f"error: {run} is not finished: it needs summary.json and eval/eval.json "
                         "(run it with benchmarks/convergence.py, which evaluates it)")
    ev = json.loads(ev_path.read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    summary = json.loads((run / "summary.json").read_text())
    rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    return {**eval_entry(ev), **budget(cfg, rows, summary), "eval_splits": sorted(ev["splits"])}


def aggregate(seeds: dict[str, dict]) -> dict:
    """Mean, min and max over seeds of every headline figure the runs have."""
    out = {}
    for k in HEADLINE:
        vals = [float(e[k]) for e in seeds.values() if e.get(k) is not None]
        if vals:
            out[k] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def table(final: dict, agg: dict, base: dict | None) -> str:
    cols = ("test/score", "ood/score", "test/proxy/score", "test/high_level_hallucination",
            "test/lowlevel/flat_noise", "test/diversity/pixel")
    lines = ["| method | seeds | test | OOD | proxy | high-level halluc. | flat noise | diversity | minutes "
             "| rollout images | dataset images |", "|" + "---|" * 11]

    def cell(a: dict | None, digits: int = 3) -> str:
        if not a:
            return "—"
        if a["n"] == 1:
            return f"{a['mean']:.{digits}f}"
        return f"{a['mean']:.{digits}f} [{a['min']:.{digits}f}, {a['max']:.{digits}f}]"

    if base:
        lines.append("| base | — | " + " | ".join(
            "—" if base.get(k) is None else f"{base[k]:.{5 if 'noise' in k else 3}f}" for k in cols)
            + " | — | — | — |")
    for method, a in agg.items():
        seeds = ",".join(sorted(final[method], key=int))
        lines.append(f"| {method} | {seeds} | " + " | ".join(cell(a.get(k), 5 if "noise" in k else 3) for k in cols)
                     + f" | {cell(a.get('train_minutes'), 1)} | {cell(a.get('rollout_images'), 0)} "
                     f"| {cell(a.get('dataset_images'), 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories named <method>-seed<S>")
    ap.add_argument("--base", type=Path, default=None, help="the base model's evaluation directory (base-cfg<G>)")
    ap.add_argument("--key", required=True, help="the claim's key in claims.json, e.g. consistent_rft")
    ap.add_argument("--summary", default=None, help="claims JSON to update, e.g. docs/results/claims.json")
    args = ap.parse_args(argv)

    final: dict = {}
    for run in args.runs:
        if not re.fullmatch(r".+-seed\d+", run.name):
            raise SystemExit(f"error: {run} is not a run directory named <method>-seed<S>")
        method, seed = run.name.rsplit("-seed", 1)
        final.setdefault(method, {})[seed] = run_entry(run)
    base = None
    if args.base is not None:
        ev_path = args.base / "eval.json"
        if not ev_path.is_file():
            raise SystemExit(f"error: no base evaluation at {ev_path} (benchmarks/convergence.py --base writes it)")
        base = eval_entry(json.loads(ev_path.read_text()))
    agg = {m: aggregate(s) for m, s in final.items()}
    result = {"final": final, "aggregate": agg, "base": base}
    if args.summary:
        from _json_out import merge_summary

        for part, value in result.items():
            merge_summary(args.summary, f"{args.key}/{part}", value)
    print(json.dumps(result, indent=2))
    print()
    print(table(final, agg, base))
    return result


if __name__ == "__main__":
    main()
