"""CLIP-based rewards: PickScore and CLIPScore, through ``transformers``' CLIP classes.

Both embed the image and the prompt with a CLIP model and compare them by cosine similarity:

- ``pickscore`` (Kirstain et al., 2023): ``s = scale · exp(logit_scale) · cos(img, txt)`` with the
  PickScore_v1 weights (a fine-tuned CLIP-H/14); its logit scale is ≈ 100, so raw scores sit
  around 20–23. Flow-GRPO trains on ``scale = 1/26``.
- ``clipscore`` (Hessel et al., 2021): ``s = w · max(cos(img, txt), 0)`` with ``w = 2.5``.

Weights load from a **local directory** (``save_pretrained`` layout: ``config.json``,
``model.safetensors``, tokenizer and ``preprocessor_config.json``) or a hub id already in the
local Hugging Face cache; nothing is downloaded at run time.

Images are preprocessed in torch, on the model's device, with the processor's own settings
(resize shortest side with antialiased bicubic, centre crop, normalise), which matches
``CLIPProcessor`` on the same uint8 images to within interpolation rounding.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from diffalign.errors import ConfigError
from diffalign.rewards.base import RewardOutput, register_reward

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load(loader, path: str, what: str, hint: str, **kwargs):
    """``loader.from_pretrained(path)`` without network access, with an error that says what to do."""
    local = Path(path).expanduser()
    try:
        if local.is_dir():
            return loader.from_pretrained(str(local), **kwargs)
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        where = f"directory {local}" if local.is_dir() else f"{path!r}, which is not a local directory"
        raise ConfigError(
            f"could not load the {what} from {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"diffalign never downloads weights at run time: fetch them once, e.g. "
            f"`huggingface-cli download {hint} --local-dir /models/{hint.split('/')[-1]}`, and pass that directory"
        ) from e


def resize_crop_normalize(images: torch.Tensor, shortest_edge: int, crop: tuple[int, int],
                          mean: list[float], std: list[float]) -> torch.Tensor:
    """CLIP preprocessing of ``(B, 3, H, W)`` images in [0, 1] → normalised ``(B, 3, crop_h, crop_w)``.

    Resize so the short side is ``shortest_edge`` (long side ``int(edge · long / short)``, as
    transformers computes it) with antialiased bicubic (PIL's filter), centre-crop, then
    ``(x − mean) / std`` per channel.
    """
    x = images.float().clamp(0, 1)
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(shortest_edge * long / short)
    size = (shortest_edge, new_long) if h <= w else (new_long, shortest_edge)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = x.mul(255).round().clamp(0, 255).div(255)  # the processor resizes uint8 images
    ch, cw = crop
    top, left = max(0, (size[0] - ch) // 2), max(0, (size[1] - cw) // 2)
    x = x[..., top : top + ch, left : left + cw]
    if x.shape[-2:] != (ch, cw):  # image smaller than the crop: pad with zeros like the processor
        ph, pw = ch - x.shape[-2], cw - x.shape[-1]
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _field(size, key: str):
    """``size[key]`` of an image processor's size setting (a dict, transformers 5's SizeDict, or an int)."""
    if isinstance(size, int):
        return size
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    if value is None and not isinstance(size, dict):
        try:
            value = size[key]
        except (KeyError, TypeError):
            value = None
    return value


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected embedding; 5.x a ModelOutput with it as pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipSimilarity:
    """A CLIP model + tokenizer + image preprocessing, giving ``cos(image, prompt)`` per image.

    Args:
        model_path: directory of a ``CLIPModel`` (or a hub id present in the local cache).
        processor_path: directory of the tokenizer and image-processor config (default:
            ``model_path``; PickScore takes them from the CLIP-H repository).
        device: ``cuda``, ``cpu``, ... (default: CUDA when available).
        dtype: ``float32``, ``float16`` or ``bfloat16`` weights.
        batch_size: images per forward pass.
        hint: the hub id suggested in the error message when loading fails.
    """

    def __init__(self, model_path: str, processor_path: str | None = None, *, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32, hint: str = "openai/clip-vit-large-patch14"):
        from transformers import CLIPModel, CLIPProcessor

        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if not model_path:
            raise ConfigError(f"give model_path: a local directory with the CLIP weights (e.g. {hint})")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size
        self.model = _load(CLIPModel, model_path, "CLIP model", hint, dtype=self.dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        processor = _load(CLIPProcessor, processor_path or model_path, "CLIP processor (tokenizer + image config)",
                          hint)
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        edge = _field(ip.size, "shortest_edge") or min(_field(ip.size, "height"), _field(ip.size, "width"))
        self.shortest_edge = int(edge)
        self.crop = (int(_field(ip.crop_size, "height")), int(_field(ip.crop_size, "width")))
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)
        self.max_length = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                              int(self.model.config.text_config.max_position_embeddings))
        self.logit_scale = float(self.model.logit_scale.exp())
        self._text_cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return resize_crop_normalize(images.to(self.device), self.shortest_edge, self.crop, self.mean, self.std)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``(len(prompts), D)``; each distinct prompt is encoded once and cached."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        for s in range(0, len(new), self.batch_size):
            chunk = new[s : s + self.batch_size]
            tok = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                         attention_mask=tok["attention_mask"])).float()
            for p, e in zip(chunk, F.normalize(emb, dim=-1), strict=True):
                self._text_cache[p] = e
        if len(self._text_cache) > 100_000:  # bound memory on endless prompt streams
            self._text_cache = {p: self._text_cache[p] for p in dict.fromkeys(prompts)}
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``(B, D)`` of ``(B, 3, H, W)`` images in [0, 1]."""
        outs = []
        for s in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[s : s + self.batch_size]).to(self.dtype)
            outs.append(F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1))
        return torch.cat(outs)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B,)`` cosine similarity of each image with its prompt (CPU float32)."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"expected images (B, 3, H, W) with one prompt each; got {tuple(images.shape)} "
                             f"for {len(prompts)} prompts")
        with self._lock:  # one forward at a time: the text cache is shared
            return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1).cpu()


