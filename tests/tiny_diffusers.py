"""Tiny random diffusers pipelines (SD3, FLUX, SD1.5) built offline and saved to a directory.

Like diffusers' ``get_dummy_components``: every component from a tiny config (1–2 layers,
8–32 channels), tokenizers built in Python from a character vocabulary — no hub access.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

LETTERS = list(string.ascii_lowercase + string.digits + ".,'\"!?-")


def clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 16):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -3.0) for ch in LETTERS] + [("▁" + ch, -2.5) for ch in LETTERS]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(3, -1, -1)]
    return T5Tokenizer(vocab=pieces, extra_ids=4, model_max_length=max_length)


def _clip(with_projection: bool, hidden: int = 16, projection: int = 16, vocab: int = 2 + 2 * len(LETTERS)):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5(d_model: int = 32, vocab: int = 4 + 2 * len(LETTERS) + 4):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **extra)


def _save(root: Path, parts: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        part.save_pretrained(str(root / name))
    return root


def make_sd3(root: Path, seed: int = 0, t5: bool = True) -> Path:
    """A tiny SD3 pipeline: 1 joint block (2 heads × 8), VAE factor 2, 16-dim CLIPs, 32-dim T5."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    parts = {
        "transformer": SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                             num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                             joint_attention_dim=32, caption_projection_dim=16,
                                             pooled_projection_dim=32, pos_embed_max_size=16),
        "vae": _vae(4, shift_factor=0.0609, scaling_factor=1.5305),
        "text_encoder": _clip(True), "text_encoder_2": _clip(True),
        "tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(),
    }
    if t5:
        parts |= {"text_encoder_3": _t5(32), "tokenizer_3": t5_tokenizer()}
    return _save(root, parts)


def make_flux(root: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1 pipeline: 1 double + 1 single block, packed 16 = 4×4 channels."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    parts = {
        "transformer": FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                              axes_dims_rope=[4, 4, 8]),
        "vae": _vae(4, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": _clip(False), "text_encoder_2": _t5(32),
        "tokenizer": clip_tokenizer(), "tokenizer_2": t5_tokenizer(),
    }
    return _save(root, parts)


def make_sd15(root: Path, seed: int = 0) -> Path:
    """A tiny SD1.5 pipeline: 2-level UNet (8, 16 channels) with cross-attention, DDIM scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    parts = {
        "unet": UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                     block_out_channels=(8, 16), norm_num_groups=4,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                     cross_attention_dim=16, attention_head_dim=4),
        "vae": _vae(4, scaling_factor=0.18215),
        "text_encoder": _clip(False),
        "tokenizer": clip_tokenizer(),
        "scheduler": DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, clip_sample=False, set_alpha_to_one=False),
    }
    return _save(root, parts)
