"""Tiny-model checkpoints: one safetensors file, architecture in its metadata.

Metadata keys: ``format`` (= ``diffalign.tiny-flow-unet/1``), ``unet_config`` (JSON),
``image_size``, and free-form ``info`` (JSON: how it was made, scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffalign.errors import CheckpointError
from diffalign.models.unet import FlowUNet, UNetConfig

FORMAT = "diffalign.tiny-flow-unet/1"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASE_CHECKPOINT = ASSETS / "shapes_base.safetensors"


def save_unet(path: str | Path, model: FlowUNet, image_size: int, info: dict | None = None,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or an explicit ``state_dict`` such as EMA weights) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().contiguous().float().cpu() for k, v in sd.items()}
    meta = {
        "format": FORMAT,
        "unet_config": json.dumps(model.config.to_dict()),
        "image_size": str(image_size),
        "info": json.dumps(info or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the .safetensors file inside it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a diffalign tiny-model checkpoint (format {meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    return meta


def load_unet(path: str | Path | None = None) -> tuple[FlowUNet, int, dict]:
    """Load a tiny UNet; ``None`` loads the shipped ShapesWorld base model.

    Returns ``(model, image_size, info)``. Raises :class:`CheckpointError` with the reason
    when the file is missing, corrupt or of another architecture.
    """
    path = Path(path) if path is not None else BASE_CHECKPOINT
    if path == BASE_CHECKPOINT and not path.exists():
        raise CheckpointError(
            f"the shipped base model is missing ({path}); reinstall diffalign or run 'diffalign pretrain'"
        )
    meta = read_metadata(path)
    try:
        cfg = UNetConfig.from_dict(json.loads(meta["unet_config"]))
        model = FlowUNet(cfg)
        sd = load_file(str(path))
        model.load_state_dict(sd)
    except (KeyError, TypeError, json.JSONDecodeError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not match its recorded architecture: {first}") from None
    return model, int(meta.get("image_size", 32)), json.loads(meta.get("info", "{}"))
