"""The renders-only control of a run with pretraining-data replay (``ptx.weight > 0``).

A GRPO run with ``ptx`` learns from two sources in each optimizer step: the policy gradient of
its rollouts and the flow-matching loss on fresh renders. This script trains the *same* policy
(same preset, LoRA, optimizer, learning-rate schedule, gradient clip, EMA, seed) for the *same*
number of optimizer steps on the replay term alone (no rollouts, no policy gradient, no KL), then
evaluates it with the run's protocol. What the run gains beyond this control is what its
rollouts added.

    python benchmarks/ptx_control.py --match runs/study_ptx/flow_grpo-seed0 \\
        --out runs/study_ptx/ptx_only-seed0 --eval-images 512 --base runs/study_ptx/base-cfg4.5 \\
        --json docs/results/ladder_round18/ptx_control.json

``--match RUN`` reads the run's ``config.yaml`` and how many epochs it trained; the control
takes ``optimizer steps per epoch × epochs`` replay steps, each with the run's ``ptx.batch_size``
renders, at each epoch's learning rate. Checkpoints every ``ckpt_every`` epochs: a rerun of the
same command resumes. ``--set KEY=VALUE`` changes a setting of the control (all weights with
``lora_rank=0``, another ``lr`` or ``ema_decay``) to separate what the run's policy settings learn
from renders. Prints JSON and a markdown table (control, run, base when ``--base`` names
an evaluated base directory) and writes them with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--match", required=True, help="the ptx run to match (its config.yaml and metrics.jsonl)")
    ap.add_argument("--out", required=True, help="the control's run directory (resumed when it exists)")
    ap.add_argument("--eval-images", type=int, default=512, help="images per split in the final evaluation")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--base", default=None, help="an evaluated base directory (its eval.json) for the table")
    ap.add_argument("--json", default=None, help="also write the result JSON here (and the table beside it as .md)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs to match (default: what the run trained)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change the control's settings from the run's (repeatable), e.g. --set lora_rank=0 "
                         "--set lr=8e-5 to ask whether all weights learn the renders where the adapters do not")
    return ap.parse_args(argv)


def matched_config(run: Path, overrides: list[str] | None = None):
    """The run's TrainConfig (its saved config.yaml, then ``overrides``) and the epochs it trained."""
    from diffalign.config import load_config
    from diffalign.errors import ConfigError
    from diffalign.training.rundir import read_metrics
    from diffalign.training.trainer import TrainConfig

    cfg = load_config(TrainConfig, run / "config.yaml", list(overrides or []))
    if cfg.ptx.weight <= 0:
        raise ConfigError(f"{run} trained without pretraining-data replay (ptx.weight 0); nothing to control for")
    if cfg.algorithm in ("crd", "diffusion_nft"):
        raise ConfigError("the control matches a GRPO-family run")
    # a training row is logged at step = epochs done
    epochs = max(int(r["step"]) for r in read_metrics(run / "metrics.jsonl") if "policy_loss" in r)
    return cfg, epochs


def steps_per_epoch(cfg) -> int:
    """Optimizer steps of one GRPO epoch (one process) that carry the replay term: minibatches per
    inner epoch × inner epochs, plus the replay-only ``ptx.extra_steps``."""
    return (math.ceil(cfg.prompts_per_epoch * cfg.group_size / cfg.grpo.minibatch_size) * cfg.grpo.inner_epochs
            + cfg.ptx.extra_steps)


