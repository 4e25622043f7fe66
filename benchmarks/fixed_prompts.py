"""Can a preset raise the reward on a few fixed training prompts? (a diagnostic, not a speed target)

Trains ``--preset`` on the prompts of ``--prompts`` (a text file, one prompt per line) with the
trainer's own rollouts, advantages and update, and every ``--every`` epochs samples
``--images`` fresh images per prompt with the preset's rollout sampler (independent initial
noise per image, fixed seed: the same noise at every evaluation) and judges them with the
verifier. If the policy-gradient signal is usable, the score on the very prompts trained on
should rise; ``--reward brightness`` swaps in the mean pixel value as a reward that every
image's noise moves, a control that the loop itself climbs a learnable reward.

    python benchmarks/fixed_prompts.py --preset flow_grpo --prompts p.txt --epochs 20 --every 5 \
        --out runs/fixed --set prompts_per_epoch=8

``--init-seed S`` starts every training epoch from the same initial noises (the rollout's
``init_seed``; fresh SDE noise each epoch), the memorisation rung: can the loop teach the policy
to pass from a few fixed starting points (``prompts_per_epoch`` groups of one prompt) at all?
Each evaluation then also samples the epoch-0 groups from those seen noises (``seen_score``)
beside the fresh-noise evaluation. The JSON's ``train`` lists every epoch's rollout reward and
strict pass rate.

Resumable: each evaluation also writes a checkpoint and ``OUT/fixed_prompts_progress.json`` (the
rows so far), and the same command run again on the same ``--out`` continues from the last
evaluation exactly (a larger ``--epochs`` extends a finished run).

Prints a line per evaluation and JSON at the end (``--json`` writes it to a file too). Each
evaluation row carries the rollout images and training seconds so far (curves of score vs
images and vs minutes); ``--summary docs/results/learning.json --summary-key KEY`` records the
run's base and final score, images and minutes in that summary file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from _json_out import emit_json, merge_summary, score_curve_summary


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flow_grpo")
    ap.add_argument("--prompts", required=True, help="text file, one training prompt per line")
    ap.add_argument("--out", required=True, help="run directory (config and checkpoints)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--images", type=int, default=32, help="evaluation images per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reward", choices=["preset", "brightness"], default="preset")
    ap.add_argument("--init-seed", type=int, default=None,
                    help="start every epoch from the same initial noises (memorisation; see above)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--json", default=None, help="also write the JSON result to this file")
    ap.add_argument("--summary", default=None,
                    help="summary JSON to update (e.g. docs/results/learning.json) under --summary-key")
    ap.add_argument("--summary-key", default="fixed_prompts", help="key (a/b nests) of this run in --summary")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)

    from diffalign.cli import resolve_preset
    from diffalign.config import load_config
    from diffalign.evaluation.quick import verdict_stats
    from diffalign.runtime import keep_freed_memory
    from diffalign.sampling.rollout import rollout
    from diffalign.training.prompts import read_prompt_file
    from diffalign.training.rundir import list_checkpoints
    from diffalign.training.trainer import TrainConfig, Trainer
    from diffalign.world.verify import verify_batch

    keep_freed_memory()
    extra = ["reward=mean_brightness", "reward_kwargs={}"] if args.reward == "brightness" else []
    cfg = load_config(TrainConfig, resolve_preset(args.preset),
                      [f"prompt_file={args.prompts}", "eval.every=0", f"threads={args.threads}", *extra, *args.set,
                       *([f"rollout.init_seed={args.init_seed}"] if args.init_seed is not None else [])])
    progress = Path(args.out) / "fixed_prompts_progress.json"
    resume = progress.is_file() and list_checkpoints(args.out)
    trainer = Trainer(cfg, args.out, resume=bool(resume))
    pool = read_prompt_file(args.prompts)
    prompts = [p for p in pool for _ in range(args.images)]
    rows = []
    images_per_epoch = cfg.prompts_per_epoch * cfg.group_size
    t0 = time.perf_counter()

    fresh = dataclasses.replace(cfg.rollout, init_seed=None)
    seen = trainer.epoch_prompts(0) if args.init_seed is not None else None
    train_rows = []

    def score_of(traj, prompts) -> float:
        return sum(v.score for v in verify_batch(traj.images, prompts)) / len(prompts)

    def evaluate(epoch: int) -> None:
        trainer.policy.eval()
        with torch.no_grad():  # one group per image: independent initial noise, the same at every evaluation
            traj = rollout(trainer.policy, prompts, torch.arange(len(prompts)), fresh,
                           generator=torch.Generator().manual_seed(999))
            seen_traj = None if seen is None else rollout(trainer.policy, seen.prompts, seen.group_ids, cfg.rollout,
                                                          generator=torch.Generator().manual_seed(777))
        verdicts = verify_batch(traj.images, prompts)
        st = verdict_stats(prompts, verdicts)
        def per_prompt(attr: str) -> list[float]:
            return [sum(getattr(v, attr) for v in verdicts[i * args.images:(i + 1) * args.images]) / args.images
                    for i in range(len(pool))]

        per = per_prompt("score")
        row = {"epoch": epoch, "rollout_images": epoch * images_per_epoch, "train_s": round(trainer.train_time, 1),
               "score": st["score"], "partial": st["partial"],
               "graded": sum(v.graded for v in verdicts) / len(verdicts),
               "brightness": float(traj.images.mean()), "per_prompt_score": per,
               "per_prompt_partial": per_prompt("partial")}
        if seen_traj is not None:
            row["seen_score"] = score_of(seen_traj, seen.prompts)
        rows.append(row)
        print(f"epoch {epoch:3d}  score {row['score']:.3f}  partial {row['partial']:.3f}  graded {row['graded']:.3f}  "
              f"brightness {row['brightness']:.4f}  per prompt " + " ".join(f"{x:.2f}" for x in per)
              + (f"  seen noise {row['seen_score']:.3f}" if "seen_score" in row else ""), flush=True)

    def save(epoch: int) -> None:  # the checkpoint first: the progress file names a complete one
        trainer._save(epoch)
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "evaluations": rows, "train": train_rows}))
        tmp.replace(progress)

    if resume:
        done = json.loads(progress.read_text())
        if done["epoch"] != trainer.start_epoch:
            raise SystemExit(f"{progress} is at epoch {done['epoch']} but the newest checkpoint at epoch "
                             f"{trainer.start_epoch}; remove {args.out} to start afresh")
        rows[:], train_rows[:] = done["evaluations"], done["train"]
        print(f"resuming at epoch {trainer.start_epoch}", flush=True)
    else:
        evaluate(0)
    for epoch in range(trainer.start_epoch, args.epochs):
        m = trainer.step_epoch(epoch)  # the trainer's own epoch: sample, score, advantages, update
        train_rows.append({"epoch": epoch, "reward": m["reward"], "pass_rate": m.get("reward/score")})
        if (epoch + 1) % args.every == 0 or epoch + 1 == args.epochs:
            evaluate(epoch + 1)
            save(epoch + 1)
    trainer.run.unlock()
    out = {"preset": args.preset, "overrides": args.set, "reward": args.reward, "prompts": pool,
           "train_s": round(trainer.train_time, 1), "wall_s": round(time.perf_counter() - t0, 1),
           "eval_images_per_prompt": args.images, "init_seed": args.init_seed, "evaluations": rows,
           "train": train_rows}
    _record_summary(args, rows, trainer.train_time)
    return emit_json(out, args.json)



def _record_summary(args: argparse.Namespace, rows: list[dict], train_s: float) -> None:
    """The run's base and final score, images and minutes under ``--summary-key`` of ``--summary``."""
    if args.summary:
        merge_summary(args.summary, args.summary_key, {
            "preset": args.preset, "overrides": args.set, **score_curve_summary(rows),
            "train_minutes": round(train_s / 60, 2), "eval_images_per_prompt": args.images})


if __name__ == "__main__":
    main()
