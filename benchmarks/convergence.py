"""Convergence: every ShapesWorld preset for a fixed training budget and seeds, one table.

    python benchmarks/convergence.py --minutes 15 --seeds 0,1,2 --out runs/convergence
    python benchmarks/convergence.py --presets flow_grpo,crd --minutes 15 --seeds 0 --eval-images 512

For each preset in ``configs/shapes`` (or ``--presets``) and each seed, runs
``diffalign train PRESET --out OUT/<preset>-seed<S> seed=S max_train_minutes=M`` (plus any
``--set key=value`` overrides) in a subprocess, then ``diffalign eval`` on the trained
weights (test and out-of-domain prompts, ``--eval-images`` per split, ``--images-per-prompt``
per prompt for diversity). A run that fails (e.g. a preference preset without its dataset)
is reported with its error and the benchmark goes on.

Table (mean over seeds; ``[min, max]`` when seeds differ): final verifier score on test and
out-of-domain prompts, steps and training minutes until the run's periodic evaluation
first reached the target (``--target`` absolute, or ``--target-gain`` above the run's own
step-0 score), high-level hallucination (hallucinated + mis-attributed objects per test
image), low-level hallucination (flat-region noise), diversity within a prompt (pixel) and
the proxy-vs-verifier gap (mean ShapesScore − verifier score on the test images).

The final evaluation samples with each run's own ``eval.guidance_scale`` (CFG-free presets
such as ``crd`` are used without CFG) unless ``--eval-guidance`` fixes one for all; the table
has a column for it, and ``--base`` adds a row for the shipped base model (or ``--set
model=...``) at every guidance the runs used, so each method has its own starting point.

``--reuse`` keeps any run whose training finished and whose ``eval/eval.json`` was made with
the same evaluation settings, so an interrupted benchmark continues where it stopped and
presets can be split across processes (``--set threads=1``) and gathered by one last call
with every preset and ``--reuse``. ``--gather`` is that last call made safe: it never starts
training (a preset/seed without a finished run is listed as "not run"), and with
``--runs-from DIR`` (repeatable) it also looks for ``<preset>-seed<S>`` and ``base-cfg<G>`` in
other benchmark directories, so one table can collect runs made with different budgets (the
table's "steps", "train min" and "train reward" columns tell them apart).

Prints JSON and a markdown table; writes ``OUT/convergence.json``, ``OUT/convergence.md``
and a ``diffalign compare`` report of all runs in ``OUT/compare/``. ``--summary
docs/results/learning.json`` (with ``--base``) also records, per preset, the base and every
seed's final test score under ``<preset>_test`` in that summary file (other entries are kept).

The standard comparison (60 training minutes per run, 3 seeds, 512 images per split), resumable
with ``--reuse`` after an interruption:

    nohup python benchmarks/convergence.py --presets flow_grpo,dance_grpo,diffusion_nft --seeds 0,1,2 \
        --minutes 60 --eval-images 512 --base --reuse --out runs/study \
        --summary docs/results/learning.json > runs/study.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "configs" / "shapes"


def run_preset(preset: str, seed: int, out: Path, minutes: float, overrides: list[str], timeout: float | None) -> dict:
    """Train one preset/seed in a subprocess; returns {"ok", "seconds", "error"}. A run directory
    that already holds a checkpoint (an interrupted study) is resumed, not restarted."""
    from diffalign.training.rundir import list_checkpoints

    if (out / "config.yaml").is_file() and list_checkpoints(out):
        cmd = [sys.executable, "-m", "diffalign.cli", "train", "--resume", str(out)]
    else:
        cmd = [sys.executable, "-m", "diffalign.cli", "train", preset, "--out", str(out), f"seed={seed}",
               f"max_train_minutes={minutes}", *overrides]
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"timed out after {timeout} s",
                "command": " ".join(cmd)}
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    err = None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        err = lines[-1] if lines else f"exit status {proc.returncode}"
    return {"ok": proc.returncode == 0, "seconds": time.perf_counter() - t0, "error": err, "command": " ".join(cmd)}


def _run_config(run_dir: Path) -> dict | None:
    """A run's saved ``config.yaml`` as a dict (None if it has none)."""
    import yaml

    f = run_dir / "config.yaml"
    return (yaml.safe_load(f.read_text()) or {}) if f.is_file() else None


