"""``diffalign eval``: a checkpoint (or a run's latest weights) on test and out-of-domain prompts.

Writes ``eval.json`` (every figure), ``eval.md`` (tables) and one image grid per split.
Deterministic given the seeds: prompts are task-balanced draws (``prompt_seed``) and image
``i`` uses seed ``image_seed + i``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from diffalign.errors import DiffalignError
from diffalign.evaluation.grid import save_grid
from diffalign.evaluation.hallucination import low_level_metrics, summarize
from diffalign.evaluation.quick import evaluate_policy
from diffalign.models.tiny import TinyFlowPolicy
from diffalign.world.grammar import TASKS
from diffalign.world.render import render_batch

LOW_LEVEL = ("laplacian_var", "highpass", "edge_spread", "flat_noise")


def load_policy_for_eval(target: str | Path | None) -> tuple[TinyFlowPolicy, str]:
    """A checkpoint file, a training run directory (its latest policy, EMA if it has one), or None (base)."""
    if target is None:
        return TinyFlowPolicy.from_checkpoint(None), "shipped base model"
    path = Path(target)
    if path.is_dir():
        from diffalign.config import load_config
        from diffalign.training.rundir import load_checkpoint
        from diffalign.training.trainer import TrainConfig

        if not (path / "config.yaml").exists():
            raise DiffalignError(f"{path} is not a run directory (no config.yaml) nor a checkpoint file")
        cfg = load_config(TrainConfig, path / "config.yaml")
        policy = TinyFlowPolicy.from_checkpoint(cfg.model, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
        state = load_checkpoint(path)
        weights = state["snapshots"].get("ema") if cfg.eval.use_ema else None
        weights = weights or state["policy"]
        with torch.no_grad():
            params = policy.trainable_state()
            for k, v in weights.items():
                params[k].copy_(v)
        return policy, f"run {path} (epoch {state['epoch']})"
    return TinyFlowPolicy.from_checkpoint(path), str(path)


def evaluate(target, out_dir: str | Path, *, num_images: int = 512, steps: int = 20, guidance_scale: float = 4.5,
             splits: tuple[str, ...] = ("test", "ood"), prompt_seed: int = 0, image_seed: int = 0) -> dict:
    policy, label = load_policy_for_eval(target)
    policy.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": label, "num_images": num_images, "steps": steps, "guidance_scale": guidance_scale,
                    "prompt_seed": prompt_seed, "image_seed": image_seed, "splits": {}}
    for split in splits:
        t0 = time.perf_counter()
        res, images, prompts, verdicts = evaluate_policy(policy, split, num_images, steps=steps,
                                                         guidance_scale=guidance_scale, prompt_seed=prompt_seed,
                                                         image_seed=image_seed)
        gen_s = time.perf_counter() - t0
        renders = render_batch(prompts, [image_seed + i for i in range(num_images)])
        ref = summarize(low_level_metrics(renders))
        res |= {f"renderer_lowlevel/{k}": v for k, v in ref.items()}
        res["seconds"] = gen_s
        report["splits"][split] = res
        save_grid(images[:64], out / f"grid_{split}.png", ncol=8, captions=prompts[:64],
                  marks=[v.score == 1.0 for v in verdicts[:64]])
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    splits = list(report["splits"])
    lines = [f"# Evaluation: {report['model']}", "",
             f"{report['num_images']} images per split, {report['steps']} Euler steps, CFG {report['guidance_scale']}, "
             f"prompt seed {report['prompt_seed']}, image seeds {report['image_seed']}…", "",
             "| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    keys = ["score", "partial"] + [f"score/{t}" for t in TASKS] + [
        "hallucinated", "misattributed", "missing", "high_level_hallucination"]
    for k in keys:
        if any(k in report["splits"][s] for s in splits):
            lines.append(f"| {k} | " + " | ".join(f"{report['splits'][s].get(k, float('nan')):.3f}" for s in splits) + " |")
    lines += ["", "Low-level hallucination (model vs renderer images of the same prompts and seeds):", "",
              "| metric | " + " | ".join(f"{s} model | {s} renderer" for s in splits) + " |",
              "|---|" + "---|---|" * len(splits)]
    for k in LOW_LEVEL:
        cells = []
        for s in splits:
            r = report["splits"][s]
            cells += [f"{r[f'lowlevel/{k}']:.4f}", f"{r[f'renderer_lowlevel/{k}']:.4f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
