"""What every diffusers adapter (``sd3``, ``flux``, ``sd15``) shares.

- :class:`DiffusersConditioning`: cached text encodings of a batch (sequence + pooled).
- :func:`local_model_dir`: resolve a model directory, with a clear error for hub ids
  (nothing is ever downloaded).
- :class:`PromptCache`: a bounded, thread-safe per-prompt cache of encodings.
- :class:`AdapterPolicy`: the ``Policy`` machinery on top of a diffusers denoiser
  (transformer or UNet) and VAE, exactly as :class:`~diffalign.models.tiny.TinyFlowPolicy`
  does it for the tiny model: batched classifier-free guidance, VAE decode to ``[0, 1]``,
  LoRA (peft ``inject_adapter_in_model``) or full fine-tuning, the reference model (adapters
  off, or the frozen base weights), named snapshots of the trainable weights swapped in with
  ``torch.func.functional_call``, mixed precision (bf16 / fp16 weights, float32 sampler math,
  float32 LoRA weights) and gradient checkpointing.

A family adapter subclasses it and supplies ``encode`` (its text encoders) and ``_denoise``
(one forward of its denoiser in its own conventions: timestep scaling, latent packing).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffalign.errors import CheckpointError, ConfigError
from diffalign.models.parameter_sets import ParameterSets

__all__ = ["DTYPES", "AdapterPolicy", "DiffusersConditioning", "PromptCache", "local_model_dir", "parse_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: How to make a local copy of a hub model, per family (shown in errors).
_EXAMPLE_IDS = {
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` → ``torch.bfloat16`` (and fp16, fp32)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return DTYPES[name]


def local_model_dir(path: str | Path | None, family: str, subfolders: Sequence[str]) -> Path:
    """The local pipeline directory ``path``, checked to hold ``subfolders`` (each with a
    ``config.json`` or tokenizer files). Hub ids and missing paths fail with how to make a
    local copy: diffalign never downloads a model."""
    example = _EXAMPLE_IDS.get(family, "<hub id>")
    how = (f"make a local copy first, e.g. `huggingface-cli download {example} --local-dir /models/{family}` "
           "(or load the pipeline once with diffusers and call .save_pretrained(DIR)), then pass "
           f"model=/models/{family}")
    if path is None:
        raise ConfigError(f"model_family={family} needs model=<local pipeline directory>; {how}")
    p = Path(path).expanduser()
    if not p.exists():
        looks_like_hub = "/" in str(path) and not str(path).startswith(("/", ".", "~")) and str(path).count("/") == 1
        what = "looks like a hub id, not a local directory" if looks_like_hub else "does not exist"
        raise CheckpointError(f"model {str(path)!r} {what}; diffalign loads {family} models only from a local "
                              f"directory and never downloads: {how}")
    if not p.is_dir():
        raise CheckpointError(f"model {str(p)!r} is a file; a {family} model is a diffusers pipeline directory "
                              f"(with {', '.join(subfolders)}/ inside); {how}")
    missing = [s for s in subfolders if not (p / s).is_dir()]
    if missing:
        raise CheckpointError(f"{p} is not a complete {family} pipeline directory: missing subfolder(s) "
                              f"{', '.join(missing)}; {how}")
    return p


@dataclass
class DiffusersConditioning:
    """Text conditioning of a batch for a diffusers denoiser.

    embeds: ``(B, L, D)`` token embeddings (model dtype) — SD3: CLIP-L ⊕ CLIP-G penultimate
        states zero-padded to the T5 width, then T5 along the sequence; FLUX: T5; SD1.5: CLIP.
    pooled: ``(B, P)`` pooled embedding (SD3: both CLIP projections; FLUX: CLIP pooler), or
        None (SD1.5).
    """

    embeds: Tensor
    pooled: Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> DiffusersConditioning:
        return DiffusersConditioning(fn(self.embeds), None if self.pooled is None else fn(self.pooled))

    def index(self, idx) -> DiffusersConditioning:
        if isinstance(idx, Tensor):
            idx = idx.to(self.embeds.device)
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, k: int) -> DiffusersConditioning:
        return self._map(lambda t: t.repeat_interleave(k, dim=0))

    def expand(self, batch: int) -> DiffusersConditioning:
        """A batch-1 conditioning repeated to ``batch`` rows (a view)."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def to(self, device=None, dtype=None) -> DiffusersConditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    @staticmethod
    def cat(items: list[DiffusersConditioning]) -> DiffusersConditioning:
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return DiffusersConditioning(torch.cat([c.embeds for c in items]), pooled)