def run_guidance(run_dir: Path, fixed: float | None) -> float:
    """CFG weight of a run's final evaluation: ``fixed`` or the run's own ``eval.guidance_scale``."""
    if fixed is not None:
        return fixed
    cfg = _run_config(run_dir) or {}
    return float((cfg.get("eval") or {}).get("guidance_scale", 4.5))


def reusable_eval(eval_dir: Path, settings: dict, splits: tuple[str, ...] = ("test", "ood")) -> dict | None:
    """The eval.json in ``eval_dir`` if it was made with ``settings`` (num_images, steps, ...) and
    holds every split in ``splits``."""
    f = eval_dir / "eval.json"
    if not f.is_file():
        return None
    ev = json.loads(f.read_text())
    same = all(ev.get(k) == v for k, v in settings.items()) and all(s in ev.get("splits", {}) for s in splits)
    return ev if same else None


def first_reaching(rows: list[dict], target: float) -> tuple[float | None, float | None]:
    """(step, training minutes) of the first periodic evaluation with score ≥ target."""
    for r in rows:
        if r.get("eval/score") is not None and r["eval/score"] >= target:
            return float(r["step"]), float(r.get("train_time_s", 0.0)) / 60.0
    return None, None


def run_figures(run_dir: Path, ev: dict | None, target: float | None, target_gain: float | None) -> dict:
    from diffalign.training.rundir import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if r.get("eval/score") is not None]
    fig: dict = {"train_reward": _train_reward(run_dir), "steps": float(rows[-1]["step"]) if rows else None,
                 "train_minutes": float(rows[-1].get("train_time_s", 0.0)) / 60.0 if rows else None,
                 "start_eval_score": evals[0]["eval/score"] if evals else None,
                 "final_eval_score": evals[-1]["eval/score"] if evals else None}
    tgt = target if target is not None else (
        evals[0]["eval/score"] + target_gain if evals and target_gain is not None else None)
    fig["target"] = tgt
    fig["steps_to_target"], fig["minutes_to_target"] = first_reaching(rows, tgt) if tgt is not None else (None, None)
    if ev:
        fig |= eval_figures(ev)
    return fig


def _train_reward(run_dir: Path) -> str | None:
    """The training reward in a run's resolved config (e.g. ``shapes_verifier``, ``shapes_score``), or
    ``pairs: NAME`` for a preference preset trained on the pair dataset NAME."""
    cfg = _run_config(run_dir)
    if cfg is None:
        return None
    r = cfg.get("reward")
    if r is None and cfg.get("data"):  # preference presets learn from a pair dataset, not a reward
        return f"pairs: {Path(str(cfg['data'])).name}"
    return r if isinstance(r, str) else (json.dumps(r) if r is not None else None)


def eval_figures(ev: dict) -> dict:
    """The table's figures from one ``eval.json`` (test and out-of-domain splits)."""
    t, o = ev["splits"].get("test", {}), ev["splits"].get("ood", {})
    return {"test_score": t.get("score"), "ood_score": o.get("score"),
            "high_level_hallucination": t.get("high_level_hallucination"),
            "flat_noise": t.get("lowlevel/flat_noise"), "diversity": t.get("diversity/pixel"),
            "proxy_score": t.get("proxy/score"), "proxy_gap": t.get("proxy/gap"),
            "eval_guidance": ev.get("guidance_scale"), "test_partial": t.get("partial"),
            "ood_high_level_hallucination": o.get("high_level_hallucination"),
            "hallucinated": t.get("hallucinated"), "missing": t.get("missing"), "misattributed": t.get("misattributed"),
            **{f"lowlevel_{m}": t.get(f"lowlevel/{m}") for m in LOWLEVEL},
            **{f"renderer_{m}": t.get(f"renderer_lowlevel/{m}") for m in LOWLEVEL}}


LOWLEVEL = ("laplacian_var", "highpass", "edge_spread", "flat_noise")


