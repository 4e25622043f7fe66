"""``diffalign compare RUN_DIR ...``: one table and plots across training runs.

Reads each run's ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and, when present, its
``eval/eval.json`` (from ``diffalign eval RUN --out RUN/eval``; ``--eval-images N`` makes one).
Runs whose configs differ only in ``seed`` form one group, drawn as a mean line with a
min–max band. Runs whose configs differ otherwise are compared too, with a warning naming
the fields that differ (and a table of them in the report).

Writes into ``out``: ``compare.html`` (self-contained: every figure inlined as a data URI),
``compare.md``, ``curves.png`` (eval verifier score and training reward vs step and vs
training wall-clock) and ``bars.png`` (hallucination and diversity per group).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffalign.config import MISSING, config_diff, load_yaml
from diffalign.errors import DiffalignError

SEED_KEYS = {"seed"}


class MixedConfigWarning(UserWarning):
    """Compared runs differ in more than their seed."""


@dataclass
class Run:
    """One run directory as read by :func:`load_run`."""

    path: Path
    label: str
    config: dict
    rows: list[dict]
    summary: dict = field(default_factory=dict)
    eval: dict | None = None

    def series(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        pts = [(r.get(x, 0.0), r[key]) for r in self.rows if key in r and r[key] is not None]
        if x == "train_time_s":
            pts = [(a / 60.0, b) for a, b in pts]
        return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def load_run(path: str | Path) -> Run:
    """Read a training run directory; :class:`DiffalignError` when it is not one."""
    from diffalign.training.rundir import read_metrics

    p = Path(path)
    if not p.is_dir():
        raise DiffalignError(f"{p}: no such run directory")
    if not (p / "config.yaml").is_file():
        what = " (it holds eval.json: an evaluation output, not a run)" if (p / "eval.json").exists() else ""
        raise DiffalignError(f"{p} is not a run directory: no config.yaml{what}. Pass directories made by "
                             "'diffalign train' (or another training command).")
    if not (p / "metrics.jsonl").is_file():
        raise DiffalignError(f"run {p} has not logged anything yet (no metrics.jsonl); compare it once it has trained")
    config = _with_defaults(p / "config.yaml")
    rows = read_metrics(p / "metrics.jsonl")
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else {}
    ev = None
    for cand in (p / "eval" / "eval.json", p / "eval.json"):
        if cand.is_file():
            ev = json.loads(cand.read_text())
            break
    return Run(p, p.name, config, rows, summary, ev)


def _with_defaults(path: Path) -> dict:
    """A run's saved config with the fields it predates filled in at their defaults.

    A run made before a config field existed (e.g. ``sharding``) then groups with a newer run
    of the same settings instead of showing as a different configuration. A config this
    version cannot read (a removed or renamed field) is compared as saved.
    """
    from diffalign.config import config_to_dict, load_config
    from diffalign.training.registry import train_classes

    try:
        config_cls, _ = train_classes(path, [])
        return config_to_dict(load_config(config_cls, path))
    except Exception:  # noqa: BLE001 - an old or foreign config is still comparable as written
        return load_yaml(path) or {}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """Dotted config keys (other than the seed) whose values differ between runs: key → value per run."""
    keys: set[str] = set()
    for r in runs[1:]:
        keys |= set(config_diff(runs[0].config, r.config))
    flats = [_flat(r.config) for r in runs]
    diffs = {k: [f.get(k, MISSING) for f in flats] for k in keys - SEED_KEYS}
    # fields set in every run first (real differences), then fields only some configs have
    return dict(sorted(diffs.items(), key=lambda kv: (any(v is MISSING for v in kv[1]), kv[0])))


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs whose configs differ only in the seed, in order of first appearance."""
    groups: list[list[Run]] = []
    for r in runs:
        for g in groups:
            if not (set(config_diff(g[0].config, r.config)) - SEED_KEYS):
                g.append(r)
                break
        else:
            groups.append([r])
    return groups


