"""ShapesWorld's exact verifier as a reward."""

from __future__ import annotations

import torch

from diffalign.errors import ConfigError
from diffalign.rewards.base import RewardOutput, check_input, register_reward
from diffalign.world.grammar import TASKS, parse_prompt
from diffalign.world.render import SUPPORTED_SIZES
from diffalign.world.verify import verify_batch

_MODES = ("partial", "graded", "score")


@register_reward("shapes_verifier")
class VerifierReward:
    """Reward from the exact ShapesWorld verifier.

    mode: ``partial`` (fraction of the prompt's constraints held: dense), ``graded`` (partial
    credit for near misses too: mis-attributed objects, fewer extra objects, a relation's
    margin; :class:`~diffalign.world.verify.Verdict`) or ``score`` (1 only when all hold:
    GenEval's strict score). task_modes: per task type, a mode in place of ``mode``, e.g.
    ``{position: score, color_attr: score}`` pays the strict verdict on the two compositional
    tasks and partial credit elsewhere. details: ``score``, ``partial``, ``graded``, ``hallucinated``,
    ``missing``, ``misattributed`` per image. Images are ShapesWorld canvases: ``(B, 3, S, S)``
    with ``S`` in ``input_sizes`` (32 or 64); another size raises
    :class:`~diffalign.rewards.base.RewardInputError` (a ValueError) naming them.
    """

    input_sizes = SUPPORTED_SIZES

    def __init__(self, mode: str = "partial", task_modes: dict[str, str] | None = None):
        if mode not in _MODES:
            raise ConfigError(f"shapes_verifier mode={mode!r}; choose partial, graded or score")
        task_modes = dict(task_modes or {})
        unknown = sorted(set(task_modes) - set(TASKS))
        if unknown:
            raise ConfigError(f"shapes_verifier task_modes: unknown task type(s) {unknown}; choose from "
                              f"{', '.join(TASKS)}")
        bad = {t: m for t, m in task_modes.items() if m not in _MODES}
        if bad:
            raise ConfigError(f"shapes_verifier task_modes {bad}: each mode must be partial, graded or score")
        self.mode, self.task_modes = mode, task_modes
        extra = "".join(f",{t}={m}" for t, m in sorted(task_modes.items()) if m != mode)
        self.name = f"shapes_verifier[{mode}{extra}]"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        check_input(self, images)  # its thresholds are in pixels of ShapesWorld's canvases
        verdicts = verify_batch(images, prompts)
        details = {
            k: torch.tensor([float(getattr(v, k)) for v in verdicts])
            for k in ("score", "partial", "graded", "hallucinated", "missing", "misattributed")
        }
        if not self.task_modes:
            return RewardOutput(details[self.mode].clone(), details)
        modes = [self.task_modes.get(parse_prompt(p).task, self.mode) for p in prompts]
        scores = torch.tensor([float(getattr(v, m)) for v, m in zip(verdicts, modes, strict=True)])
        return RewardOutput(scores, details)
