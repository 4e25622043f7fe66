"""Evaluate a policy on ShapesWorld held-out prompts with the exact verifier."""

from __future__ import annotations

import numpy as np
import torch

from diffalign.evaluation.hallucination import low_level_metrics, summarize
from diffalign.sampling.generate import generate
from diffalign.world.grammar import TASKS, eval_prompts, parse_prompt
from diffalign.world.verify import verify_batch


def verdict_stats(prompts: list[str], verdicts: list) -> dict[str, float]:
    """score / partial overall and per task; hallucinated, missing, mis-attributed per image."""
    res = {
        "score": float(np.mean([v.score for v in verdicts])),
        "partial": float(np.mean([v.partial for v in verdicts])),
        "hallucinated": float(np.mean([v.hallucinated for v in verdicts])),
        "missing": float(np.mean([v.missing for v in verdicts])),
        "misattributed": float(np.mean([v.misattributed for v in verdicts])),
    }
    res["high_level_hallucination"] = res["hallucinated"] + res["misattributed"]
    tasks = [parse_prompt(p).task for p in prompts]
    for t in TASKS:
        s = [v.score for v, tt in zip(verdicts, tasks, strict=True) if tt == t]
        if s:
            res[f"score/{t}"] = float(np.mean(s))
    return res


@torch.no_grad()
def evaluate_policy(policy, split: str = "test", num_images: int = 64, *, steps: int = 20,
                    guidance_scale: float = 4.5, prompt_seed: int = 0, image_seed: int = 0, batch_size: int = 64,
                    tasks=None):
    """Generate ``num_images`` task-balanced prompts of ``split`` (of task types ``tasks`` only,
    when given; fixed seeds) and judge them.

    Returns ``(metrics, images, prompts, verdicts)``; metrics include the verifier figures
    (see :func:`verdict_stats`) and the low-level hallucination metrics (``lowlevel/*``)."""
    prompts = eval_prompts(split, num_images, seed=prompt_seed, tasks=tasks)
    seeds = [image_seed + i for i in range(num_images)]
    images = generate(policy, prompts, seeds, steps=steps, cfg=guidance_scale, batch_size=batch_size)
    verdicts = verify_batch(images, prompts)
    res = verdict_stats(prompts, verdicts)
    res |= {f"lowlevel/{k}": v for k, v in summarize(low_level_metrics(images)).items()}
    return res, images, prompts, verdicts