def _group_labels(groups: list[list[Run]], diffs: dict[str, list[Any]], runs: list[Run]) -> list[str]:
    """The first run's name without a ``-seedN`` suffix; differing fields added where names clash."""
    bases = [re.sub(r"[-_]seed\d+$", "", g[0].label) if len(g) > 1 else g[0].label for g in groups]
    labels = []
    for g, base in zip(groups, bases, strict=True):
        if bases.count(base) > 1 and diffs:
            i = runs.index(g[0])
            base += " (" + ", ".join(f"{k.split('.')[-1]}={_short(v[i])}" for k, v in list(diffs.items())[:2]) + ")"
        labels.append(base)
    return labels


def _short(v: Any) -> str:
    if v is MISSING:
        return "—"
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "…"


def _mean_band(xs: list[np.ndarray], ys: list[np.ndarray], steps: list[np.ndarray]):
    """Align seeds on their common steps: mean x, mean y, min y, max y."""
    common = set(steps[0].tolist())
    for s in steps[1:]:
        common &= set(s.tolist())
    common_sorted = sorted(common)
    if not common_sorted:
        return None
    def pick(a, s):
        index = {v: i for i, v in enumerate(s.tolist())}
        return np.array([a[index[c]] for c in common_sorted])
    X = np.stack([pick(x, s) for x, s in zip(xs, steps, strict=True)])
    Y = np.stack([pick(y, s) for y, s in zip(ys, steps, strict=True)])
    return X.mean(0), Y.mean(0), Y.min(0), Y.max(0)


def _final(run: Run, key: str) -> float | None:
    vals = [r[key] for r in run.rows if key in r and r[key] is not None]
    return float(vals[-1]) if vals else None


def _agg(vals: list[float | None]) -> tuple[float | None, float | None, float | None]:
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, None
    return float(np.mean(v)), float(np.min(v)), float(np.max(v))


def _eval_value(run: Run, key: str, split: str = "test") -> float | None:
    """A figure from the run's eval.json (``split``), else from its last periodic evaluation."""
    if run.eval and split in run.eval.get("splits", {}) and key in run.eval["splits"][split]:
        return float(run.eval["splits"][split][key])
    if split == "test":
        return _final(run, f"eval/{key}")
    return None


def _steps_to(run: Run, target: float) -> tuple[float | None, float | None]:
    for r in run.rows:
        if r.get("eval/score") is not None and r["eval/score"] >= target:
            return float(r["step"]), float(r.get("train_time_s", 0.0)) / 60.0
    return None, None


TABLE_COLUMNS = [
    ("runs", "seeds"),
    ("steps", "steps"),
    ("train_min", "train min"),
    ("eval_score", "final eval score (periodic)"),
    ("best_eval_score", "best eval score"),
    ("train_reward", "final train reward"),
    ("test_score", "eval.json test score"),
    ("ood_score", "eval.json ood score"),
    ("hallucinated", "hallucinated / img"),
    ("misattributed", "mis-attributed / img"),
    ("flat_noise", "flat-region noise"),
    ("diversity", "diversity (pixel)"),
    ("proxy_gap", "proxy − verifier"),
]


def summarize_group(group: list[Run], target: float | None = None) -> dict[str, Any]:
    """Figures of one group (mean, min, max over its seeds)."""
    stats: dict[str, Any] = {"runs": len(group), "seeds": [r.config.get("seed") for r in group]}
    per = {
        "steps": [_final(r, "step") for r in group],
        "train_min": [(_final(r, "train_time_s") or 0.0) / 60.0 for r in group],
        "eval_score": [_final(r, "eval/score") for r in group],
        "best_eval_score": [max((x["eval/score"] for x in r.rows if x.get("eval/score") is not None), default=None)
                            for r in group],
        "train_reward": [_final(r, "reward") for r in group],
        "test_score": [_eval_value(r, "score") if r.eval else None for r in group],
        "ood_score": [_eval_value(r, "score", "ood") for r in group],
        "hallucinated": [_eval_value(r, "hallucinated") for r in group],
        "misattributed": [_eval_value(r, "misattributed") for r in group],
        "flat_noise": [_eval_value(r, "lowlevel/flat_noise") for r in group],
        "diversity": [_eval_value(r, "diversity/pixel") for r in group],
        "proxy_gap": [_eval_value(r, "proxy/gap") for r in group],
    }
    if target is not None:
        hits = [_steps_to(r, target) for r in group]
        per["steps_to_target"] = [h[0] for h in hits]
        per["minutes_to_target"] = [h[1] for h in hits]
    for k, v in per.items():
        stats[k] = dict(zip(("mean", "min", "max"), _agg(v), strict=True))
    return stats


