"""A benchmark's result: printed as JSON, and written to ``path`` too when one is given (shared by the benchmarks)."""

from __future__ import annotations

import json


def emit_json(result: dict, path: str | None) -> dict:
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def merge_summary(path: str, key: str, value: dict) -> dict:
    """Set ``key`` (``a/b`` for nesting) of the JSON object in ``path`` to ``value`` and write it
    back (other keys are kept), so several benchmark runs fill one summary such as
    ``docs/results/learning.json``. Returns the whole summary."""
    import os
    from pathlib import Path

    p = Path(path)
    summary = json.loads(p.read_text()) if p.exists() else {}
    node = summary
    *parents, leaf = key.split("/")
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, p)
    return summary


def score_curve_summary(rows: list[dict]) -> dict:
    """Base / final score and the curve of a run's evaluation rows (each with ``rollout_images``,
    ``train_s`` and ``score``): the common part of a learning summary entry."""
    return {"base": rows[0]["score"], "final": rows[-1]["score"], "images": rows[-1]["rollout_images"],
            "curve": [[r["rollout_images"], r["train_s"], r["score"]] for r in rows],
            "curve_columns": ["rollout_images", "train_s", "score"]}
