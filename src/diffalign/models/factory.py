"""Build a policy of any model family from a config: ``build_policy(family, path, ...)``.

Families: ``tiny`` (the built-in ShapesWorld flow model; ``path`` a tiny checkpoint or None for
the shipped base), ``sd3`` (SD3 / SD3.5), ``flux`` (FLUX.1-dev / schnell), ``sd15`` (SD1.x,
ε-prediction). Diffusers families load from a local pipeline directory only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign.config import ranged
from diffalign.errors import ConfigError

__all__ = ["FAMILIES", "ModelOptions", "build_policy", "resolve_device"]

FAMILIES = ("tiny", "sd3", "flux", "sd15")


@dataclass
class ModelOptions:
    """Settings of the diffusers adapters (sd3, flux, sd15); the tiny ShapesWorld model reads
    only ``lora_targets``."""

    dtype: str = "bfloat16"
    """Weight dtype of the denoiser and text encoders: bfloat16, float16 or float32. LoRA
    weights are always float32; sampler math is float32. Full fine-tuning trains weights in
    this dtype (use float32 for float32 master weights)."""
    vae_dtype: str = "float32"
    """Weight dtype of the VAE (float32 avoids fp16 overflow in SD1.5's decoder)."""
    lora_targets: list[str] = field(default_factory=list)
    """LoRA target modules (peft name suffixes, e.g. attn.to_q); empty = the family's default
    (SD3: Flow-GRPO's eight joint-attention projections; FLUX: the same in double and single
    blocks; SD1.5: to_q, to_k, to_v, to_out.0; tiny: q, kv, out, conv1, conv2, emb — attention
    projections, residual-block convs and their timestep/text FiLM)."""
    lora_dropout: float = ranged(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower updates)."""
    device: str = "auto"
    """Device of the policy: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    max_cached_prompts: int = ranged(1024, ge=1)
    """Prompt encodings kept on the device (least recently used dropped beyond this)."""
    use_t5: bool = True
    """SD3: load the T5 text encoder (False: zeros in its place, as the pipeline without T5)."""
    max_sequence_length: int | None = ranged(None, ge=1)
    """T5 tokens (None = the family default: SD3 256, FLUX 512)."""
    true_cfg: bool = False
    """FLUX: real classifier-free guidance (two-branch batched forward) instead of the
    guidance embedding; always on for models without the embedding (schnell)."""
    embedded_guidance: float = ranged(3.5, ge=0)
    """FLUX: guidance-embedding value used when true_cfg is on."""
    flow_view: bool = False
    """SD1.5: expose the ε-model as a flow (velocity) policy (for forward-process and flow
    preference algorithms); rollouts then use flow samplers instead of ddim."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; anything else as torch parses it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"model_options.device={name!r} is not a torch device ({e}); use auto, cpu or cuda") from e


def build_policy(family: str, path: str | Path | None = None, *, image_size: int | None = None,
                 lora_rank: int = 0, lora_alpha: float | None = None,
                 options: ModelOptions | None = None) -> Any:
    """A ``Policy`` of ``family`` loaded from ``path``.

    Args:
        family: tiny, sd3, flux or sd15.
        path: tiny checkpoint file (None = the shipped ShapesWorld base) or a local diffusers
            pipeline directory.
        image_size: side of the generated square images in pixels (None = the model's
            default: the tiny checkpoint's size, 512 for sd3 / flux / sd15).
        lora_rank: LoRA rank (0 = full fine-tuning); lora_alpha: its alpha (None = rank).
        options: :class:`ModelOptions` of the diffusers adapters.
    """
    if family not in FAMILIES:
        raise ConfigError(f"unknown model_family {family!r}; available: {', '.join(FAMILIES)}")
    if family == "tiny":
        from diffalign.models.tiny import DEFAULT_LORA_TARGETS, TinyFlowPolicy

        targets = tuple(options.lora_targets) if options and options.lora_targets else DEFAULT_LORA_TARGETS
        policy = TinyFlowPolicy.from_checkpoint(path, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=targets)
        if image_size is not None and image_size != policy.image_size:
            raise ConfigError(f"the tiny model generates {policy.image_size}px images; got image_size={image_size}")
        return policy
    o = options or ModelOptions()
    common = {"image_size": image_size or 512, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
              "lora_targets": tuple(o.lora_targets) or None, "lora_dropout": o.lora_dropout, "dtype": o.dtype,
              "vae_dtype": o.vae_dtype, "gradient_checkpointing": o.gradient_checkpointing,
              "max_cached_prompts": o.max_cached_prompts, "device": resolve_device(o.device)}
    if family == "sd3":
        from diffalign.models.sd3 import SD3Policy

        return SD3Policy.from_pretrained(path, use_t5=o.use_t5, max_sequence_length=o.max_sequence_length or 256,
                                         **common)
    if family == "flux":
        from diffalign.models.flux import FluxPolicy

        return FluxPolicy.from_pretrained(path, max_sequence_length=o.max_sequence_length or 512,
                                          true_cfg=o.true_cfg, embedded_guidance=o.embedded_guidance, **common)
    from diffalign.models.sd15 import FlowView, SD15Policy

    policy = SD15Policy.from_pretrained(path, **common)
    return FlowView(policy) if o.flow_view else policy
