"""Tiny randomly initialised models for fast tests, and other shared test helpers."""

import importlib.util
import sys
from pathlib import Path

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


def write_render_prefs(root, prompts: list[str], shard_size: int) -> str:
    """A preference dataset at ``root``: renders of ``prompts`` as winners, seeded random images
    as losers (32 px)."""
    from diffalign.data.preference import PreferenceWriter
    from diffalign.world.render import render_batch

    winners = render_batch(prompts, list(range(len(prompts))))
    g = torch.Generator().manual_seed(0)
    with PreferenceWriter(root, shard_size=shard_size) as w:
        for i, p in enumerate(prompts):
            w.add(p, winners[i], torch.rand(3, 32, 32, generator=g))
    return str(root)


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:  # their shared helpers (_json_out, _peak_rss), as when run as scripts
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