COLUMNS = [("train_reward", "train reward"), ("steps", "steps"), ("train_minutes", "train min"),
           ("eval_guidance", "eval CFG"), ("test_score", "verifier test"), ("ood_score", "verifier ood"), ("steps_to_target", "steps to target"),
           ("minutes_to_target", "min to target"), ("high_level_hallucination", "high-level halluc. / img"),
           ("flat_noise", "flat-region noise"), ("diversity", "diversity"), ("proxy_score", "proxy (ShapesScore)"),
           ("proxy_gap", "proxy − verifier")]


def aggregate(figs: list[dict]) -> dict:
    out = {}
    keys = {k for f in figs for k in f}
    for k in sorted(keys):
        names = sorted({f[k] for f in figs if isinstance(f.get(k), str)})
        if names:  # a label such as the training reward
            out[k] = ", ".join(names)
            continue
        vals = [f[k] for f in figs if isinstance(f.get(k), int | float)]
        out[k] = ({"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                   "n": len(vals)} if vals else None)
    return out


def _cell(a: dict | None, n_runs: int, key: str) -> str:
    if isinstance(a, str):
        return a
    if a is None:
        return "not reached" if key.endswith("to_target") else "—"
    fmt = "{:.0f}" if key in ("steps_to_target", "steps") else (
        "{:.1f}" if key in ("minutes_to_target", "eval_guidance", "train_minutes")
                                                     else "{:.5f}" if key == "flat_noise" else "{:.3f}")
    s = fmt.format(a["mean"]) if a["min"] == a["max"] else (
        f"{fmt.format(a['mean'])} [{fmt.format(a['min'])}, {fmt.format(a['max'])}]")
    if key.endswith("to_target") and a["n"] < n_runs:
        s += f" ({a['n']}/{n_runs} runs)"
    return s


def markdown(result: dict) -> str:
    lines = ["| method | seeds | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for _g, fig in sorted(result.get("base", {}).items()):
        cells = [_cell({"mean": fig[k], "min": fig[k], "max": fig[k], "n": 1} if isinstance(fig.get(k), int | float)
                       else None, 1, k) if not k.endswith("to_target") else "—" for k, _ in COLUMNS]
        lines.append("| base model | — | " + " | ".join(cells) + " |")
    for name, r in result["presets"].items():
        ok = [s for s in r["runs"] if s["ok"]]
        if not ok:
            err = r["runs"][0]["error"] if r["runs"] else "no runs"
            lines.append(f"| {name} | — | failed: {err} |" + " |" * (len(COLUMNS) - 1))
            continue
        seeds = ",".join(str(s["seed"]) for s in ok)
        lines.append(f"| {name} | {seeds} | " + " | ".join(_cell(r["aggregate"].get(k), len(ok), k)
                                                           for k, _ in COLUMNS) + " |")
    missing = result.get("not_run", [])
    for name in result["settings"]["presets"]:
        if name not in result["presets"] and any(m.rsplit("-seed", 1)[0] == name for m in missing):
            lines.append(f"| {name} | — | not run |" + " |" * (len(COLUMNS) - 1))
    b = result["settings"]
    tgt = f"score ≥ {b['target']}" if b["target"] is not None else f"+{b['target_gain']} over the run's step-0 score"
    budget = ("Runs gathered from several benchmark directories; their budgets may differ (see steps / train min)"
              if b.get("runs_from") else f"Budget {b['minutes']} training minutes per run")
    lines += ["", f"{budget}; verifier scores from `diffalign eval` on "
                  f"{b['eval_images']} images per split ({b['images_per_prompt']} per prompt); target: {tgt} in the "
                  "run's periodic evaluation. Mean over seeds, [min, max] where they differ."]
    partial = [m for m in missing if m.rsplit("-seed", 1)[0] in result["presets"]]
    if partial:
        lines += ["", "Seeds not run (no finished run found): " + ", ".join(partial) + "."]
    return "\n".join(lines) + "\n"


def _num(x) -> bool:
    return isinstance(x, int | float)


def hallucination_markdown(result: dict) -> str:
    """Second table: hallucination and the low-level metrics of the test split, relative to the
    base model (same eval CFG) and to the renderer's images of the same prompts and seeds.

    For a low-level metric, ``r = |x − renderer| / |base − renderer|``: 1 is as far from real
    renders as the base model, below 1 closer, above 1 more distorted.
    """
    base = result.get("base", {})
    head = ["method", "eval CFG", "high-level halluc. / img (vs base)", "ood high-level (vs base)",
            "hallucinated / img", "missing / img", "misattributed / img", *[f"{m} (r)" for m in LOWLEVEL]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = {"laplacian_var": "{:.4f}", "highpass": "{:.4f}", "edge_spread": "{:.4f}", "flat_noise": "{:.5f}"}

    def rel(x, b):
        return f" ({100 * (x / b - 1):+.0f} %)" if _num(x) and _num(b) and b else ""

    def row(name, g, fig, ref):
        cells = [name, f"{g:g}" if _num(g) else "—"]
        cells.append((f"{fig['high_level_hallucination']:.3f}" + rel(fig["high_level_hallucination"],
                     ref.get("high_level_hallucination"))) if _num(fig.get("high_level_hallucination")) else "—")
        cells.append((f"{fig['ood_high_level_hallucination']:.3f}" + rel(fig["ood_high_level_hallucination"],
                     ref.get("ood_high_level_hallucination"))) if _num(fig.get("ood_high_level_hallucination")) else "—")
        cells += [f"{fig[k]:.3f}" if _num(fig.get(k)) else "—" for k in ("hallucinated", "missing", "misattributed")]
        for m in LOWLEVEL:
            x, r, b = fig.get(f"lowlevel_{m}"), fig.get(f"renderer_{m}"), ref.get(f"lowlevel_{m}")
            if not _num(x):
                cells.append("—")
                continue
            ratio = f" ({abs(x - r) / abs(b - r):.2f})" if _num(r) and _num(b) and b != r else ""
            cells.append(fmt[m].format(x) + ratio)
        lines.append("| " + " | ".join(cells) + " |")

    renderer = next((f for f in base.values() if _num(f.get("renderer_flat_noise"))), None)
    if renderer is None:
        renderer = next((r["figures"] for p in result["presets"].values() for r in p["runs"]
                         if r.get("ok") and _num(r.get("figures", {}).get("renderer_flat_noise"))), None)
    if renderer is not None:
        lines.append("| renderer | — | — | — | — | — | — | " + " | ".join(
            fmt[m].format(renderer[f"renderer_{m}"]) if _num(renderer.get(f"renderer_{m}")) else "—"
            for m in LOWLEVEL) + " |")
    for g, fig in sorted(base.items()):
        row("base model", float(g), fig, fig)
    for name, r in result["presets"].items():
        figs = [s["figures"] for s in r["runs"] if s.get("ok") and s.get("figures")]
        if not figs:
            continue
        mean = {k: float(np.mean([f[k] for f in figs if _num(f.get(k))])) for k in figs[0]
                if any(_num(f.get(k)) for f in figs)}
        g = mean.get("eval_guidance")
        ref = base.get(f"{g:g}", {}) if _num(g) else {}
        row(f"{name} ({len(figs)} seeds)", g, mean, ref)
    lines += ["", "Test split (high-level also out-of-domain), mean over seeds. (± %): change against the base model "
                  "at the same eval CFG. Low-level metrics (r) = |model − renderer| / |base − renderer|: 1 is as far "
                  "from the renderer's images as the base model, < 1 closer, > 1 more distorted."]
    return "\n".join(lines) + "\n"


def write_summary(path: str, result: dict, minutes: float, eval_images: int, suffix: str = "_test") -> None:
    """One ``<preset><suffix>`` entry per preset in the summary JSON at ``path``: the base model's and
    every seed's final verifier score on the test split (each at the run's own evaluation CFG),
    the out-of-domain scores, the high-level hallucination, the ShapesScore proxy's score and the
    training budget."""
    from _json_out import merge_summary

    for name, p in result["presets"].items():
        runs = [r for r in p["runs"] if r.get("ok") and r.get("figures", {}).get("test_score") is not None]
        if not runs:
            continue
        g = runs[0]["figures"].get("eval_guidance")
        base = result.get("base", {}).get(f"{g:g}" if g is not None else "", {})
        merge_summary(path, f"{name}{suffix}", {
            "base": base.get("test_score"), "final": [r["figures"]["test_score"] for r in runs],
            "seeds": [r["seed"] for r in runs], "minutes": minutes,
            "train_minutes": [r["figures"].get("train_minutes") for r in runs], "eval_images": eval_images,
            "eval_guidance": g, "base_ood": base.get("ood_score"), "final_ood": [r["figures"]["ood_score"] for r in runs],
            "base_high_level_hallucination": base.get("high_level_hallucination"),
            "final_high_level_hallucination": [r["figures"]["high_level_hallucination"] for r in runs],
            "base_proxy": base.get("proxy_score"), "final_proxy": [r["figures"].get("proxy_score") for r in runs],
            "train_reward": runs[0]["figures"].get("train_reward"), "overrides": result["settings"]["overrides"]})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="all", help="comma-separated preset names in configs/shapes, or 'all'")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per run (max_train_minutes)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run (repeatable), e.g. --set eval.num_images=64")
    ap.add_argument("--eval-images", type=int, default=512, help="diffalign eval images per split")
    ap.add_argument("--images-per-prompt", type=int, default=4, help="diffalign eval images per prompt")
    ap.add_argument("--eval-steps", type=int, default=20, help="Euler steps of the final evaluation")
    ap.add_argument("--target", type=float, default=None, help="absolute periodic-eval score target")
    ap.add_argument("--target-gain", type=float, default=0.1, help="target = step-0 score + this (if no --target)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before a training subprocess is killed")
    ap.add_argument("--out", default="runs/convergence", help="output directory")
    ap.add_argument("--no-compare", action="store_true", help="skip the diffalign compare report")
    ap.add_argument("--eval-guidance", type=float, default=None,
                    help="CFG of the final evaluation for every run (default: each run's eval.guidance_scale)")
    ap.add_argument("--base", action="store_true", help="add a row for the base model at each guidance used")
    ap.add_argument("--summary", default=None,
                    help="summary JSON to update (e.g. docs/results/learning.json): one '<preset>_test' entry per "
                         "preset with the base and per-seed final test scores (needs --base)")
    ap.add_argument("--summary-suffix", default="_test",
                    help="the summary entries' names are <preset><suffix> (e.g. _proxy for a study on another reward)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep finished runs (summary.json + eval.json with the same settings) instead of rerunning")
    ap.add_argument("--gather", action="store_true",
                    help="never train: table the finished runs only (implies --reuse); missing ones are 'not run'")
    ap.add_argument("--runs-from", action="append", default=[], metavar="DIR",
                    help="with --gather: also look for <preset>-seed<S> and base-cfg<G> in DIR (repeatable)")
    args = ap.parse_args(argv)
    if args.runs_from and not args.gather:
        ap.error("--runs-from only applies to --gather (it never trains into another directory)")
    args.reuse = args.reuse or args.gather

    from diffalign.evaluation.report import evaluate

    threads = next((int(o.split("=", 1)[1]) for o in args.overrides if o.startswith("threads=")), 0)
    if threads > 0:  # evaluate with the training runs' thread count (several benchmarks may share the CPU)
        import torch

        torch.set_num_threads(threads)

    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if args.presets == "all" else args.presets.split(",")
    missing = [n for n in names if not (PRESET_DIR / f"{n}.yaml").is_file()]
    if missing:
        ap.error(f"unknown preset(s) {missing}; available: {', '.join(sorted(p.stem for p in PRESET_DIR.glob('*.yaml')))}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"settings": {"presets": names, "seeds": seeds, "minutes": args.minutes,
                                 "overrides": args.overrides, "eval_images": args.eval_images,
                                 "images_per_prompt": args.images_per_prompt, "target": args.target,
                                 "target_gain": None if args.target is not None else args.target_gain,
                                 "gather": args.gather, "runs_from": args.runs_from},
                    "presets": {}, "not_run": []}
    search = [out, *(Path(d).resolve() for d in args.runs_from)]

    def find(name: str) -> Path:
        """OUT/name, or with --gather the first directory in --runs-from that has it finished."""
        for d in search if args.gather else [out]:
            if (d / name / "summary.json").is_file() or (d / name / "eval.json").is_file():
                return d / name
        return out / name

    done_dirs, used_guidance = [], set()
    for name in names:
        runs = []
        for seed in seeds:
            rd = find(f"{name}-seed{seed}")
            info = {"seed": seed, "run_dir": str(rd)}
            record = rd / "convergence_run.json"
            finished = (rd / "summary.json").is_file() and record.is_file()
            if args.gather and not finished:
                print(f"[convergence] {name} seed {seed}: no finished run, not trained (--gather)",
                      file=sys.stderr, flush=True)
                result["not_run"].append(f"{name}-seed{seed}")
                continue
            if args.reuse and finished:
                info |= json.loads(record.read_text()) | {"reused": True}
                print(f"[convergence] {name} seed {seed}: reusing the finished run", file=sys.stderr, flush=True)
            else:
                print(f"[convergence] {name} seed {seed} ...", file=sys.stderr, flush=True)
                info |= run_preset(name, seed, rd, args.minutes, args.overrides, args.timeout)
                if info["ok"]:
                    record.write_text(json.dumps({k: info[k] for k in ("ok", "seconds", "error", "command")}))
            if info["ok"]:
                try:
                    g = run_guidance(rd, args.eval_guidance)
                    used_guidance.add(g)
                    settings = {"num_images": args.eval_images, "steps": args.eval_steps, "guidance_scale": g,
                                "images_per_prompt": args.images_per_prompt}
                    ev = reusable_eval(rd / "eval", settings) if args.reuse else None
                    if ev is None:
                        ev = evaluate(rd, rd / "eval", num_images=args.eval_images, steps=args.eval_steps,
                                      guidance_scale=g, images_per_prompt=args.images_per_prompt)
                except Exception as e:  # noqa: BLE001 - reported in the table, the benchmark goes on
                    ev, info["eval_error"] = None, f"{type(e).__name__}: {e}"
                info["figures"] = run_figures(rd, ev, args.target, None if args.target is not None else args.target_gain)
                done_dirs.append(rd)
            else:
                print(f"[convergence] {name} seed {seed} failed: {info['error']}", file=sys.stderr, flush=True)
            runs.append(info)
        if not runs:
            continue
        ok = [r["figures"] for r in runs if r["ok"]]
        result["presets"][name] = {"runs": runs, "aggregate": aggregate(ok) if ok else {}}
    if args.base:
        result["base"] = {}
        model = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("model=")), None)
        model = None if model in (None, "base") else model  # None: the shipped base checkpoint
        for g in sorted(used_guidance or {args.eval_guidance or 4.5}):
            bd = find(f"base-cfg{g:g}")
            settings = {"num_images": args.eval_images, "steps": args.eval_steps, "guidance_scale": g,
                        "images_per_prompt": args.images_per_prompt}
            ev = reusable_eval(bd, settings) if args.reuse else None
            if ev is None:
                print(f"[convergence] base model, CFG {g:g} ...", file=sys.stderr, flush=True)
                ev = evaluate(model, bd, num_images=args.eval_images, steps=args.eval_steps, guidance_scale=g,
                              images_per_prompt=args.images_per_prompt)
            result["base"][f"{g:g}"] = eval_figures(ev)
    if done_dirs and not args.no_compare:
        from diffalign.evaluation.compare import compare

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # presets differ by design
            compare(done_dirs, out / "compare")
    if args.summary:
        write_summary(args.summary, result, args.minutes, args.eval_images, args.summary_suffix)
    table = markdown(result) + "\n" + hallucination_markdown(result)
    (out / "convergence.json").write_text(json.dumps(result, indent=2))
    (out / "convergence.md").write_text(table)
    print(json.dumps(result, indent=2))
    print(table)
    return result


if __name__ == "__main__":
    main()
