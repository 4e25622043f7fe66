"""FLUX.1 (dev / schnell) through diffusers: ``FluxTransformer2DModel``, ``AutoencoderKL``,
a CLIP text encoder (pooled) and a T5 encoder (sequence).

Conventions (read from diffusers' ``FluxPipeline``; our own code):

- Flow matching as SD3: ``x_σ = (1−σ)·x0 + σ·ε``, velocity ``v = ε − x0``; the transformer
  takes ``timestep = σ`` (it multiplies by 1000 inside).
- Packed latents: the sampler sees latents ``(B, C, h, w)``; each forward packs them into
  2×2 patches, ``(B, (h/2)·(w/2), 4C)`` (channel-major inside a patch), with image ids
  ``[0, row, col]`` per patch and all-zero text ids, and unpacks the output. Packing is a
  permutation, so Gaussian noise and per-sample means (log-probs) are the same either way.
- Guidance: FLUX.1-dev is guidance-distilled: ``guidance_scale`` is fed to the guidance
  embedding (one forward, no negative prompt). With ``true_cfg=True``, or for a model without
  the guidance embedding (schnell), ``guidance_scale != 1`` runs real classifier-free guidance
  in one batched forward (the embedding, if any, then gets ``embedded_guidance``).
- Text: CLIP's pooled output (``pooler_output``) and T5's last hidden state.
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

__all__ = ["FLUX_LORA_TARGETS", "FluxPolicy", "pack_latents", "unpack_latents"]

#: Attention projections of the double- and single-stream blocks (DanceGRPO / Flow-GRPO FLUX LoRA).
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                     "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out")


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, h, w)`` → ``(B, (h/2)·(w/2), 4C)``: 2×2 patches, row-major over patches."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latents of height ``h`` and width ``w``."""
    b, _, d = x.shape
    c = d // 4
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device) -> Tensor:
    """``((h/2)·(w/2), 3)`` position ids ``[0, row, col]`` of the packed patches."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FluxPolicy(AdapterPolicy):
    """FLUX.1 ``Policy`` (flow prediction). Build with :meth:`from_pretrained`."""

    prediction = "flow"
    family = "flux"
    default_lora_targets = FLUX_LORA_TARGETS
    patch_multiple = 2

    def __init__(self, transformer, vae, text_encoders: list, tokenizers: list, *, image_size: int = 512,
                 max_sequence_length: int = 512, true_cfg: bool = False, embedded_guidance: float = 3.5,
                 **kwargs):
        super().__init__(transformer, vae, image_size=image_size, **kwargs)
        clip, t5 = (m.to(self.dtype) for m in text_encoders)
        self.text_encoder, self.text_encoder_2 = clip, t5
        self.tokenizers = list(tokenizers)
        self._freeze(clip, t5)
        self.max_sequence_length = int(max_sequence_length)
        self.clip_max_length = int(min(self.tokenizers[0].model_max_length, clip.config.max_position_embeddings))
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))
        self.true_cfg = bool(true_cfg) or not self.guidance_embeds
        self.embedded_guidance = float(embedded_guidance)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, image_size: int = 512, dtype: str = "bfloat16",
                        device: str | torch.device | None = None, **kwargs) -> FluxPolicy:
        """Load a local FLUX.1 pipeline directory (``transformer/``, ``vae/``,
        ``text_encoder{,_2}/``, ``tokenizer{,_2}/``)."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        root = local_model_dir(path, "flux", ["transformer", "vae", "text_encoder", "text_encoder_2",
                                              "tokenizer", "tokenizer_2"])
        wd = parse_dtype(dtype)
        transformer = load_component(FluxTransformer2DModel, root, "transformer", wd)
        vae = load_component(AutoencoderKL, root, "vae", parse_dtype(kwargs.get("vae_dtype", "float32")))
        clip = load_component(CLIPTextModel, root, "text_encoder", wd)
        t5 = load_component(T5EncoderModel, root, "text_encoder_2", wd)
        toks = [load_tokenizer(root, "tokenizer"), load_tokenizer(root, "tokenizer_2")]
        policy = cls(transformer, vae, [clip, t5], toks, image_size=image_size, dtype=wd, **kwargs)
        return policy.to(device) if device is not None else policy

    # -- text ----------------------------------------------------------------------------
    def _encode_new(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = tokenize(self.tokenizers[0], prompts, self.clip_max_length, self.device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.dtype)
        ids2 = tokenize(self.tokenizers[1], prompts, self.max_sequence_length, self.device)
        seq = self.text_encoder_2(ids2, output_hidden_states=False)[0].to(self.dtype)
        return seq, pooled

    def encode(self, prompts: list[str]) -> DiffusersConditioning:
        """Cached, batched text conditioning (T5 sequence ``(B, L, D)``, CLIP pooled ``(B, P)``)."""
        return self._cache.get(prompts, self._encode_new).to(self.device)

    # -- denoiser ------------------------------------------------------------------------
    def predict(self, x: Tensor, t, cond: DiffusersConditioning, guidance_scale: float = 1.0) -> Tensor:
        """Velocity; the guidance embedding gets ``guidance_scale`` (FLUX.1-dev), or real
        batched CFG runs (``true_cfg`` / schnell). Float32."""
        if self.true_cfg:
            return super().predict(x, t, cond, guidance_scale)
        t = self._timesteps(t, x)
        g = torch.full((x.shape[0],), float(guidance_scale), device=x.device)
        return self._denoise(x, t, cond, g).float()

    def _denoise(self, x: Tensor, t: Tensor, cond: DiffusersConditioning, guidance: Tensor | None) -> Tensor:
        b, _, h, w = x.shape
        if self.guidance_embeds and guidance is None:
            guidance = torch.full((b,), self.embedded_guidance, device=x.device)
        out = self._run(
            hidden_states=pack_latents(x).to(self.dtype), encoder_hidden_states=cond.embeds.to(self.dtype),
            pooled_projections=cond.pooled.to(self.dtype), timestep=t.float(),
            img_ids=image_ids(h, w, x.device), txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device),
            guidance=None if guidance is None else guidance.float(),
        )
        return unpack_latents(out.float(), h, w)
