"""Stable Diffusion 1.x (and 2.x) through diffusers: ``UNet2DConditionModel``, ``AutoencoderKL``
and a CLIP text encoder. ε-prediction on the DDPM schedule (``alphas_cumprod``), sampled with
DDIM by the rollout (``sampler="ddim"``); ``v_prediction`` checkpoints (SD2) are converted to
ε: ``ε̂ = √ᾱ_t·v̂ + √(1−ᾱ_t)·x_t``.

:class:`FlowView` gives the flow-matching view of an ε-model (the exact change of variables
of :mod:`diffalign.models.epsilon_view`, inverted) for forward-process and flow-based
preference algorithms: ``x_σ`` at ``σ`` ↔ ``x_vp = c·x_σ`` with ``c = 1/√((1−σ)² + σ²)``,
``ᾱ = (1−σ)²·c²``, and ``v̂ = (ε̂ − x_σ)/(1−σ)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.errors import ConfigError
from diffalign.models.diffusers_base import (
    AdapterPolicy,
    DiffusersConditioning,
    load_component,
    load_tokenizer,
    local_model_dir,
    parse_dtype,
    tokenize,
)
from diffalign.models.epsilon_view import ddpm_alphas_cumprod, flow_sigma_from_alpha_bar

__all__ = ["SD15_LORA_TARGETS", "FlowView", "SD15Policy"]

#: DDPO's SD1.5 LoRA: the attention projections of the UNet's transformer blocks.
SD15_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _scheduler_settings(root: Path) -> dict[str, Any]:
    """DDPM schedule settings from ``scheduler/scheduler_config.json`` (SD1.5's when absent)."""
    cfg = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "steps_offset": 1, "prediction_type": "epsilon"}
    path = root / "scheduler" / "scheduler_config.json"
    if path.exists():
        found = json.loads(path.read_text())
        cfg.update({k: found[k] for k in cfg if k in found})
    return cfg


