"""What samplers and algorithms see of a model (DESIGN.md contract)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Policy(Protocol):
    """A text-to-image model as the samplers and algorithms use it.

    Parameter sets: ``"policy"`` (trainable), ``"reference"`` (base, adapters off) entered
    with ``reference()``, and named snapshots (``"old"``, ``"sampler"``, SePPO checkpoints)
    swapped in by ``use_snapshot(name)``.
    """

    prediction: Literal["flow", "epsilon"]

    def encode(self, prompts: list[str]) -> Any: ...  # cached, batched Conditioning

    def predict(self, x: Tensor, t: Any, cond: Any, guidance_scale: float = 1.0) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...  # images in [0, 1]

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]: ...

    def reference(self) -> AbstractContextManager[None]: ...

    def use_snapshot(self, name: str) -> AbstractContextManager[None]: ...

    def save_snapshot(self, name: str) -> None: ...

    def trainable_parameters(self) -> list: ...


def sampling_weights(policy: Any) -> AbstractContextManager:
    """The policy's optional ``sampling_weights()`` context — a faster, numerically equivalent
    set of weights for gradient-free forwards, e.g. LoRA merged into the base weights
    (:meth:`~diffalign.models.tiny.TinyFlowPolicy.sampling_weights`) — or a no-op for a policy
    without one. Samplers enter it around a whole rollout."""
    enter = getattr(policy, "sampling_weights", None)
    return enter() if callable(enter) else nullcontext()


def with_sampling_weights(sampler: Callable) -> Callable:
    """Decorator for a sampling function whose first argument is the policy: the whole call
    runs inside :func:`sampling_weights`."""

    @functools.wraps(sampler)
    def wrapped(policy: Any, *args: Any, **kwargs: Any) -> Any:
        with sampling_weights(policy):
            return sampler(policy, *args, **kwargs)

    return wrapped
