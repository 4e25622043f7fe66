"""Stable Diffusion 3 / 3.5 through diffusers: ``SD3Transformer2DModel``, ``AutoencoderKL``,
two CLIP text encoders with projection and an optional T5 encoder.

Conventions (read from diffusers' ``StableDiffusion3Pipeline``; our own code):

- Flow matching: ``x_σ = (1−σ)·x0 + σ·ε``, the transformer predicts ``v = ε − x0`` and takes
  ``timestep = 1000·σ`` (the ``FlowMatchEulerDiscreteScheduler`` timesteps).
- Text: CLIP-L and CLIP-G penultimate hidden states (``hidden_states[-2]``), concatenated on
  the feature axis and zero-padded to the T5 width, then T5's last hidden state appended
  along the sequence (zeros of ``(max_sequence_length, joint_attention_dim)`` without T5);
  pooled = CLIP-L ⊕ CLIP-G projected text embeddings.
- Latents: ``z = (vae_latent − shift_factor)·scaling_factor``; images decode from
  ``z/scaling_factor + shift_factor``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffalign.models.diffusers_base import (
    AdapterPolicy,
    DiffusersConditioning,
    load_component,
    load_tokenizer,
    local_model_dir,
    parse_dtype,
    tokenize,
)

__all__ = ["SD3_LORA_TARGETS", "SD3Policy"]

#: Flow-GRPO's SD3.5 LoRA targets: every attention projection of the joint blocks.
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


class SD3Policy(AdapterPolicy):
    """SD3 / SD3.5 ``Policy`` (flow prediction). Build with :meth:`from_pretrained`."""

    prediction = "flow"
    family = "sd3"
    default_lora_targets = SD3_LORA_TARGETS
    patch_multiple = 2

    def __init__(self, transformer, vae, text_encoders: list, tokenizers: list, *, image_size: int = 512,
                 max_sequence_length: int = 256, **kwargs):
        self.patch_multiple = int(transformer.config.patch_size)
        super().__init__(transformer, vae, image_size=image_size, **kwargs)
        if len(text_encoders) != 3 or len(tokenizers) != 3:
            raise ValueError("SD3 needs [clip_l, clip_g, t5 | None] text encoders and their tokenizers")
        clip_l, clip_g, t5 = (None if m is None else m.to(self.dtype) for m in text_encoders)
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = clip_l, clip_g, t5
        self.tokenizers = list(tokenizers)
        self._freeze(clip_l, clip_g, t5)
        self.max_sequence_length = int(max_sequence_length)
        self.clip_max_length = int(min(self.tokenizers[0].model_max_length,
                                       clip_l.config.max_position_embeddings))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, image_size: int = 512, dtype: str = "bfloat16",
                        use_t5: bool = True, device: str | torch.device | None = None, **kwargs) -> SD3Policy:
        """Load a local SD3 / SD3.5 pipeline directory (``transformer/``, ``vae/``,
        ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``). ``use_t5=False`` (or no
        ``text_encoder_3/``) drops T5, as the pipeline does with ``text_encoder_3=None``."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        root = local_model_dir(path, "sd3", ["transformer", "vae", "text_encoder", "text_encoder_2",
                                             "tokenizer", "tokenizer_2"])
        wd = parse_dtype(dtype)
        vae_dtype = parse_dtype(kwargs.get("vae_dtype", "float32"))
        transformer = load_component(SD3Transformer2DModel, root, "transformer", wd)
        vae = load_component(AutoencoderKL, root, "vae", vae_dtype)
        clip_l = load_component(CLIPTextModelWithProjection, root, "text_encoder", wd)
        clip_g = load_component(CLIPTextModelWithProjection, root, "text_encoder_2", wd)
        has_t5 = use_t5 and (root / "text_encoder_3").is_dir()
        t5 = load_component(T5EncoderModel, root, "text_encoder_3", wd) if has_t5 else None
        toks = [load_tokenizer(root, "tokenizer"), load_tokenizer(root, "tokenizer_2"),
                load_tokenizer(root, "tokenizer_3") if has_t5 else None]
        policy = cls(transformer, vae, [clip_l, clip_g, t5], toks, image_size=image_size, dtype=wd, **kwargs)
        return policy.to(device) if device is not None else policy

    # -- text ----------------------------------------------------------------------------
    def _clip(self, index: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = (self.text_encoder, self.text_encoder_2)[index]
        ids = tokenize(self.tokenizers[index], prompts, self.clip_max_length, self.device)
        out = enc(ids, output_hidden_states=True)
        return out.hidden_states[-2].to(self.dtype), out.text_embeds.to(self.dtype)

    def _t5(self, prompts: list[str]) -> Tensor:
        width = int(self.denoiser.config.joint_attention_dim)
        if self.text_encoder_3 is None:
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device, dtype=self.dtype)
        ids = tokenize(self.tokenizers[2], prompts, self.max_sequence_length, self.device)
        return self.text_encoder_3(ids)[0].to(self.dtype)

    def _encode_new(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        seq_l, pooled_l = self._clip(0, prompts)
        seq_g, pooled_g = self._clip(1, prompts)
        clip = torch.cat([seq_l, seq_g], dim=-1)
        t5 = self._t5(prompts)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    def encode(self, prompts: list[str]) -> DiffusersConditioning:
        """Cached, batched text conditioning (sequence ``(B, 77·k + L_t5, D)``, pooled ``(B, P)``)."""
        return self._cache.get(prompts, self._encode_new).to(self.device)

    # -- denoiser ------------------------------------------------------------------------
    def _denoise(self, x: Tensor, t: Tensor, cond: DiffusersConditioning, guidance: Tensor | None) -> Tensor:
        """Velocity at flow state ``x`` and noise level ``σ = t`` ``(B,)``."""
        return self._run(hidden_states=x.to(self.dtype), encoder_hidden_states=cond.embeds.to(self.dtype),
                         pooled_projections=cond.pooled.to(self.dtype), timestep=t.float() * 1000).float()
