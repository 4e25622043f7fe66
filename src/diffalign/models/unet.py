"""A small text-conditioned flow UNet in pixel space (ShapesWorld's base model).

Convolutions give the local shape prior that a patch transformer of this size lacks on a
CPU budget. Layout at 32×32 (default channels 32/64/128):

    in conv → [32px: 2 res] ↓ [16px: 2 res+xattn] ↓ [8px: 2 res+xattn]
            → mid (res, self-attn + xattn, res) → mirrored up path with skips → out conv

Residual blocks are modulated (adaptive group norm: scale and shift) by an embedding of the
noise level σ plus the pooled sentence embedding; cross-attention reads the token
embeddings. The output convolution starts at zero, so an untrained model predicts v = 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.models.text import TEXT_DIM


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`FlowUNet` (stored in every checkpoint)."""

    channels: tuple[int, ...] = (32, 64, 128)
    """Channels per resolution level, from full resolution down."""
    blocks_per_level: int = 2
    """Residual blocks per level on the way down (one more on the way up)."""
    attn_levels: tuple[int, ...] = (1, 2)
    """Levels (0 = full resolution) with cross-attention to the text tokens."""
    emb_dim: int = 256
    """Width of the σ + pooled-text embedding that modulates every block."""
    heads: int = 4
    """Attention heads."""
    text_dim: int = TEXT_DIM
    """Width of the sentence encoder's token embeddings."""
    groups: int = 8
    """Group-norm groups."""

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> UNetConfig:
        d = dict(d)
        for k in ("channels", "attn_levels"):
            if k in d:
                d[k] = tuple(d[k])
        return UNetConfig(**d)


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``1000·σ``: ``(B,)`` → ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention from image positions to a context (text tokens, or the image
    itself when ``context`` is None). Residual, output projection starts at zero."""

    def __init__(self, channels: int, context_dim: int | None, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim or channels, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        ctx = seq if context is None else context
        q = self.q(seq).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out(o.transpose(1, 2).reshape(b, h * w, c))
        return x + o.transpose(1, 2).view(b, c, h, w)


class FlowUNet(nn.Module):
    """Velocity model ``v̂(x_σ, σ, text)`` for images in [-1, 1], shape (B, 3, H, W)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        ch, g, e = cfg.channels, cfg.groups, cfg.emb_dim
        self.sigma_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.text_mlp = nn.Sequential(nn.Linear(cfg.text_dim, e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch[0]]
        cin = ch[0]
        for lvl, c in enumerate(ch):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(cin, c, e, g))
                self.down_attn.append(Attention(c, cfg.text_dim, cfg.heads, g) if lvl in cfg.attn_levels else nn.Identity())
                cin = c
                skips.append(c)
            if lvl < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(cin, cin, e, g)
        self.mid_self = Attention(cin, None, cfg.heads, g)
        self.mid_cross = Attention(cin, cfg.text_dim, cfg.heads, g)
        self.mid2 = ResBlock(cin, cin, e, g)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl in reversed(range(len(ch))):
            c = ch[lvl]
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(cin + skips.pop(), c, e, g))
                self.up_attn.append(Attention(c, cfg.text_dim, cfg.heads, g) if lvl in cfg.attn_levels else nn.Identity())
                cin = c
            if lvl > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(g, cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _attend(self, attn: nn.Module, h, tokens, mask):
        return h if isinstance(attn, nn.Identity) else attn(h, tokens, mask)

    def forward(self, x, sigma, tokens, mask, pooled):
        """x: (B, 3, H, W); sigma: (B,) in [0, 1]; tokens (B, L, D); mask (B, L) bool; pooled (B, D)."""
        cfg = self.config
        emb = self.sigma_mlp(sigma_embedding(sigma, cfg.emb_dim).to(x.dtype)) + self.text_mlp(pooled.to(x.dtype))
        tokens = tokens.to(x.dtype)
        # channels-last activations: oneDNN's convolutions skip a layout reorder per call
        # (1.3-1.5× faster forwards on a 2-core CPU, docs/benchmarks.md); the weights keep their layout
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        hs = [h]
        i = 0
        for lvl in range(len(cfg.channels)):
            for _ in range(cfg.blocks_per_level):
                h = self._attend(self.down_attn[i], self.down[i](h, emb), tokens, mask)
                hs.append(h)
                i += 1
            if lvl < len(cfg.channels) - 1:
                h = self.downsample[lvl](h)
                hs.append(h)
        h = self.mid2(self.mid_cross(self.mid_self(self.mid1(h, emb)), tokens, mask), emb)
        i = 0
        for n_up, lvl in enumerate(reversed(range(len(cfg.channels)))):
            for _ in range(cfg.blocks_per_level + 1):
                h = self._attend(self.up_attn[i], self.up[i](torch.cat([h, hs.pop()], 1), emb), tokens, mask)
                i += 1
            if lvl > 0:
                h = self.upsample[n_up](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()