def train_control(cfg, epochs: int, out: Path) -> dict:
    """``epochs`` epochs of the replay term alone, in ``out`` (a Trainer run directory)."""
    from diffalign.training.trainer import Trainer, epoch_generator, epoch_lr

    cfg.epochs, cfg.max_train_minutes, cfg.eval.every = epochs, None, 0
    resume = (out / "config.yaml").is_file() and any((out / "checkpoints").glob("step_*"))
    tr = Trainer(cfg, out, resume=resume)
    replay = tr.algo.auxiliary
    n = steps_per_epoch(cfg)
    try:
        for epoch in range(tr.start_epoch, epochs):
            t0 = time.perf_counter()
            gen = epoch_generator(cfg.seed, epoch)
            tr.policy.train()
            for group in tr.optimizer.param_groups:
                group["lr"] = epoch_lr(cfg, epoch)
            m = replay.extra_steps(tr.policy, tr.optimizer, gen, cfg.grpo.max_grad_norm, n)
            if cfg.ema_decay > 0:
                tr.policy.ema_snapshot("ema", cfg.ema_decay)
            tr.train_time += time.perf_counter() - t0
            tr.logger.log(epoch + 1, {"ptx/loss": m["ptx/extra_loss"], "grad_norm": m["ptx/extra_grad_norm"],
                                      "lr": epoch_lr(cfg, epoch), "train_time_s": tr.train_time})
            if (epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == epochs:
                tr._save(epoch + 1)
            print(f"[ptx_control] epoch {epoch + 1}/{epochs}  replay loss {m['ptx/extra_loss']:.4f}  "
                  f"{tr.train_time / 60:.1f} min", file=sys.stderr, flush=True)
    finally:
        tr.run.unlock()
    return {"epochs": epochs, "optimizer_steps": epochs * n, "renders": epochs * n * cfg.ptx.batch_size,
            "train_minutes": tr.train_time / 60}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    from convergence import eval_figures, reusable_eval, run_guidance

    from diffalign.evaluation.report import evaluate

    run, out = Path(args.match), Path(args.out)
    cfg, epochs = matched_config(run, args.overrides)
    epochs = args.epochs or epochs
    info = train_control(cfg, epochs, out)
    g = run_guidance(run, None)
    settings = {"num_images": args.eval_images, "steps": args.eval_steps, "guidance_scale": g, "images_per_prompt": 4}
    ev = reusable_eval(out / "eval", settings) or evaluate(out, out / "eval", num_images=args.eval_images,
                                                            steps=args.eval_steps, guidance_scale=g,
                                                            images_per_prompt=4)
    rows = {"renders only (control)": eval_figures(ev)}
    run_ev = reusable_eval(run / "eval", settings)
    if run_ev is not None:
        rows["run (policy gradient + renders)"] = eval_figures(run_ev)
    if args.base:
        base_ev = reusable_eval(Path(args.base), settings)
        if base_ev is None:
            print(f"[ptx_control] {args.base} holds no evaluation with {settings}; base row left out",
                  file=sys.stderr)
        else:
            rows["base"] = eval_figures(base_ev)
    result = {"match": str(run), "overrides": list(args.overrides), "control": info, "ptx": {"weight": cfg.ptx.weight, "batch_size": cfg.ptx.batch_size},
              "eval_images": args.eval_images, "guidance_scale": g, "rows": rows}
    table = markdown(result)
    print(json.dumps(result, indent=2))
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        Path(args.json).with_suffix(".md").write_text(table + "\n")
    return result


def markdown(result: dict) -> str:
    c = result["control"]
    changed = f" (changed from the run: {', '.join(result['overrides'])})" if result.get("overrides") else ""
    lines = [f"Renders-only control: {c['optimizer_steps']} optimizer steps, {c['renders']:,} renders, "
             f"{c['train_minutes']:.1f} min; {result['eval_images']} images per split, CFG {result['guidance_scale']:g}"
             + changed,
             "", "| | test | OOD | missing / img | high-level halluc. / img | flat-region noise | diversity |",
             "|---|---|---|---|---|---|---|"]
    keys = ("test_score", "ood_score", "missing", "high_level_hallucination", "flat_noise", "diversity")
    for name, f in result["rows"].items():
        cells = [("—" if f.get(k) is None else f"{f[k]:.4f}" if k == "flat_noise" else f"{f[k]:.3f}") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
