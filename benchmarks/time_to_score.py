"""Training minutes and rollout images each run needs to reach a verifier score, confirmed on 512 images.

    python benchmarks/time_to_score.py runs/claims_fwd/crd-seed0 runs/claims_fwd/diffusion_nft_anchored-seed0 \
        --target 0.631 --gain 0.043 --base-from runs/claims_fwd --summary docs/results/claims.json --key crd/time_to_score

A run's periodic evaluation (``eval.every`` epochs, ``eval.num_images``, usually 64 images:
±0.06) is too noisy to say when a score was reached: a single lucky evaluation would count.
So the periodic curve only nominates checkpoints, and a 512-image evaluation of the test split
decides:

1. The periodic score is smoothed over ``--smooth`` evaluations (a trailing mean).
2. Candidates: the run's kept checkpoints (``ckpt_keep_every``) at or after the first periodic
   evaluation whose smoothed score is within ``--slack`` of the target, in order.
3. Each candidate (at most ``--max-evals`` per run and target) is evaluated with
   ``diffalign eval`` on ``--eval-images`` test images (``--images-per-prompt``, 20 steps, the
   run's own evaluation CFG), cached in ``<run>/eval_ckpt/step_N``. The first whose score
   reaches the target is the run's answer: its epoch, training minutes and rollout images.
   None reaching it: ``reached`` is null and the best confirmed score is reported.

Targets: ``--target S`` (an absolute verifier test score, e.g. Flow-GRPO's final one) and
``--gain G`` (the run's own base score plus G; the base at the run's evaluation CFG is read from
``<--base-from>/base-cfg<CFG>/eval.json``, written by ``convergence.py --base``). Each is
answered separately. The runs' final figures come from ``<run>/eval/eval.json`` (written by
``convergence.py``).

Trying several checkpoints in turn and keeping the first that passes favours passing a little
(each 512-image score is ±0.02): ``tried`` lists every confirmation made, so a reader sees
how many were needed. ``--summary PATH --key CLAIM`` writes the result into the claims JSON.
Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def periodic_curve(rows: list[dict], smooth: int) -> list[tuple[int, float]]:
    """(epoch, trailing mean of the last ``smooth`` periodic scores) for every periodic evaluation.

    A resumed run rewrites its steps; the last row of a step wins."""
    by_step = {int(r["step"]): float(r["eval/score"]) for r in rows if r.get("eval/score") is not None}
    steps = sorted(by_step)
    out = []
    for i, s in enumerate(steps):
        w = [by_step[t] for t in steps[max(0, i - smooth + 1) : i + 1]]
        out.append((s, sum(w) / len(w)))
    return out


def candidates(curve: list[tuple[int, float]], kept: list[int], target: float, slack: float) -> list[int]:
    """Kept checkpoints at or after the first smoothed periodic score ≥ ``target − slack``."""
    first = next((s for s, v in curve if v >= target - slack), None)
    return [] if first is None else [k for k in kept if k >= first]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run directories named <method>-seed<S>")
    ap.add_argument("--target", type=float, action="append", default=[], help="absolute verifier test score")
    ap.add_argument("--gain", type=float, action="append", default=[], help="score over the run's own base")
    ap.add_argument("--base-from", type=Path, default=None, help="directory holding base-cfg<G>/eval.json")
    ap.add_argument("--smooth", type=int, default=3, help="periodic evaluations in the trailing mean")
    ap.add_argument("--slack", type=float, default=0.03, help="nominate checkpoints from this far below the target")
    ap.add_argument("--max-evals", type=int, default=4, help="512-image confirmations per run and target")
    ap.add_argument("--eval-images", type=int, default=512)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--summary", default=None, help="claims JSON to update, e.g. docs/results/claims.json")
    ap.add_argument("--key", default=None, help="the claim's key in --summary")
    args = ap.parse_args(argv)
    if args.summary and not args.key:
        ap.error("--summary needs --key (the claim's name)")
    if not args.target and not args.gain:
        ap.error("give at least one --target or --gain")
    if args.gain and args.base_from is None:
        ap.error("--gain needs --base-from (the directory with base-cfg<G>/eval.json)")
    if args.smooth < 1 or args.max_evals < 1:
        ap.error("--smooth and --max-evals must be >= 1")

    import yaml
    from convergence import reusable_eval
    from matched_reward import figures, run_facts

    from diffalign.evaluation.report import evaluate
    from diffalign.training.rundir import list_checkpoints, read_metrics

    def base_score(guidance: float) -> float:
        f = args.base_from / f"base-cfg{guidance:g}" / "eval.json"
        if not f.is_file():
            raise SystemExit(f"error: no base evaluation at {f}; make it with convergence.py --base")
        ev = json.loads(f.read_text())
        if ev.get("num_images") != args.eval_images:
            raise SystemExit(f"error: {f} was made on {ev.get('num_images')} images, not {args.eval_images}")
        return float(ev["splits"]["test"]["score"])

    def confirm(run: Path, epoch: int, guidance: float) -> float:
        out = run / "eval_ckpt" / f"step_{epoch:07d}"
        settings = {"num_images": args.eval_images, "steps": args.eval_steps, "guidance_scale": guidance,
                    "images_per_prompt": args.images_per_prompt}
        ev = reusable_eval(out, settings, ("test",)) or evaluate(
            run / "checkpoints" / f"step_{epoch:07d}", out, num_images=args.eval_images, steps=args.eval_steps,
            guidance_scale=guidance, splits=("test",), images_per_prompt=args.images_per_prompt, use_proxy=False)
        return float(ev["splits"]["test"]["score"])

    methods: dict = {}
    for run in args.runs:
        if not re.fullmatch(r".+-seed\d+", run.name) or not (run / "metrics.jsonl").is_file():
            raise SystemExit(f"error: {run} is not a run directory named <method>-seed<S> with metrics.jsonl")
        method, seed = run.name.rsplit("-seed", 1)
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        guidance = float((cfg.get("eval") or {}).get("guidance_scale", 4.5))
        rows = read_metrics(run / "metrics.jsonl")
        curve = periodic_curve(rows, args.smooth)
        kept = list_checkpoints(run)
        targets = {f"score {t:g}": t for t in args.target}
        if args.gain:
            b = base_score(guidance)
            targets |= {f"base + {g:g}": b + g for g in args.gain}
        final_ev = run / "eval" / "eval.json"
        entry: dict = {"eval_guidance": guidance, "eval_images": args.eval_images,
                       "final": {**(figures(json.loads(final_ev.read_text())) if final_ev.is_file() else {}),
                                 **run_facts(cfg, rows, None)},
                       "targets": {}}
        for name, t in targets.items():
            tried, reached = [], None
            for epoch in candidates(curve, kept, t, args.slack)[: args.max_evals]:
                score = confirm(run, epoch, guidance)
                tried.append({"epoch": epoch, "score": score})
                if score >= t:
                    reached = {"epoch": epoch, "score": score, **run_facts(cfg, rows, epoch)}
                    break
            entry["targets"][name] = {"target": t, "reached": reached, "tried": tried,
                                      "best_confirmed": max((x["score"] for x in tried), default=None)}
        methods.setdefault(method, {})[seed] = entry

    result = {"smooth": args.smooth, "slack": args.slack, "max_evals": args.max_evals, "methods": methods}
    if args.summary:
        from _json_out import merge_summary

        merge_summary(args.summary, args.key, result)
    print(json.dumps(result, indent=2))
    print("\n| method | seed | target | reached at epoch | minutes | rollout images | confirmed score | tried |")
    print("|---|---|---|---|---|---|---|---|")
    for method, seeds in methods.items():
        for seed, e in seeds.items():
            for name, t in e["targets"].items():
                r = t["reached"]
                cells = ([str(r["epoch"]), f"{r['train_minutes']:.1f}", str(r["rollout_images"]), f"{r['score']:.3f}"]
                         if r else ["not reached", "—", "—",
                                    "—" if t["best_confirmed"] is None else f"best {t['best_confirmed']:.3f}"])
                print(f"| {method} | {seed} | {name} ({t['target']:.3f}) | " + " | ".join(cells)
                      + f" | {len(t['tried'])} |")
    return result


if __name__ == "__main__":
    main()
