"""OCR reward (Flow-GRPO's text-rendering task): does the image show the prompt's quoted text?

The target text is the part of the prompt inside double quotes (``a sign that says "OPEN"``
→ ``OPEN``; several quoted spans are joined with a space), or ``metadata[i]["text"]`` when
given. The image is read with RapidOCR (PP-OCR models run by onnxruntime; the models ship
inside the ``rapidocr`` wheel, nothing is downloaded). Both strings are lower-cased and
stripped of whitespace, then::

    score = 1 − min(edit_distance(recognised, target), len(target)) / len(target)

so 1 is an exact match and 0 is nothing right (or no text found).
"""

from __future__ import annotations

import re
import threading

import numpy as np
import torch

from diffalign.errors import ConfigError
from diffalign.rewards.base import RewardOutput, register_reward

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to be written: its double-quoted spans joined by a space.

    Raises:
        ConfigError: the prompt has no quoted text.
    """
    spans = [a or b for a, b in _QUOTED.findall(prompt)]
    if not spans:
        raise ConfigError(
            f"ocr reward: prompt {prompt!r} has no quoted text; OCR prompts put the text to render in "
            f'double quotes, e.g. \'a shop sign that says "OPEN"\' (or pass metadata {{"text": ...}})'
        )
    return " ".join(spans)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def ocr_text_score(recognised: str, target: str) -> tuple[float, int]:
    """``(score, distance)``: Flow-GRPO's OCR score of ``recognised`` text against ``target``."""
    rec, tgt = _normalise(recognised), _normalise(target)
    if not tgt:
        raise ConfigError(f"ocr reward: the target text {target!r} is empty after removing whitespace")
    dist = min(edit_distance(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt), dist


@register_reward("ocr")
class OcrReward:
    """Edit-distance OCR reward read by RapidOCR (rapidocr 3.x + onnxruntime).

    Args:
        detect: run the text detector first and read every detected line (right for
            photographs and generated scenes, where the text is a small part of the image;
            ~0.1–0.5 s per image on a CPU). ``False`` reads the whole image as one text line
            with the recogniser only (~10–50 ms; for images that are mostly text).
        min_confidence: recognised lines below this confidence are ignored.
        threads: onnxruntime intra-op threads (-1 = onnxruntime's default).
    """

    def __init__(self, detect: bool = True, min_confidence: float = 0.0, threads: int = -1):
        try:
            from rapidocr import RapidOCR
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ConfigError("the ocr reward needs rapidocr and onnxruntime: pip install rapidocr onnxruntime") from e
        self.detect = detect
        self.min_confidence = min_confidence
        self.name = "ocr" if detect else "ocr[rec-only]"
        self._engine = RapidOCR(params={
            "Global.use_det": detect,
            "Global.use_cls": False,
            "Global.log_level": "warning",
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        })
        self._lock = threading.Lock()  # the engine keeps per-call settings in shared state

    def read(self, image: np.ndarray) -> tuple[str, float]:
        """Text and mean confidence read from one ``(H, W, 3)`` uint8 RGB image."""
        with self._lock:
            out = self._engine(np.ascontiguousarray(image[:, :, ::-1]))  # RapidOCR takes BGR arrays
        txts, scores = getattr(out, "txts", None) or (), getattr(out, "scores", None) or ()
        kept = [(t, float(s)) for t, s in zip(txts, scores, strict=False) if float(s) >= self.min_confidence]
        if not kept:
            return "", 0.0
        return " ".join(t for t, _ in kept), sum(s for _, s in kept) / len(kept)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        targets = [(m or {}).get("text") or quoted_text(p) for p, m in zip(prompts, metadata, strict=True)]
        u8 = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores, dists, confs = [], [], []
        for img, target in zip(u8, targets, strict=True):
            text, conf = self.read(img)
            s, d = ocr_text_score(text, target)
            scores.append(s)
            dists.append(float(d))
            confs.append(conf)
        return RewardOutput(torch.tensor(scores, dtype=torch.float32),
                            {"edit_distance": torch.tensor(dists), "ocr_confidence": torch.tensor(confs)})