def _cell(stat: dict | Any) -> str:
    if not isinstance(stat, dict):
        return html.escape(str(stat))
    m, lo, hi = stat["mean"], stat["min"], stat["max"]
    if m is None:
        return "—"
    whole = all(float(x).is_integer() for x in (m, lo, hi))
    fmt = (lambda x: f"{x:.0f}") if abs(m) >= 100 or (whole and abs(m) >= 1) else (lambda x: f"{x:.3f}")
    return fmt(m) if lo == hi else f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


def training_curve(groups: list[list[Run]]) -> tuple[str, str]:
    """The metric the lower curve panels show: the training reward (RL runs), or where no run logs
    one the preference accuracy (Diffusion-DPO / SePPO runs log no reward)."""
    for key, label in (("reward", "train reward"), ("accuracy", "train preference accuracy")):
        if any(len(r.series(key)[0]) for g in groups for r in g):
            return key, label
    return "reward", "train reward"


def plot_curves(groups: list[list[Run]], labels: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one legend row per 3 groups below the plots; the figure grows so the legend never covers them
    legend_rows = -(-len(groups) // 3)
    legend_in = 0.3 + 0.2 * legend_rows
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.0 + legend_in))
    train_key, train_label = training_curve(groups)
    panels = [("eval/score", "step", "eval verifier score"), ("eval/score", "train_time_s", "eval verifier score"),
              (train_key, "step", train_label), (train_key, "train_time_s", train_label)]
    # distinct colours for up to 20 groups (tab20 beyond the default 10), then dashed lines
    colors = (plt.rcParams["axes.prop_cycle"].by_key()["color"] if len(groups) <= 10
              else list(matplotlib.colormaps["tab20"].colors))
    for ax, (key, x, ylabel) in zip(axes.flat, panels, strict=True):
        for gi, (g, label) in enumerate(zip(groups, labels, strict=True)):
            c = colors[gi % len(colors)]
            ls = "-" if gi < len(colors) else "--"
            series = [r.series(key, x) for r in g]
            steps = [r.series(key, "step")[0] for r in g]
            if not any(len(s[0]) for s in series):
                continue
            if len(g) > 1:
                band = _mean_band([s[0] for s in series], [s[1] for s in series], steps)
                if band is not None:
                    mx, my, lo, hi = band
                    ax.plot(mx, my, marker="o" if key.startswith("eval") else None, ls=ls, color=c, ms=3,
                            label=f"{label} (mean of {len(g)} seeds)")
                    ax.fill_between(mx, lo, hi, color=c, alpha=0.2, linewidth=0)
                    continue
            for r, (sx, sy) in zip(g, series, strict=True):
                ax.plot(sx, sy, marker="o" if key.startswith("eval") else None, ls=ls, color=c, ms=3,
                        label=label if len(g) == 1 else f"{label}: {r.label}")
        ax.set_xlabel("step" if x == "step" else "training wall-clock (min)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if not handles:
        handles, names = axes.flat[2].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bars(stats: list[dict], labels: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("hallucinated", "hallucinated objects / image"), ("misattributed", "mis-attributed objects / image"),
              ("flat_noise", "flat-region noise (low-level)"), ("diversity", "diversity within a prompt (pixel)")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = np.arange(len(labels))
    for ax, (key, title) in zip(axes, panels, strict=True):
        means = [s[key]["mean"] for s in stats]
        if all(m is None for m in means):
            ax.text(0.5, 0.5, "not measured\n(diffalign eval RUN --out RUN/eval\n--images-per-prompt 4)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")
        else:
            vals = [m if m is not None else 0.0 for m in means]
            lo = [v - (s[key]["min"] if s[key]["min"] is not None else v) for v, s in zip(vals, stats, strict=True)]
            hi = [(s[key]["max"] if s[key]["max"] is not None else v) - v for v, s in zip(vals, stats, strict=True)]
            ax.bar(x, vals, color=[colors[i % len(colors)] for i in range(len(labels))], yerr=[lo, hi], capsize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, [lab if len(lab) <= 18 else lab[:17] + "…" for lab in labels], rotation=30, ha="right",
                      fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _latest_sample(run: Run) -> Path | None:
    grids = sorted((run.path / "samples").glob("*.png")) if (run.path / "samples").is_dir() else []
    return grids[-1] if grids else None


def compare(run_dirs: list[str | Path], out_dir: str | Path, *, target: float | None = None,
            eval_images: int = 0, eval_images_per_prompt: int = 4) -> dict:
    """Compare runs; writes compare.html / compare.md / curves.png / bars.png into ``out_dir``.

    ``target``: an eval verifier score; the table then gives the steps and minutes to reach it.
    ``eval_images``: when > 0, runs without an ``eval/eval.json`` are evaluated first
    (test and ood, ``eval_images`` images per split, ``eval_images_per_prompt`` per prompt) into
    ``out_dir/evals/<run>/``."""
    if not run_dirs:
        raise DiffalignError("give at least one run directory to compare")
    runs = [load_run(p) for p in run_dirs]
    names = [str(r.path.resolve()) for r in runs]
    if len(set(names)) != len(names):
        raise DiffalignError("the same run directory is given twice")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if eval_images > 0:
        from diffalign.evaluation.report import evaluate

        for r in runs:
            if r.eval is None:
                r.eval = evaluate(r.path, out / "evals" / r.label, num_images=eval_images,
                                  images_per_prompt=eval_images_per_prompt)
    diffs = config_differences(runs)
    warning = None
    if diffs:
        def values(vals: list) -> str:  # every run's value for a few runs, the distinct values for many
            if len(vals) <= 4:
                return " vs ".join(_short(v) for v in vals)
            distinct = list(dict.fromkeys(_short(v) for v in vals))
            return f"{len(distinct)} values: {', '.join(distinct[:6])}{', ...' if len(distinct) > 6 else ''}"

        fields = ", ".join(f"{k} ({values(vals)})" for k, vals in list(diffs.items())[:8])
        more = f" and {len(diffs) - 8} more" if len(diffs) > 8 else ""
        warning = (f"the compared runs differ in more than their seed: {fields}{more}. Differences in the "
                   "figures may come from any of these fields.")
        warnings.warn(warning, MixedConfigWarning, stacklevel=2)
    groups = group_runs(runs)
    labels = _group_labels(groups, diffs, runs)
    if len(set(labels)) != len(labels):
        labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]
    stats = [summarize_group(g, target) for g in groups]
    curves = plot_curves(groups, labels, out / "curves.png")
    bars = plot_bars(stats, labels, out / "bars.png")
    result = {"runs": [str(r.path) for r in runs], "groups": [[str(r.path) for r in g] for g in groups],
              "labels": labels, "stats": stats, "config_differences": {k: [None if v is MISSING else v for v in vals]
                                                                     for k, vals in diffs.items()},
              "warning": warning, "target": target}
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "compare.md").write_text(_markdown(result, runs))
    (out / "compare.html").write_text(_html(result, runs, groups, curves, bars))
    return result


def _columns(result: dict) -> list[tuple[str, str]]:
    cols = list(TABLE_COLUMNS)
    if result["target"] is not None:
        cols[5:5] = [("steps_to_target", f"steps to {result['target']}"),
                     ("minutes_to_target", f"min to {result['target']}")]
    return [(k, h) for k, h in cols if k == "runs" or any(s[k]["mean"] is not None for s in result["stats"])]


def _markdown(result: dict, runs: list[Run]) -> str:
    cols = _columns(result)
    lines = ["# Run comparison", ""]
    if result["warning"]:
        lines += [f"> **Warning:** {result['warning']}", ""]
    lines += ["| group | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
    for lab, s in zip(result["labels"], result["stats"], strict=True):
        cells = [", ".join(str(x) for x in s["seeds"]) if k == "runs" else _cell(s[k]) for k, _ in cols]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds; [min, max] when the seeds differ. Periodic eval = the run's own held-out "
                  "evaluation; eval.json = `diffalign eval` figures when the run has them.", ""]
    if result["config_differences"]:
        lines += ["## Config fields that differ", "", "| field | " + " | ".join(r.label for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        for k, vals in result["config_differences"].items():
            lines.append(f"| {k} | " + " | ".join(_short(MISSING if v is None else v) for v in vals) + " |")
        lines.append("")
    lines += ["## Runs", ""] + [f"- {lab}: " + ", ".join(g) for lab, g in zip(result["labels"], result["groups"],
                                                                               strict=True)]
    lines += ["", "![curves](curves.png)", "", "![bars](bars.png)", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:12px 0;font-size:13px}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}.warn{background:#fff3cd;border:1px solid #e0b000;
padding:10px;margin:12px 0}img{max-width:100%;display:block;margin:8px 0}.samples img{image-rendering:pixelated}"""


def _html(result: dict, runs: list[Run], groups: list[list[Run]], curves: Path, bars: Path) -> str:
    esc = html.escape
    cols = _columns(result)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>diffalign compare</title>",
             f"<style>{_CSS}</style></head><body>", "<h1>Run comparison</h1>"]
    if result["warning"]:
        parts.append(f"<div class='warn' id='mixed-config-warning'><b>Warning:</b> {esc(result['warning'])}</div>")
    parts.append("<table id='summary'><tr><th>group</th>" + "".join(f"<th>{esc(h)}</th>" for _, h in cols) + "</tr>")
    for lab, s in zip(result["labels"], result["stats"], strict=True):
        cells = [esc(", ".join(str(x) for x in s["seeds"])) if k == "runs" else _cell(s[k]) for k, _ in cols]
        parts.append(f"<tr><td>{esc(lab)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table><p>Mean over seeds; [min, max] when the seeds differ.</p>")
    if result["config_differences"]:
        parts.append("<h2>Config fields that differ</h2><table id='config-diff'><tr><th>field</th>"
                     + "".join(f"<th>{esc(r.label)}</th>" for r in runs) + "</tr>")
        for k, vals in result["config_differences"].items():
            parts.append(f"<tr><td>{esc(k)}</td>" + "".join(f"<td>{esc(_short(MISSING if v is None else v))}</td>"
                                                          for v in vals) + "</tr>")
        parts.append("</table>")
    parts += ["<h2>Curves</h2>", f"<img id='curves' alt='curves' src='{_data_uri(curves)}'>",
              "<h2>Hallucination and diversity</h2>", f"<img id='bars' alt='bars' src='{_data_uri(bars)}'>",
              "<h2>Latest samples</h2><div class='samples'>"]
    for lab, g in zip(result["labels"], groups, strict=True):
        for r in g:
            grid = _latest_sample(r)
            if grid is not None:
                parts.append(f"<h3>{esc(lab)}: {esc(r.label)} ({esc(grid.name)})</h3>"
                             f"<img alt='samples of {esc(r.label)}' src='{_data_uri(grid)}'>")
    parts.append("</div></body></html>")
    return "\n".join(parts)
