"""Pretraining the ShapesWorld base model: flow matching on freshly rendered images.

Every random draw of step ``k`` (prompts, render seeds, timesteps, noise, condition
dropout) comes from generators seeded with ``(seed, k)``, so a resumed run continues
*exactly*: it needs only the weights, the EMA weights, the optimizer state and ``k``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.config import MAX_SEED, ranged
from diffalign.errors import CheckpointError, ConfigError
from diffalign.models.checkpoint import load_unet, save_unet
from diffalign.models.text import shared_text_encoder
from diffalign.models.tiny import TinyFlowPolicy
from diffalign.models.unet import FlowUNet, UNetConfig
from diffalign.training.rundir import MetricsLogger
from diffalign.world.grammar import TASKS, prompt_splits
from diffalign.world.render import check_size, render


@dataclass
class PretrainConfig:
    """Pretraining settings (units in each docstring)."""

    steps: int = ranged(2000, ge=1)
    """Optimizer steps in total."""
    batch_size: int = ranged(64, ge=1)
    """Images per optimizer step."""
    lr: float = ranged(8e-4, gt=0)
    """Peak AdamW learning rate."""
    warmup: int = ranged(100, ge=0)
    """Linear warm-up, in steps."""
    min_lr_frac: float = ranged(0.1, ge=0, le=1)
    """Cosine decay ends at this fraction of ``lr``."""
    weight_decay: float = ranged(0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = ranged(1.0, gt=0)
    """Gradient-norm clip."""
    ema_decay: float = ranged(0.999, ge=0, lt=1)
    """EMA decay (warmed up as min(decay, (1+k)/(10+k)))."""
    cond_dropout: float = ranged(0.1, ge=0, le=1)
    """Probability of replacing a caption by the empty prompt (for CFG)."""
    timesteps: str = "logit_normal"
    """Training σ distribution: ``logit_normal`` (σ = sigmoid(N(0,1))) or ``uniform``."""
    image_size: int = ranged(32, ge=1)
    """Canvas side in pixels (32 or 64)."""
    channels: tuple[int, ...] = ranged((32, 64, 128), ge=1)
    """UNet channels per level."""
    blocks_per_level: int = ranged(1, ge=1)
    """UNet residual blocks per level."""
    seed: int = ranged(0, ge=0, le=MAX_SEED)
    """Seed for every random draw (see module docstring)."""
    ckpt_every: int = ranged(200, ge=1)
    """Steps between resumable checkpoints (and EMA snapshots)."""
    sample_every: int = ranged(400, ge=0)
    """Steps between sample grids with verifier verdicts (0 = never)."""
    log_every: int = ranged(10, ge=1)
    """Steps between metrics.jsonl lines."""
    bf16: bool = False
    """Run the model forward under bf16 autocast (loss and optimizer in float32). Off by
    default: on the 2-core development CPU bf16 convolutions ran ~20× slower than float32."""
    threads: int = ranged(0, ge=0)
    """torch threads (0 = torch's default)."""
    unet: dict = field(default_factory=dict)
    """Extra UNetConfig fields."""
    init_from: str | None = None
    """Start from these weights instead of a random initialisation: a saved UNet (``.safetensors``)
    or ``base`` for the shipped ShapesWorld base. Model and EMA both start there and the EMA
    decays at ``ema_decay`` from the first step (no warm-up), as a continued run's would. Its
    architecture must be the one ``channels`` / ``blocks_per_level`` / ``unet`` describe."""

    def validate(self) -> None:
        check_size(self.image_size)
        if self.timesteps not in ("logit_normal", "uniform"):
            raise ConfigError(f"timesteps={self.timesteps!r}; choose logit_normal or uniform")
        for k in ("steps", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be positive, got {getattr(self, k)}")


def _batch(cfg: PretrainConfig, step: int, train: dict[str, list[str]]):
    rng = np.random.default_rng([cfg.seed, step])
    tasks = [t for t in TASKS if train[t]]
    prompts, seeds = [], []
    for _ in range(cfg.batch_size):
        pool = train[tasks[rng.integers(len(tasks))]]
        prompts.append(pool[rng.integers(len(pool))])
        seeds.append(int(rng.integers(2**31)))
    images = np.stack([render(p, s, cfg.image_size)[0] for p, s in zip(prompts, seeds, strict=True)])
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if cfg.timesteps == "logit_normal":
        sigma = torch.sigmoid(torch.randn(cfg.batch_size, generator=g))
    else:
        sigma = torch.rand(cfg.batch_size, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
    return prompts, x0, sigma, noise, drop


def _lr(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _save_state(out: Path, cfg, step, model, ema, opt, elapsed):
    ck = out / "checkpoint"
    ck.mkdir(parents=True, exist_ok=True)
    save_unet(ck / "model.safetensors", model, cfg.image_size)
    save_unet(ck / "ema.safetensors", model, cfg.image_size, state_dict=ema)
    torch.save(opt.state_dict(), ck / "optimizer.pt.tmp")
    (ck / "optimizer.pt.tmp").replace(ck / "optimizer.pt")
    tmp = ck / "state.json.tmp"
    tmp.write_text(json.dumps({"step": step, "elapsed_s": elapsed}))
    tmp.replace(ck / "state.json")  # written last: a checkpoint is complete once this exists


def _load_state(out: Path):
    ck = out / "checkpoint"
    if not (ck / "state.json").exists():
        raise CheckpointError(
            f"no resumable checkpoint in {out} (expected {ck}/state.json): the run stopped before its first "
            "checkpoint, so there is nothing to resume. Run the same command without --resume to start it afresh.")
    state = json.loads((ck / "state.json").read_text())
    model, _, _ = load_unet(ck / "model.safetensors")
    ema_model, _, _ = load_unet(ck / "ema.safetensors")
    return state, model, ema_model.state_dict(), torch.load(ck / "optimizer.pt", weights_only=True)


def quick_eval(unet: FlowUNet, image_size: int, n: int = 48, steps: int = 20, cfg_scale: float = 4.5,
               split: str = "test"):
    """Verifier score of ``n`` task-balanced ``split`` samples with fixed seeds."""
    from diffalign.evaluation.quick import evaluate_policy

    return evaluate_policy(TinyFlowPolicy(unet.eval(), image_size), split, n, steps=steps, guidance_scale=cfg_scale)


def _check_resume_config(cfg: PretrainConfig, out: Path) -> None:
    """Raise unless ``cfg`` equals the run's saved config (``steps`` may differ)."""
    # options added after the run was made count at their defaults
    saved = json.loads(json.dumps(asdict(PretrainConfig()))) | json.loads((out / "config.json").read_text())
    now = json.loads(json.dumps(asdict(cfg)))
    diff = sorted(k for k in set(saved) | set(now) if k != "steps" and saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"resume config differs from the run's saved config in {diff}; resume with the same options")


def _new_model(cfg: PretrainConfig, out: Path) -> tuple[FlowUNet, dict[str, torch.Tensor]]:
    """A freshly initialised model and its EMA weights; writes ``out/config.json``."""
    if (out / "checkpoint" / "state.json").exists():
        raise ConfigError(f"{out} already holds a pretraining run; pass --resume to continue it or pick a new --out")
    torch.manual_seed(cfg.seed)
    arch = UNetConfig(channels=tuple(cfg.channels), blocks_per_level=cfg.blocks_per_level, **cfg.unet)
    model = FlowUNet(arch) if cfg.init_from is None else _initial_weights(cfg, arch)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return model, ema


def _initial_weights(cfg: PretrainConfig, arch: UNetConfig) -> FlowUNet:
    """The model ``cfg.init_from`` names, checked against the architecture ``cfg`` describes."""
    model, size, _ = load_unet(None if cfg.init_from == "base" else cfg.init_from)
    want, got = arch.to_dict(), model.config.to_dict()
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff or size != cfg.image_size:
        shown = {k: got.get(k) for k in diff} | ({"image_size": size} if size != cfg.image_size else {})
        raise ConfigError(f"init_from={cfg.init_from!r} is a model of another architecture; set {shown} "
                          "(channels, blocks_per_level, image_size or unet.<field>) to match it")
    return model


def _start(cfg: PretrainConfig, out: Path, resume: bool):
    """Phase 1: ``(model, ema, optimizer, first step, seconds already spent)``, new or resumed."""
    if resume:
        state, model, ema, opt_state = _load_state(out)
        start, elapsed0 = state["step"], state["elapsed_s"]
        _check_resume_config(cfg, out)
    else:
        model, ema = _new_model(cfg, out)
        opt_state, start, elapsed0 = None, 0, 0.0
    _trim_metrics(out, start)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    return model, ema, opt, start, elapsed0


def _trim_metrics(out: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` rows past ``step``: those a killed attempt logged after its last
    checkpoint (the resumed run logs them again), or all of a dead attempt's rows on a fresh start."""
    MetricsLogger(out / "metrics.jsonl").truncate_after(step)


def _train_step(cfg: PretrainConfig, step: int, model: FlowUNet, opt: torch.optim.Optimizer, train, text, null):
    """Phase 2: one flow-matching step on a fresh batch, ``x_σ = (1−σ)·x0 + σ·ε``, target
    ``ε − x0``; returns ``(loss, grad_norm)``."""
    prompts, x0, sigma, noise, drop = _batch(cfg, step, train)
    cond = text(prompts)
    if drop.any():
        cond.tokens[drop], cond.mask[drop], cond.pooled[drop] = null.tokens, null.mask, null.pooled
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        v = model(x_t, sigma, cond.tokens, cond.mask, cond.pooled)
    loss = F.mse_loss(v.float(), noise - x0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for group in opt.param_groups:
        group["lr"] = _lr(cfg, step)
    opt.step()
    return loss, gnorm


@torch.no_grad()
def _update_ema(ema: dict[str, torch.Tensor], model: FlowUNet, decay: float) -> None:
    """``ema ← d·ema + (1 − d)·θ`` for float tensors; other buffers are copied."""
    for k, p in model.state_dict().items():
        ema[k].mul_(decay).add_(p, alpha=1 - decay) if p.dtype.is_floating_point else ema[k].copy_(p)


def _due(done: int, every: int, total: int) -> bool:
    return done % every == 0 or done == total


def ema_snapshot_path(out: str | Path, step: int) -> Path:
    """Where a pretraining run in ``out`` keeps the EMA weights of ``step`` (every ``ckpt_every``
    steps and the last)."""
    return Path(out) / f"ema_step{step:06d}.safetensors"


def _save_checkpoints(cfg: PretrainConfig, out: Path, done: int, model, ema, opt, t0: float) -> None:
    """Phase 3a: the resumable checkpoint and an EMA snapshot of step ``done``."""
    _save_state(out, cfg, done, model, ema, opt, time.time() - t0)
    save_unet(ema_snapshot_path(out, done), model, cfg.image_size,
              {"step": done, "elapsed_s": time.time() - t0}, state_dict=ema)


def _sample_and_score(cfg: PretrainConfig, out: Path, done: int, model: FlowUNet, ema, log, bar) -> None:
    """Phase 3b: a grid of EMA samples with verifier verdicts, and their score in the log."""
    from diffalign.evaluation.grid import save_grid

    ema_model = FlowUNet(model.config)
    ema_model.load_state_dict(ema)
    res, images, prompts_e, verdicts = quick_eval(ema_model, cfg.image_size)
    save_grid(images, out / "samples" / f"step{done:06d}.png", ncol=8,
              captions=prompts_e, marks=[v.score == 1.0 for v in verdicts])
    log.write(json.dumps({"step": done, "eval_score_test48": res["score"]}) + "\n")
    log.flush()
    bar.console.print(f"step {done}: verifier score on 48 test prompts = {res['score']:.3f}")


def _progress_bar(console):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: bool = False, console=None,
             stop_after: int | None = None) -> Path:
    """Run (or resume) pretraining into ``out_dir``; returns the final EMA checkpoint path.

    Phases: start (new or resumed), then per step train → EMA → log / checkpoint / sample.
    ``stop_after``: return after this step (as an interruption would), without the final
    checkpoint; the last periodic checkpoint is what ``resume`` continues from."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    model, ema, opt, start, elapsed0 = _start(cfg, out, resume)
    train = prompt_splits()["train"]
    text = shared_text_encoder()
    null = text([""])
    t0 = time.time() - elapsed0
    model.train()
    with (out / "metrics.jsonl").open("a") as log, _progress_bar(console) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, completed=start, loss=float("nan"))
        warm = cfg.init_from is None  # a run from trained weights keeps its EMA's full decay
        for step in range(start, cfg.steps):
            loss, gnorm = _train_step(cfg, step, model, opt, train, text, null)
            _update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)) if warm else cfg.ema_decay)
            done = step + 1
            bar.update(task, completed=done, loss=loss.item())
            if _due(done, cfg.log_every, cfg.steps):
                log.write(json.dumps({"step": done, "loss": loss.item(), "grad_norm": float(gnorm),
                                      "lr": _lr(cfg, step), "elapsed_s": time.time() - t0}) + "\n")
                log.flush()
            if _due(done, cfg.ckpt_every, cfg.steps):
                _save_checkpoints(cfg, out, done, model, ema, opt, t0)
            if cfg.sample_every and _due(done, cfg.sample_every, cfg.steps):
                _sample_and_score(cfg, out, done, model, ema, log, bar)
            if stop_after is not None and done >= stop_after:
                return out / "checkpoint" / "ema.safetensors"
    final = out / "ema_final.safetensors"
    save_unet(final, model, cfg.image_size, {"steps": cfg.steps, "seed": cfg.seed,
                                             "elapsed_s": time.time() - t0}, state_dict=ema)
    return final
