"""How far, and in which direction, LoRA runs moved their model: ``ΔW = (α/r)·B·A`` per layer.

    python benchmarks/lora_drift.py runs/study/flow_grpo-seed0 runs/study_shuffled/flow_grpo-seed0

For each run (its latest checkpoint, or a ``.../checkpoints/step_N`` directory) prints the
Frobenius norm of the whole weight change ``‖ΔW‖`` (all adapted layers stacked into one vector),
its largest layers, and for every pair of runs the cosine between their ``ΔW`` vectors. Runs
of the same preset that start from the same base can be compared this way: two runs that move
along a shared direction (a sampler bias, a reward-independent pull) have a clearly positive
cosine; two independent random walks in this many dimensions have a cosine near 0
(about ±1/√dims). Prints JSON and a table; ``--json PATH`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch


def checkpoint_file(path: Path) -> Path:
    """``state.pt`` of a run directory's latest checkpoint or of a checkpoint directory."""
    if (path / "state.pt").exists():
        return path / "state.pt"
    latest = path / "checkpoints" / "latest"
    if not latest.exists():
        raise SystemExit(f"error: {path} is neither a run directory with checkpoints/latest nor a checkpoint "
                         "directory with state.pt")
    return path / "checkpoints" / latest.read_text().strip() / "state.pt"


def lora_deltas(state: dict, scaling: float) -> dict[str, torch.Tensor]:
    """Layer name → flattened ``scaling·B·A`` (conv kernels as (out, in·k·k))."""
    policy = state["policy"]
    out = {}
    for name, a in policy.items():
        if ".lora_A." not in name:
            continue
        b = policy[name.replace(".lora_A.", ".lora_B.")].float()
        a = a.float()
        delta = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        out[name.split(".lora_A.")[0]] = scaling * delta.flatten()
    if not out:
        raise SystemExit("error: the checkpoint holds no LoRA weights (lora_A/lora_B); this script compares LoRA runs")
    return out


def run_delta(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The run's per-layer ΔW and facts about its checkpoint."""
    import yaml

    file = checkpoint_file(path)
    cfg_file = next((p / "config.yaml" for p in (path, *path.parents) if (p / "config.yaml").exists()), None)
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file else {}
    rank = cfg.get("lora_rank") or 1
    scaling = (cfg.get("lora_alpha") or rank) / rank
    state = torch.load(file, map_location="cpu", weights_only=False)
    return lora_deltas(state, scaling), {"checkpoint": str(file), "epoch": state.get("epoch"),
                                         "train_minutes": round(float(state.get("train_time", 0.0)) / 60, 1)}


def summarise(paths: list[Path], top: int = 3) -> dict:
    deltas, runs = {}, {}
    for p in paths:
        d, facts = run_delta(p)
        deltas[str(p)] = d
        norms = {k: float(v.norm()) for k, v in d.items()}
        total = math.sqrt(sum(n * n for n in norms.values()))
        biggest = sorted(norms.items(), key=lambda kv: -kv[1])[:top]
        runs[str(p)] = {**facts, "delta_norm": total, "dims": sum(v.numel() for v in d.values()),
                        "largest_layers": {k: round(n, 4) for k, n in biggest}}
    pairs = []
    for a, b in itertools.combinations(deltas, 2):
        if deltas[a].keys() != deltas[b].keys():
            pairs.append({"runs": [a, b], "cosine": None, "note": "different adapted layers"})
            continue
        va = torch.cat([deltas[a][k] for k in sorted(deltas[a])]).double()
        vb = torch.cat([deltas[b][k] for k in sorted(deltas[b])]).double()
        pairs.append({"runs": [a, b], "cosine": float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-30))})
    return {"runs": runs, "pairs": pairs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories or checkpoint directories")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    result = summarise(args.runs)
    print(json.dumps(result, indent=2))
    print("\n| run | epoch | train min | ‖ΔW‖ |\n|---|---|---|---|")
    for name, r in result["runs"].items():
        print(f"| {name} | {r['epoch']} | {r['train_minutes']} | {r['delta_norm']:.4f} |")
    for pair in result["pairs"]:
        cos = "n/a" if pair["cosine"] is None else f"{pair['cosine']:+.3f}"
        print(f"cosine({pair['runs'][0]}, {pair['runs'][1]}) = {cos}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
