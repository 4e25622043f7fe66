"""ShapesWorld's exact verifier as a reward."""

from __future__ import annotations

import torch

from diffalign.errors import ConfigError
from diffalign.rewards.base import RewardOutput, register_reward
from diffalign.world.verify import verify_batch


@register_reward("shapes_verifier")
class VerifierReward:
    """Reward from the exact ShapesWorld verifier.

    mode: ``partial`` (fraction of the prompt's constraints held: dense), ``graded`` (partial
    credit for near misses too: mis-attributed objects, fewer extra objects, a relation's
    margin; :class:`~diffalign.world.verify.Verdict`) or ``score`` (1 only when all hold:
    GenEval's strict score). details: ``score``, ``partial``, ``graded``, ``hallucinated``,
    ``missing``, ``misattributed`` per image.
    """

    def __init__(self, mode: str = "partial"):
        if mode not in ("partial", "graded", "score"):
            raise ConfigError(f"shapes_verifier mode={mode!r}; choose partial, graded or score")
        self.mode = mode
        self.name = f"shapes_verifier[{mode}]"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        verdicts = verify_batch(images, prompts)
        details = {
            k: torch.tensor([float(getattr(v, k)) for v in verdicts])
            for k in ("score", "partial", "graded", "hallucinated", "missing", "misattributed")
        }
        return RewardOutput(details[self.mode].clone(), details)
