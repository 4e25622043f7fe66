"""The parameter sets every policy exposes (DESIGN.md's Policy): ``"policy"`` (trainable),
``"reference"`` (the base: adapters off, or the frozen base weights for full fine-tuning),
and named snapshots (``"old"``, ``"sampler"``, ``"ema"``, SePPO checkpoints).

Snapshots and the full-FT reference are swapped in through an override dict that the
policy's forward passes to ``torch.func.functional_call``; nothing is written in place, so a
pending autograd graph of the trainable parameters stays valid.

A class using :class:`ParameterSets` sets ``_snapshots = {}``, ``_override = None``,
``_base_params`` (None with LoRA) and ``lora_rank``, and names its denoiser module in
``_denoiser_attr``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class ParameterSets:
    """Trainable state, the reference model and named snapshots of the trainable weights."""

    _denoiser_attr: str = "denoiser"
    lora_rank: int
    _snapshots: dict[str, dict[str, Tensor]]
    _override: dict[str, Tensor] | None
    _base_params: dict[str, Tensor] | None

    def _denoiser_module(self) -> nn.Module:
        return getattr(self, self._denoiser_attr)

    def trainable_state(self) -> dict[str, nn.Parameter]:
        """The ``"policy"`` parameter set: name → parameter (LoRA weights, or the whole denoiser)."""
        return {n: p for n, p in self._denoiser_module().named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.trainable_state().values())

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the base model: adapters off (LoRA) or the base weights swapped in (full FT)."""
        if self.lora_rank > 0:
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in self._denoiser_module().modules() if isinstance(m, BaseTunerLayer)]
            for m in layers:
                m.enable_adapters(False)
            try:
                yield
            finally:
                for m in layers:
                    m.enable_adapters(True)
        else:
            with self._swapped(self._base_params):
                yield

    def save_snapshot(self, name: str) -> None:
        """Copy the current trainable parameters into snapshot ``name``."""
        self._snapshots[name] = {k: p.detach().clone() for k, p in self.trainable_state().items()}

    def has_snapshot(self, name: str) -> bool:
        return name in self._snapshots

    def snapshot_names(self) -> list[str]:
        return list(self._snapshots)

    def drop_snapshot(self, name: str) -> None:
        self._snapshots.pop(name, None)

    @torch.no_grad()
    def ema_snapshot(self, name: str, decay: float) -> None:
        """``snapshot ← decay·snapshot + (1 − decay)·θ`` (creates it from θ if absent)."""
        if name not in self._snapshots:
            self.save_snapshot(name)
            return
        snap = self._snapshots[name]
        for k, p in self.trainable_state().items():
            snap[k].mul_(decay).add_(p.detach().to(snap[k].dtype), alpha=1 - decay)

    def snapshot_state(self) -> dict[str, dict[str, Tensor]]:
        """All snapshots (for checkpoints)."""
        return self._snapshots

    def load_snapshot_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Restore :meth:`snapshot_state` output, onto the device of the trainable weights."""
        params = self.trainable_parameters()
        dev = params[0].device if params else torch.device("cpu")
        self._snapshots = {n: {k: v.to(dev).clone() for k, v in s.items()} for n, s in state.items()}

    @contextlib.contextmanager
    def use_snapshot(self, name: str) -> Iterator[None]:
        """Temporarily run with snapshot ``name`` in place of the trainable parameters."""
        if name not in self._snapshots:
            raise KeyError(f"no snapshot named {name!r}; have {sorted(self._snapshots)}")
        with self._swapped(self._snapshots[name]):
            yield

    @contextlib.contextmanager
    def _swapped(self, values: dict[str, Tensor]) -> Iterator[None]:
        """Run forwards with ``values`` in place of the named parameters (nothing in place)."""
        previous = self._override
        self._override = {**(previous or {}), **values}
        try:
            yield
        finally:
            self._override = previous
