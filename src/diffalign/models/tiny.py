"""The built-in ShapesWorld policy: a tiny pixel-space flow UNet + frozen MiniLM text encoder.

Implements the ``Policy`` protocol (``diffalign.models.base``): ``encode``, ``predict`` with
batched classifier-free guidance, ``decode``, ``latent_shape``; plus parameter sets:

- ``"policy"``: the trainable parameters (LoRA adapters when ``lora_rank > 0``, else all);
- ``"reference"``: the base model — adapters disabled (LoRA) or the frozen base weights
  (full fine-tuning) — entered with ``with policy.reference(): ...``;
- named snapshots (``"old"``, ``"sampler"``, SePPO checkpoints): copies of the trainable
  parameters, made with :meth:`save_snapshot`, EMA-updated with :meth:`ema_snapshot`, and
  swapped in with ``with policy.use_snapshot("old"): ...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from diffalign.errors import ConfigError
from diffalign.models.checkpoint import load_unet, save_unet
from diffalign.models.parameter_sets import ParameterSets
from diffalign.models.text import Conditioning, TextEncoder, shared_text_encoder
from diffalign.models.unet import FlowUNet

#: LoRA targets: every projection in attention and the convs inside residual blocks.
DEFAULT_LORA_TARGETS = ("q", "kv", "out", "conv1", "conv2", "emb")


class TinyFlowPolicy(ParameterSets, nn.Module):
    """ShapesWorld policy. Images live in [-1, 1] pixel space; ``decode`` maps to [0, 1]."""

    _denoiser_attr = "unet"

    prediction = "flow"

    def __init__(self, unet: FlowUNet, image_size: int = 32, *, text_encoder: TextEncoder | None = None,
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, info: dict | None = None):
        super().__init__()
        self.image_size = image_size
        self.text_encoder = text_encoder or shared_text_encoder()
        self.info = info or {}
        self.lora_rank = lora_rank
        self._null: Conditioning | None = None
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=list(lora_targets),
                             lora_dropout=0.0, init_lora_weights=True)
            try:
                unet = inject_adapter_in_model(cfg, unet)
            except ValueError as e:
                layers = sorted({n.split(".")[-1] for n, m in unet.named_modules()
                                 if isinstance(m, (nn.Linear, nn.Conv2d))})
                raise ConfigError(f"LoRA target modules {list(lora_targets)} match no layer of the ShapesWorld "
                                  f"UNet ({e}); its layer names end with: {', '.join(layers)} (default: "
                                  f"{', '.join(DEFAULT_LORA_TARGETS)})") from e
            for n, p in unet.named_parameters():
                p.requires_grad_("lora_" in n)
            self._base_params = None
        else:
            # Full fine-tuning: keep a frozen copy of the base weights as the reference.
            self._base_params = {k: v.detach().clone() for k, v in unet.named_parameters()}
        self.unet = unet
        self._snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self._override: dict[str, torch.Tensor] | None = None
        self._merged: FlowUNet | None = None  # set inside sampling_weights()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, **kwargs) -> TinyFlowPolicy:
        """Load from a tiny-model checkpoint (``None``: the shipped ShapesWorld base)."""
        unet, size, info = load_unet(path)
        return cls(unet, size, info=info, **kwargs)

    def save(self, path: str | Path, info: dict | None = None) -> Path:
        """Save the merged model (LoRA folded in) as a standalone tiny-model checkpoint."""
        return save_unet(path, self._plain_unet(), self.image_size, info, state_dict=self.merged_state_dict())

    def _plain_unet(self) -> FlowUNet:
        return FlowUNet(self.unet.config)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Base-architecture state dict with LoRA deltas merged in."""
        if self.lora_rank == 0:
            return {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        plain = {}
        modules = dict(self.unet.named_modules())
        for name, mod in modules.items():
            if hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight"):
                w = mod.base_layer.weight.detach().clone()
                if "default" in getattr(mod, "lora_A", {}):
                    w = w + mod.get_delta_weight("default").detach()
                plain[f"{name}.weight"] = w
                if mod.base_layer.bias is not None:
                    plain[f"{name}.bias"] = mod.base_layer.bias.detach().clone()
        for k, v in self.unet.state_dict().items():
            if "lora_" in k:
                continue
            k2 = k.replace(".base_layer.", ".")
            plain.setdefault(k2, v.detach().clone())
        return plain

    # -- Policy protocol ---------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Conditioning:
        """Cached, batched text conditioning for ``prompts``."""
        return self.text_encoder(list(prompts))

    def null_conditioning(self, batch: int) -> Conditioning:
        """The unconditional input used for CFG (the encoding of the empty prompt)."""
        if self._null is None:
            self._null = self.text_encoder([""])
        return Conditioning(*(t.expand(batch, *t.shape[1:]) for t in (self._null.tokens, self._null.mask,
                                                                    self._null.pooled)))

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        if height != self.image_size or width != self.image_size:
            raise ConfigError(
                f"this ShapesWorld model generates {self.image_size}×{self.image_size} images; got {height}×{width}"
            )
        return (3, height, width)

    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[None]:
        """Within: forwards without gradients, adapters on and no snapshot swapped in run a
        plain UNet with the LoRA deltas merged into its weights: the same function (to float
        rounding, ~1e-6 relative) at the cost of the base model, one convolution per layer
        instead of three (rollouts ~1.4× faster, benchmarks/rollout.py). Every other forward — with gradients, under
        :meth:`reference`, under :meth:`use_snapshot` — runs the adapted UNet as usual.
        :func:`~diffalign.sampling.rollout.rollout` and ``generate`` enter it; the weights
        must not change inside (sampling does not change them). A no-op without LoRA."""
        if self.lora_rank == 0 or self._merged is not None:
            yield
            return
        ref = next(self.unet.parameters())
        merged = self._plain_unet().to(device=ref.device, dtype=ref.dtype)
        merged.load_state_dict(self.merged_state_dict())
        # a plain attribute, not a registered submodule: the copy is not part of the policy's
        # parameters or state dict
        object.__setattr__(self, "_merged", merged.requires_grad_(False).eval())
        try:
            yield
        finally:
            object.__setattr__(self, "_merged", None)

    def _adapters_on(self) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return not any(m.disable_adapters for m in self.unet.modules() if isinstance(m, BaseTunerLayer))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        args = (x, t, cond.tokens, cond.mask, cond.pooled)
        if self._merged is not None and not torch.is_grad_enabled() and not self._override and self._adapters_on():
            return self._merged(*args)
        if self._override:
            return torch.func.functional_call(self.unet, self._override, args, strict=False)
        return self.unet(*args)

    def predict(self, x: torch.Tensor, t, cond: Conditioning, guidance_scale: float = 1.0) -> torch.Tensor:
        """Velocity ``v̂(x, σ=t)``; with ``guidance_scale != 1`` CFG in one batched forward:
        ``v = v_u + w·(v_c − v_u)``. Returns float32."""
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if guidance_scale == 1.0:
            return self(x, t, cond).float()
        both = Conditioning.cat([self.null_conditioning(b), cond])
        v = self(torch.cat([x, x]), torch.cat([t, t]), both).float()
        v_u, v_c = v.chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    @staticmethod
    def decode(latents: torch.Tensor) -> torch.Tensor:
        """Pixel-space latents in [-1, 1] → images in [0, 1] (float32)."""
        return ((latents.float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → latents in [-1, 1] (for forward-process and preference methods)."""
        return images.float() * 2 - 1

    # parameter sets (trainable state, reference, snapshots): ParameterSets