class SD15Policy(AdapterPolicy):
    """SD1.5 ``Policy`` (ε-prediction). Build with :meth:`from_pretrained`.

    Attributes used by the DDIM rollout: ``alphas_cumprod`` ``(N,)`` float32 (CPU) and
    ``steps_offset``. ``predict(x, t, cond, w)`` takes integer DDPM timesteps ``t``."""

    prediction = "epsilon"
    family = "sd15"
    default_lora_targets = SD15_LORA_TARGETS

    def __init__(self, unet, vae, text_encoder, tokenizer, *, image_size: int = 512,
                 alphas_cumprod: Tensor | None = None, steps_offset: int = 1,
                 prediction_type: str = "epsilon", **kwargs):
        super().__init__(unet, vae, image_size=image_size, **kwargs)
        self.text_encoder = text_encoder.to(self.dtype)
        self.tokenizer = tokenizer
        self._freeze(self.text_encoder)
        self.clip_max_length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))
        ac = ddpm_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
        self.alphas_cumprod = ac.float().cpu()
        self.steps_offset = int(steps_offset)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"SD1.x adapter supports prediction_type epsilon or v_prediction; "
                              f"the scheduler config says {prediction_type!r}")
        self.prediction_type = prediction_type

    @classmethod
    def from_pretrained(cls, path: str | Path, *, image_size: int = 512, dtype: str = "bfloat16",
                        device: str | torch.device | None = None, **kwargs) -> SD15Policy:
        """Load a local SD1.x pipeline directory (``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``, optional ``scheduler/``)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        root = local_model_dir(path, "sd15", ["unet", "vae", "text_encoder", "tokenizer"])
        wd = parse_dtype(dtype)
        unet = load_component(UNet2DConditionModel, root, "unet", wd)
        vae = load_component(AutoencoderKL, root, "vae", parse_dtype(kwargs.get("vae_dtype", "float32")))
        text_encoder = load_component(CLIPTextModel, root, "text_encoder", wd)
        sched = _scheduler_settings(root)
        ac = ddpm_alphas_cumprod(sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"],
                                 sched["beta_schedule"])
        policy = cls(unet, vae, text_encoder, load_tokenizer(root, "tokenizer"), image_size=image_size, dtype=wd,
                     alphas_cumprod=ac, steps_offset=sched["steps_offset"],
                     prediction_type=sched["prediction_type"], **kwargs)
        return policy.to(device) if device is not None else policy

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: Tensor, device=None) -> Tensor:
        """``ᾱ_t`` (float32) at timesteps ``t``, linearly interpolated for non-integer ``t``."""
        t = torch.as_tensor(t, dtype=torch.float32).cpu().clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = t - lo.float()
        ab = self.alphas_cumprod[lo] * (1 - frac) + self.alphas_cumprod[hi] * frac
        return ab.to(device)

    # -- text ----------------------------------------------------------------------------
    def _encode_new(self, prompts: list[str]) -> tuple[Tensor, None]:
        ids = tokenize(self.tokenizer, prompts, self.clip_max_length, self.device)
        return self.text_encoder(ids)[0].to(self.dtype), None

    def encode(self, prompts: list[str]) -> DiffusersConditioning:
        """Cached, batched CLIP last hidden states ``(B, 77, D)``."""
        return self._cache.get(prompts, self._encode_new).to(self.device)

    # -- denoiser ------------------------------------------------------------------------
    def _denoise(self, x: Tensor, t: Tensor, cond: DiffusersConditioning, guidance: Tensor | None) -> Tensor:
        """ε̂ at VP state ``x`` and DDPM timestep ``t`` ``(B,)``."""
        out = self._run(sample=x.to(self.dtype), timestep=t, encoder_hidden_states=cond.embeds.to(self.dtype)).float()
        if self.prediction_type == "v_prediction":
            ab = self.alpha_bar(t, x.device).reshape(-1, *([1] * (x.dim() - 1)))
            out = ab.sqrt() * out + (1 - ab).sqrt() * x.float()
        return out


class FlowView:
    """Flow-matching view of an ε-prediction policy (inverse of ``EpsilonView``).

    ``predict(x_σ, σ, cond, w)``: ``ᾱ = (1−σ)²/((1−σ)² + σ²)``, ``x_vp = x_σ/√((1−σ)² + σ²)``,
    the continuous DDPM timestep ``t`` with ``ᾱ_t = ᾱ`` (interpolated in ``log ᾱ``), then
    ``v̂ = (ε̂(x_vp, t) − x_σ)/(1−σ)`` (float32). σ is clamped to the schedule's range
    ``[σ(ᾱ_0), σ(ᾱ_{N−1})]`` (≈ [0.03, 0.94] for SD1.5): outside it the ε-model was never
    trained. Everything else is delegated to the wrapped policy.
    """

    prediction = "flow"

    def __init__(self, policy: Any):
        if getattr(policy, "prediction", None) != "epsilon":
            raise ConfigError("FlowView wraps an ε-prediction policy (e.g. SD1.5); a flow policy needs no view")
        self.policy = policy
        ac = policy.alphas_cumprod.double()
        self._log_ab = torch.log(ac)  # decreasing in t
        self._sigma_range = (float(flow_sigma_from_alpha_bar(ac[0])), float(flow_sigma_from_alpha_bar(ac[-1])))

    def timestep(self, sigma: Tensor) -> Tensor:
        """Continuous DDPM timestep whose ``ᾱ`` equals ``ᾱ(σ)`` (float32, on ``sigma``'s device)."""
        s = sigma.double().cpu().clamp(*self._sigma_range)
        log_ab = torch.log((1 - s) ** 2 / ((1 - s) ** 2 + s**2))
        table = self._log_ab  # strictly decreasing
        idx = torch.searchsorted(-table, -log_ab).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        frac = ((lo - log_ab) / (lo - hi)).clamp(0, 1)
        return ((idx - 1).double() + frac).float().to(sigma.device)

    def predict(self, x: Tensor, t, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        sigma = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = sigma.clamp(*self._sigma_range).reshape(-1, *([1] * (x.dim() - 1)))
        x_vp = x.float() / torch.sqrt((1 - s) ** 2 + s**2)
        eps = self.policy.predict(x_vp, self.timestep(sigma), cond, guidance_scale=guidance_scale).float()
        return (eps - x.float()) / (1 - s)

    def __getattr__(self, name: str) -> Any:
        if name == "policy":
            raise AttributeError(name)
        return getattr(self.policy, name)

    def __repr__(self) -> str:
        return f"FlowView({self.policy.__class__.__name__})"