class PromptCache:
    """Per-prompt encodings, least-recently-used entries dropped past ``max_prompts``.

    ``get(prompts, encode_new)`` returns the stacked encodings of ``prompts``, calling
    ``encode_new(list_of_new_prompts) -> (embeds (N, L, D), pooled (N, P) | None)`` once
    for the prompts not cached yet (in batches of ``batch``). Thread-safe."""

    def __init__(self, max_prompts: int = 1024, batch: int = 64):
        if max_prompts < 1:
            raise ConfigError(f"max_cached_prompts must be >= 1; got {max_prompts}")
        self.max_prompts, self.batch = max_prompts, batch
        self._items: OrderedDict[str, tuple[Tensor, Tensor | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, prompts: Sequence[str], encode_new) -> DiffusersConditioning:
        prompts = list(prompts)
        with self._lock:
            found: dict[str, tuple[Tensor, Tensor | None]] = {}
            for p in dict.fromkeys(prompts):
                if p in self._items:
                    self._items.move_to_end(p)
                    found[p] = self._items[p]
            new = [p for p in dict.fromkeys(prompts) if p not in found]
            for i in range(0, len(new), self.batch):
                part = new[i : i + self.batch]
                with torch.no_grad():
                    embeds, pooled = encode_new(part)
                for j, p in enumerate(part):
                    found[p] = (embeds[j].detach().clone(), None if pooled is None else pooled[j].detach().clone())
                    self._items[p] = found[p]
            while len(self._items) > self.max_prompts:
                self._items.popitem(last=False)
        rows = [found[p] for p in prompts]
        embeds = torch.stack([r[0] for r in rows])
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return DiffusersConditioning(embeds, pooled)


def _linear_suffixes(model: nn.Module, limit: int = 12) -> str:
    """Distinct trailing names of the ``nn.Linear`` / ``nn.Conv2d`` layers (for error messages)."""
    names = {".".join(n.split(".")[-2:]) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names = sorted(names)
    return ", ".join(names[:limit]) + (" …" if len(names) > limit else "")


class AdapterPolicy(ParameterSets, nn.Module):
    """``Policy`` machinery around a diffusers denoiser and VAE (see the module docstring).

    Subclasses set ``prediction`` and implement ``encode(prompts)`` and
    ``_denoise(x, t, cond, guidance) -> Tensor`` (float32). Attributes:

    - ``denoiser``: the transformer / UNet (LoRA-injected when ``lora_rank > 0``);
    - ``vae``: frozen ``AutoencoderKL`` (in ``vae_dtype``);
    - ``image_size``: the square image side the rollouts generate, in pixels;
    - ``dtype``: the denoiser's weight dtype; LoRA weights are float32.
    """

    prediction = "flow"
    family = "diffusers"
    #: LoRA targets when none are given (set by each family).
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: Spatial downsampling of the denoiser's own patching (2 for SD3 / FLUX packing).
    patch_multiple = 1

    def __init__(self, denoiser: nn.Module, vae: nn.Module, *, image_size: int, lora_rank: int = 0,
                 lora_alpha: float | None = None, lora_targets: Sequence[str] | None = None,
                 lora_dropout: float = 0.0, dtype: str | torch.dtype = "bfloat16",
                 vae_dtype: str | torch.dtype = "float32", gradient_checkpointing: bool = False,
                 max_cached_prompts: int = 1024):
        super().__init__()
        self.dtype = parse_dtype(dtype)
        self.vae_dtype = parse_dtype(vae_dtype)
        self.lora_rank = int(lora_rank)
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0 = full fine-tuning); got {lora_rank}")
        self.lora_targets = tuple(lora_targets or self.default_lora_targets)
        self.image_size = int(image_size)
        if next(denoiser.parameters()).dtype != self.dtype:
            denoiser = denoiser.to(self.dtype)
        if next(vae.parameters()).dtype != self.vae_dtype:
            vae = vae.to(self.vae_dtype)
        vae.eval()
        vae.requires_grad_(False)
        self.vae = vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_shape(self.image_size, self.image_size)  # validate the size early
        if self.lora_rank > 0:
            denoiser = self._inject_lora(denoiser, lora_alpha, lora_dropout)
            self._base_params = None
        else:
            denoiser.requires_grad_(True)
            # Full fine-tuning: a frozen copy of the base weights is the reference model.
            self._base_params = {k: v.detach().clone() for k, v in denoiser.named_parameters()}
        self.denoiser = denoiser
        if gradient_checkpointing:
            if not getattr(denoiser, "_supports_gradient_checkpointing", False):
                raise ConfigError(f"{type(denoiser).__name__} does not support gradient checkpointing")
            denoiser.enable_gradient_checkpointing()
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._cache = PromptCache(max_cached_prompts)
        self._snapshots: dict[str, dict[str, Tensor]] = {}
        self._override: dict[str, Tensor] | None = None
        self._frozen: list[nn.Module] = [vae]

    # -- construction helpers ------------------------------------------------------------
    def _inject_lora(self, denoiser: nn.Module, lora_alpha: float | None, lora_dropout: float) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=self.lora_rank, lora_alpha=lora_alpha or self.lora_rank,
                         target_modules=list(self.lora_targets), lora_dropout=lora_dropout, init_lora_weights=True)
        try:
            denoiser = inject_adapter_in_model(cfg, denoiser)
        except ValueError as e:
            raise ConfigError(f"LoRA target modules {list(self.lora_targets)} match no layer of "
                              f"{type(denoiser).__name__} ({e}); layer names it has end with: "
                              f"{_linear_suffixes(denoiser)}") from e
        for n, p in denoiser.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()  # float32 adapter weights over a bf16 / fp16 base
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
        return denoiser

    def _freeze(self, *modules: nn.Module | None) -> None:
        """Text encoders: frozen, always in eval mode (T5 has dropout)."""
        for m in modules:
            if m is not None:
                m.requires_grad_(False)
                m.eval()
                self._frozen.append(m)

    def train(self, mode: bool = True) -> AdapterPolicy:
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .cuda() also move the reference copy (full FT) and the snapshots
        super()._apply(fn, recurse)
        if getattr(self, "_base_params", None):
            self._base_params = {k: fn(v) for k, v in self._base_params.items()}
        if getattr(self, "_snapshots", None):
            self._snapshots = {n: {k: fn(v) for k, v in s.items()} for n, s in self._snapshots.items()}
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # -- Policy protocol -------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> DiffusersConditioning:  # pragma: no cover - abstract
        raise NotImplementedError

    def _denoise(self, x: Tensor, t: Tensor, cond: DiffusersConditioning, guidance: Tensor | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def null_conditioning(self, batch: int) -> DiffusersConditioning:
        """The unconditional input for CFG: the encoding of the empty prompt."""
        return self.encode([""]).expand(batch)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        m = self.vae_scale_factor * self.patch_multiple
        if height % m or width % m:
            raise ConfigError(f"{self.family} image sides must be multiples of {m} (VAE factor "
                              f"{self.vae_scale_factor} × patch {self.patch_multiple}); got {height}×{width}")
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _timesteps(self, t, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if not t.is_floating_point() and self.prediction == "flow":
            t = t.float()
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def predict(self, x: Tensor, t, cond: DiffusersConditioning, guidance_scale: float = 1.0) -> Tensor:
        """Velocity (flow) or ε; with ``guidance_scale != 1`` classifier-free guidance in one
        batched forward, ``out = out_u + w·(out_c − out_u)``. Returns float32."""
        t = self._timesteps(t, x)
        if guidance_scale == 1.0:
            return self._denoise(x, t, cond, None).float()
        both = DiffusersConditioning.cat([self.null_conditioning(x.shape[0]), cond.to(x.device)])
        out = self._denoise(torch.cat([x, x]), torch.cat([t, t]), both, None).float()
        out_u, out_c = out.chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, h, w)`` (scaled, shifted as the denoiser sees them) → images
        ``(B, 3, H, W)`` in [0, 1], float32."""
        z = latents.to(self.vae.device, self.vae_dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: Tensor, *, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] → latents (float32) in the denoiser's space: the
        VAE posterior mean (``sample=False``) or a draw from it."""
        x = images.to(self.vae.device, self.vae_dtype) * 2 - 1
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return ((z.float() - self.shift_factor) * self.scaling_factor).float()

    def _run(self, **kwargs) -> Tensor:
        """One denoiser forward (``return_dict=False``), with the active parameter override."""
        kwargs["return_dict"] = False
        if self._override:
            with self._checkpointing_off():
                out = torch.func.functional_call(self.denoiser, self._override, (), kwargs, strict=False)
        else:
            out = self.denoiser(**kwargs)
        return out[0]

    @contextlib.contextmanager
    def _checkpointing_off(self) -> Iterator[None]:
        """Gradient checkpointing would recompute a swapped-in forward after the swap ended;
        swapped forwards (reference, snapshots) therefore run without it."""
        mods = [m for m in self.denoiser.modules() if getattr(m, "gradient_checkpointing", False) is True]
        for m in mods:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in mods:
                m.gradient_checkpointing = True

    # -- parameter sets ----------------------------------------------------------------------
    def save_trainable(self, path: str | Path) -> Path:
        """The trainable parameters (LoRA weights in peft naming, or the full denoiser) as a
        safetensors file."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.trainable_state().items()}, str(path))
        return path


def load_tokenizer(root: Path, subfolder: str):
    """A tokenizer saved in ``root/subfolder`` (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root / subfolder), local_files_only=True)


def load_component(cls, root: Path, subfolder: str, dtype: torch.dtype):
    """A diffusers or transformers model saved in ``root/subfolder`` (offline), in ``dtype``."""
    # diffusers takes torch_dtype; transformers >= 5 takes dtype
    key = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
    kwargs: dict = {"local_files_only": True, key: dtype}
    try:
        return cls.from_pretrained(str(root / subfolder), **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not load {cls.__name__} from {root / subfolder}: {e}") from e


def tokenize(tokenizer, prompts: list[str], max_length: int, device: torch.device) -> Tensor:
    """Token ids ``(B, max_length)``, padded to ``max_length`` and truncated (the pipelines' way)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)
