"""ShapesWorld's exact verifier as a reward."""

from __future__ import annotations

import torch

from diffalign.errors import ConfigError
from diffalign.rewards.base import RewardOutput, check_input, register_reward
from diffalign.world.render import SUPPORTED_SIZES
from diffalign.world.verify import verify_batch


@register_reward("shapes_verifier")
class VerifierReward:
    """Reward from the exact ShapesWorld verifier.

    mode: ``partial`` (fraction of the prompt's constraints held: dense), ``graded`` (partial
    credit for near misses too: mis-attributed objects, fewer extra objects, a relation's
    margin; :class:`~diffalign.world.verify.Verdict`) or ``score`` (1 only when all hold:
    GenEval's strict score). details: ``score``, ``partial``, ``graded``, ``hallucinated``,
    ``missing``, ``misattributed`` per image. Images are ShapesWorld canvases: ``(B, 3, S, S)``
    with ``S`` in ``input_sizes`` (32 or 64); another size raises
    :class:`~diffalign.rewards.base.RewardInputError` (a ValueError) naming them.
    """

    input_sizes = SUPPORTED_SIZES

    def __init__(self, mode: str = "partial"):
        if mode not in ("partial", "graded", "score"):
            raise ConfigError(f"shapes_verifier mode={mode!r}; choose partial, graded or score")
        self.mode = mode
        self.name = f"shapes_verifier[{mode}]"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        check_input(self, images)  # its thresholds are in pixels of ShapesWorld's canvases
        verdicts = verify_batch(images, prompts)
        details = {
            k: torch.tensor([float(getattr(v, k)) for v in verdicts])
            for k in ("score", "partial", "graded", "hallucinated", "missing", "misattributed")
        }
        return RewardOutput(details[self.mode].clone(), details)
