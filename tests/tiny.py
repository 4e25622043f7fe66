"""Tiny randomly initialised models for fast tests."""

import torch

from diffalign.models.tiny import TinyFlowPolicy
from diffalign.models.unet import FlowUNet, UNetConfig

SMALL = UNetConfig(channels=(8, 16, 16), groups=4, emb_dim=32, heads=2)


def tiny_unet(seed: int = 0) -> FlowUNet:
    """A tiny UNet whose zero-initialised layers are randomised, so that ``v̂ ≠ 0``."""
    torch.manual_seed(seed)
    unet = FlowUNet(SMALL)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if not bool(p.abs().sum()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet


def tiny_policy(seed: int = 0, lora_rank: int = 0) -> TinyFlowPolicy:
    return TinyFlowPolicy(tiny_unet(seed), 32, lora_rank=lora_rank)