@register_reward("pickscore")
class PickScore:
    """PickScore: ``scale · exp(logit_scale) · cos(image, prompt)``.

    Args:
        model_path: directory of ``yuvalkirstain/PickScore_v1``.
        processor_path: directory of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (its tokenizer and
            preprocessor config; default: ``model_path``).
        scale: multiplies the score (Flow-GRPO: 1/26 ≈ 0.0385).
        device, dtype, batch_size: see :class:`ClipSimilarity`.
    """

    def __init__(self, model_path: str = "", processor_path: str | None = None, scale: float = 1.0,
                 device: str | None = None, dtype: str = "float32", batch_size: int = 32):
        if not math.isfinite(scale):
            raise ConfigError(f"pickscore scale must be finite, got {scale}")
        self.clip = ClipSimilarity(model_path, processor_path, device=device, dtype=dtype, batch_size=batch_size,
                                   hint="yuvalkirstain/PickScore_v1")
        self.scale = scale
        self.name = "pickscore"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        cos = self.clip.cosine(images, prompts)
        return RewardOutput(self.scale * self.clip.logit_scale * cos, {"cosine": cos})


@register_reward("clipscore")
class ClipScore:
    """CLIPScore: ``weight · max(cos(image, prompt), 0)`` (Hessel et al.; weight 2.5).

    Args:
        model_path: directory of a CLIP model, e.g. ``openai/clip-vit-large-patch14``.
        processor_path: tokenizer / preprocessor directory (default: ``model_path``).
        weight: the ``w`` of CLIPScore.
        device, dtype, batch_size: see :class:`ClipSimilarity`.
    """

    def __init__(self, model_path: str = "", processor_path: str | None = None, weight: float = 2.5,
                 device: str | None = None, dtype: str = "float32", batch_size: int = 32):
        self.clip = ClipSimilarity(model_path, processor_path, device=device, dtype=dtype, batch_size=batch_size)
        self.weight = weight
        self.name = "clipscore"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        cos = self.clip.cosine(images, prompts)
        return RewardOutput(self.weight * cos.clamp_min(0), {"cosine": cos})
