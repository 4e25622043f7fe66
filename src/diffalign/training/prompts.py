"""Prompt files for models outside ShapesWorld (``prompt_file`` / ``eval_prompt_file``).

A prompt file is either plain text — one prompt per line; blank lines and lines starting
with ``#`` are skipped — or JSON lines (``.jsonl``) with a ``"prompt"`` field per line (other
fields are ignored), e.g. Flow-GRPO's / DanceGRPO's prompt lists.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from diffalign.errors import ConfigError

__all__ = ["read_prompt_file", "sample_file_prompts"]


@lru_cache(maxsize=8)
def _read(path: str, mtime: float) -> tuple[str, ...]:
    p = Path(path)
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (p.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if p.suffix == ".jsonl":
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{p}:{n}: each JSON line needs a \"prompt\" field ({e})") from e
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ConfigError(f"prompt file {p} holds no prompts (one per line, or JSON lines with \"prompt\")")
    return tuple(prompts)


def read_prompt_file(path: str | Path) -> list[str]:
    """All prompts of a prompt file (cached while the file is unchanged)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"prompt file {str(path)!r} not found; give a text file (one prompt per line) or a "
                          ".jsonl file with a \"prompt\" field per line")
    return list(_read(str(p.resolve()), p.stat().st_mtime))


def sample_file_prompts(path: str | Path, num_groups: int, group_size: int, seed: int,
                        epoch: int) -> tuple[list[str], torch.Tensor]:
    """Group-contiguous prompts of one epoch: ``num_groups`` prompts drawn uniformly (with
    replacement) from the file with a generator seeded by ``(seed, epoch)``, each repeated
    ``group_size`` times; and their ``(num_groups·group_size,)`` group ids."""
    pool = read_prompt_file(path)
    rng = np.random.default_rng([seed, epoch, 1])
    chosen = [pool[int(i)] for i in rng.integers(len(pool), size=num_groups)]
    prompts = [p for p in chosen for _ in range(group_size)]
    return prompts, torch.arange(num_groups).repeat_interleave(group_size)
