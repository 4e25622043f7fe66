"""ShapesScore: a small learned image–text preference model for ShapesWorld (a proxy reward).

Like PickScore or HPS it is *good but not exact*: it is trained on pairs (a correct image
beats a near-miss or a base-model failure of the same prompt) and scores any image against
any prompt, but it can be fooled where its training data was thin. That is the point: train
a policy on ShapesScore, judge it with the exact verifier, and reward hacking is measured
exactly. ``docs/proxy_reward.md`` records its held-out accuracy and its blind spots.

Architecture (:class:`ShapesScoreNet`): a 4-stage CNN over the 32×32 image (plus two
coordinate channels, so that positions are visible to it), each stage modulated (FiLM: scale
and shift) by the frozen MiniLM mean-pooled sentence embedding of the prompt, then a linear
head over the flattened 4×4 feature map. It outputs a logit ``s``; the reward is
``sigmoid(s)``, trained to be the probability that the image satisfies the prompt (so it is
comparable with the verifier's 0/1 score), and pairs are ranked by ``s``.

Checkpoint: one safetensors file with metadata ``format`` (= ``diffalign.shapes-score/1``),
``config`` (JSON of :class:`ShapesScoreConfig`) and ``info`` (JSON: how it was trained and
its held-out pair accuracy).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.errors import CheckpointError
from diffalign.models.text import TEXT_DIM, shared_text_encoder
from diffalign.rewards.base import RewardOutput, register_reward

FORMAT = "diffalign.shapes-score/1"
SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "shapes_score.safetensors"


@dataclass(frozen=True)
class ShapesScoreConfig:
    """Architecture of :class:`ShapesScoreNet` (stored in every checkpoint)."""

    channels: tuple[int, ...] = (16, 32, 48, 64)
    """Channels of the four conv stages (32, 16, 8, 4 px)."""
    text_dim: int = TEXT_DIM
    """Width of the pooled sentence embedding."""
    hidden: int = 128
    """Width of the head's hidden layer."""
    image_size: int = 32
    """Input image side in pixels."""

    @staticmethod
    def from_dict(d: dict) -> ShapesScoreConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return ShapesScoreConfig(**d)


class _Stage(nn.Module):
    """conv 3×3 (stride 1 on the first stage, 2 after) → GroupNorm → FiLM(text) → SiLU → conv 3×3 → SiLU."""

    def __init__(self, cin: int, cout: int, stride: int, text_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(8, cout)
        self.film = nn.Linear(text_dim, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv1(x))
        scale, shift = self.film(text)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        return F.silu(self.conv2(h))


class ShapesScoreNet(nn.Module):
    """Image ``(B, 3, H, W)`` in [0, 1] + pooled text ``(B, 384)`` → logit ``(B,)``."""

    def __init__(self, config: ShapesScoreConfig | None = None):
        super().__init__()
        self.config = cfg = config or ShapesScoreConfig()
        chans = (5, *cfg.channels)  # RGB + (x, y) coordinates
        self.stages = nn.ModuleList(
            _Stage(chans[i], chans[i + 1], 1 if i == 0 else 2, cfg.text_dim) for i in range(len(cfg.channels))
        )
        side = cfg.image_size // 2 ** (len(cfg.channels) - 1)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.hidden)
        self.head = nn.Sequential(nn.Linear(cfg.channels[-1] * side * side, cfg.hidden), nn.SiLU())
        self.out = nn.Linear(cfg.hidden, 1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([images * 2 - 1, xs, ys], dim=1)
        for stage in self.stages:
            x = stage(x, text)
        feat = self.head(x.flatten(1))
        return self.out(feat * (1 + self.text_proj(text))).squeeze(1)


def save_shapes_score(path: str | Path, model: ShapesScoreNet, info: dict | None = None) -> Path:
    """Write ``model`` as a ShapesScore checkpoint (atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().float().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.config)), "info": json.dumps(info or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_shapes_score(path: str | Path | None = None) -> tuple[ShapesScoreNet, dict]:
    """Load a ShapesScore checkpoint (``None``: the shipped one). Returns ``(model, info)``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else SHIPPED
    if not path.is_file():
        hint = ("the shipped ShapesScore checkpoint is missing; rebuild it with 'diffalign data proxy-pairs' "
                "and 'diffalign proxy train'") if path == SHIPPED else "check the path"
        raise CheckpointError(f"ShapesScore checkpoint not found: {path} ({hint})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"ShapesScore checkpoint {path} is corrupt or not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ShapesScore checkpoint (format {meta.get('format')!r}, expected "
                              f"{FORMAT!r}); a tiny flow-model checkpoint cannot be used as a reward model")
    try:
        model = ShapesScoreNet(ShapesScoreConfig.from_dict(json.loads(meta["config"])))
        model.load_state_dict(load_file(str(path)))
    except (KeyError, TypeError, json.JSONDecodeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"ShapesScore checkpoint {path} does not match its recorded architecture: {first}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, json.loads(meta.get("info", "{}"))


def text_features(prompts: list[str]) -> torch.Tensor:
    """Pooled MiniLM sentence embeddings ``(B, 384)`` (cached per prompt)."""
    return shared_text_encoder()(list(prompts)).pooled


@register_reward("shapes_score")
class ShapesScore:
    """The learned ShapesWorld proxy reward.

    scores: ``sigmoid(logit)`` in (0, 1), the model's probability that the image satisfies
    the prompt. details: ``logit``. ``checkpoint``: a ShapesScore file (default: the shipped
    one). Differentiable in the images when called on tensors that require grad.
    """

    name = "shapes_score"

    def __init__(self, checkpoint: str | None = None, batch_size: int = 512):
        self.model, self.info = load_shapes_score(checkpoint)
        self.batch_size = batch_size

    @property
    def input_sizes(self) -> tuple[int, ...]:
        """The one image side the checkpoint was trained on (enforced before scoring)."""
        return (self.model.config.image_size,)

    def logits(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        size = self.model.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != size or images.shape[-2] != size:
            raise CheckpointError(f"ShapesScore takes (B, 3, {size}, {size}) images; got {tuple(images.shape)}")
        text = text_features(prompts)
        outs = []
        for i in range(0, len(prompts), self.batch_size):
            outs.append(self.model(images[i : i + self.batch_size].float(), text[i : i + self.batch_size]))
        return torch.cat(outs) if outs else torch.zeros(0)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        logit = self.logits(images, prompts)
        return RewardOutput(torch.sigmoid(logit), {"logit": logit.detach()})
