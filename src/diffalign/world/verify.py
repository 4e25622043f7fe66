"""ShapesWorld verifier: image → detected objects → GenEval-style verdict.

Detection:
1. every pixel takes the nearest palette colour (or white) in RGB; pixels farther than
   ``MAX_COLOR_DIST`` from all of them (edge blends, noise) are left unassigned;
2. each colour's pixels form 8-connected components; those smaller than ``min_area``
   (12 px at 32×32) are specks, not objects;
3. each component's shape comes from its geometry: the fraction of its bounding box it fills
   (square ≈ 1, circle ≈ 0.75–0.85, apex-up triangle ≈ 0.5–0.6).

Verdict against the prompt (:class:`Verdict`): requested objects are matched to detections,
exact (colour and shape) matches first, then partial ones (same shape, wrong colour or the
reverse: *mis-attributed*); unmatched requests are *missing*; unmatched detections are
*hallucinated*. Constraints: one per requested object (an exact match), ``no_extra`` (no
hallucinated object), and for position prompts the relation between the two matched
objects. ``score`` is 1 when every constraint holds, ``partial`` the fraction that holds,
``graded`` a denser version of ``partial`` with credit for near misses (see :class:`Verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from diffalign.world.grammar import COLORS, PromptSpec, parse_prompt

_PALETTE = np.array(list(COLORS.values()) + [(255, 255, 255)], np.float32)
_NAMES = list(COLORS) + ["white"]
MAX_COLOR_DIST = 60.0
#: Minimum component area in pixels at 32×32 (scaled by area for larger canvases).
MIN_AREA_32 = 12
#: Minimum centroid offset on a relation's axis, in pixels at 32×32.
RELATION_MARGIN = 2.0
#: Width (pixels at 32×32) of the graded relation credit's sigmoid around the margin.
RELATION_SOFTNESS = 2.0
SQUARE_FILL, TRIANGLE_FILL = 0.9, 0.66
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    cx: float
    cy: float
    area: int
    fill: float


@dataclass
class Verdict:
    """The verifier's judgement of one image.

    score: 1.0 when every constraint holds, else 0.0. partial: fraction of constraints held.
    constraints: name → held. hallucinated / missing / misattributed: object counts.
    graded: a denser reward in [0, 1], close to ``partial`` where no constraint is near-missed:
    the mean over the same constraints of a credit in [0, 1] each — a requested object 1 if
    matched exactly, ½ if mis-attributed (right shape or right colour), 0 if missing;
    ``no_extra`` ``1/(1 + hallucinated)``; a relation ``sigmoid((offset − margin)/RELATION_SOFTNESS)``
    on the centroid offset of the two objects matched to it, times the smaller of their two
    credits (0 when one is missing).
    """

    score: float
    partial: float
    constraints: dict[str, bool]
    hallucinated: int
    missing: int
    misattributed: int
    detections: list[Detection] = field(default_factory=list)
    graded: float = 0.0

    def summary(self) -> str:
        failed = [k for k, v in self.constraints.items() if not v]
        found = ", ".join(f"{d.color} {d.shape}" for d in self.detections) or "nothing"
        verdict = "PASS" if self.score == 1.0 else "FAIL (" + ", ".join(failed) + ")"
        return f"{verdict}; saw {found}"


def classify_shape(fill: float) -> str:
    if fill >= SQUARE_FILL:
        return "square"
    if fill < TRIANGLE_FILL:
        return "triangle"
    return "circle"


def _label_colors(image_u8: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (0..5 colours, 6 white), -1 where no palette entry is close."""
    px = image_u8.astype(np.float32)
    d = np.sqrt(((px[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1))
    idx = d.argmin(-1)
    idx[d.min(-1) > MAX_COLOR_DIST] = -1
    return idx


def snap_to_palette(images: torch.Tensor) -> torch.Tensor:
    """Every pixel of ``images`` ``(B, 3, H, W)`` in [0, 1] set to its nearest palette colour
    or white (no distance cut-off): the image the verifier's colour labelling sees, without
    the pixel noise and edge blends of generated samples."""
    pal = torch.from_numpy(_PALETTE).to(images.device) / 255.0  # (P, 3)
    px = images.float().clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, 3)
    nearest = ((px[..., None, :] - pal) ** 2).sum(-1).argmin(-1)  # (B, H, W)
    return pal[nearest].permute(0, 3, 1, 2).contiguous()


def detect(image_u8: np.ndarray) -> list[Detection]:
    """Objects in one uint8 ``(H, W, 3)`` image, sorted top-to-bottom, left-to-right."""
    h = image_u8.shape[0]
    min_area = MIN_AREA_32 * (h / 32) ** 2
    labels = _label_colors(image_u8)
    out: list[Detection] = []
    for ci, name in enumerate(_NAMES[:-1]):
        comp, n = ndimage.label(labels == ci, structure=_EIGHT)
        if n == 0:
            continue
        for sl_i, sl in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[sl] == sl_i
            area = int(mask.sum())
            if area < min_area:
                continue
            bh, bw = mask.shape
            fill = area / float(bh * bw)
            ys, xs = np.nonzero(mask)
            out.append(
                Detection(name, classify_shape(fill), float(xs.mean() + sl[1].start + 0.5),
                          float(ys.mean() + sl[0].start + 0.5), area, fill)
            )
    out.sort(key=lambda d: (round(d.cy), d.cx))
    return out


def _relation_offset(a: Detection, b: Detection, relation: str) -> float:
    """Centroid offset of ``a`` from ``b`` along the relation's axis, positive when it holds."""
    return {
        "left of": b.cx - a.cx,
        "right of": a.cx - b.cx,
        "above": b.cy - a.cy,
        "below": a.cy - b.cy,
    }[relation]


def _exact(req, det: Detection) -> bool:
    return det.shape == req.shape and (req.color is None or det.color == req.color)


def _partial(req, det: Detection) -> bool:
    return det.shape == req.shape or (req.color is not None and det.color == req.color)


def judge(spec: PromptSpec, detections: list[Detection], size: int = 32) -> Verdict:
    """Compare detections with what ``spec`` asks for."""
    reqs = list(spec.objects)
    free = list(range(len(detections)))
    match: dict[int, int] = {}
    # Exact matches; requests with a fixed colour first so free-colour ones don't steal them.
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].color is None)
    for i in order:
        for j in free:
            if _exact(reqs[i], detections[j]):
                match[i] = j
                free.remove(j)
                break
    misattributed = 0
    loose: dict[int, int] = {}  # mis-attributed request → detection
    for i in order:
        if i in match:
            continue
        for j in free:
            if _partial(reqs[i], detections[j]):
                misattributed += 1
                loose[i] = j
                free.remove(j)
                break
    missing = len(reqs) - len(match) - misattributed
    constraints: dict[str, bool] = {}
    for i, r in enumerate(reqs):
        constraints[f"object{i}:{r.phrase()}"] = i in match
    constraints["no_extra"] = not free
    credit = [1.0 if i in match else 0.5 if i in loose else 0.0 for i in range(len(reqs))]
    credit.append(1.0 / (1 + len(free)))
    if spec.relation:
        pair = [match.get(i, loose.get(i)) for i in (0, 1)]
        off = None if None in pair else _relation_offset(detections[pair[0]], detections[pair[1]], spec.relation)
        margin, softness = RELATION_MARGIN * size / 32, RELATION_SOFTNESS * size / 32
        # strict: both objects matched exactly (then ``pair`` is that match) and beyond the margin
        constraints[f"relation:{spec.relation}"] = bool(0 in match and 1 in match and off > margin)
        # graded: a sigmoid around the margin; a relation between mis-attributed objects counts half
        credit.append(0.0 if off is None else
                      min(credit[0], credit[1]) * float(1 / (1 + np.exp(-(off - margin) / softness))))
    held = sum(constraints.values())
    return Verdict(
        score=float(held == len(constraints)),
        partial=held / len(constraints),
        constraints=constraints,
        hallucinated=len(free),
        missing=missing,
        misattributed=misattributed,
        detections=detections,
        graded=float(np.mean(credit)),
    )


def verify(image, prompt: str | PromptSpec) -> Verdict:
    """Judge one image (uint8 ``(H, W, 3)`` or float ``(3, H, W)`` in [0, 1]) against a prompt."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if isinstance(image, torch.Tensor):
        image = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return judge(spec, detect(image), size=image.shape[0])


def verify_batch(images: torch.Tensor, prompts: list[str]) -> list[Verdict]:
    """Judge a batch ``(B, 3, H, W)`` in [0, 1]."""
    u8 = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [judge(parse_prompt(p), detect(im), size=im.shape[0]) for im, p in zip(u8, prompts, strict=True)]
