"""The run loop shared by the RL trainer and the preference trainer.

A trainer supplies its per-step work (the RL trainer's one epoch: sample → score → advantages
→ update; the preference trainer's one optimizer update) and the loop does the rest, the same
for both:

1. **run directory** — :func:`configure` checks the config and sets torch's threads,
   :func:`open_run` creates the directory (or opens it on resume), :func:`open_logger` opens
   ``metrics.jsonl`` and drops the rows past the checkpoint a resume starts from;
2. **checkpoints** — :func:`checkpoint_state` / :func:`restore_checkpoint` hold what both
   trainers save (trainable weights, optimizer, snapshots, RNG, training time); each adds its
   own entries;
3. **the loop** — :class:`TrainLoop`: a base evaluation before the first step, then per step
   the trainer's work, a periodic evaluation (sample grid in ``samples/``), the metrics row,
   a periodic checkpoint (the last step always saves), a progress bar, and a stop once
   ``max_train_minutes`` of training time is spent;
4. **summary** — :func:`write_summary`: base and final evaluation scores, ``curves.png``
   (:func:`plot_run_curves`) and ``summary.json``.

Exact resume holds as before: the loop draws no random numbers of its own, and each
trainer's step seeds its draws from ``(seed, step)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffalign.config import config_to_dict
from diffalign.distributed import broadcast_object, get_world, run_on_main
from diffalign.evaluation.grid import save_grid
from diffalign.training.rundir import (
    MetricsLogger,
    RunDir,
    capture_rng,
    load_checkpoint,
    read_metrics,
    restore_rng,
)

# --------------------------------------------------------------------------- run directory


def configure(cfg: Any) -> None:
    """Check ``cfg`` (its ``validate()``) and apply its torch thread count (``threads``, 0 = default)."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def open_run(run_dir: str | Path, cfg: Any, resume: bool) -> RunDir:
    """The run directory, locked by rank 0 for this process (:meth:`RunDir.lock`): opened when
    resuming, else created with ``cfg`` as its config (rank 0)."""
    run = RunDir(run_dir)
    if resume:
        run.open()

    def claim() -> None:
        run.lock()
        if not resume:
            run.create(config_to_dict(cfg))

    run_on_main(claim)
    return run


@contextmanager
def unlocked_on_error(run: RunDir) -> Iterator[None]:
    """Around a trainer's setup after :func:`open_run`: a setup that fails releases the run's
    lock, so the same process (a notebook, a test) can start it again."""
    try:
        yield
    except BaseException:
        run.unlock()
        raise


def open_logger(run: RunDir, resume_step: int | None) -> MetricsLogger | NoLogger:
    """``metrics.jsonl``'s logger on rank 0 (a :class:`NoLogger` elsewhere); on resume from
    ``resume_step`` the rows after it are dropped (the resumed run writes them again)."""
    logger: MetricsLogger | NoLogger = run.metrics_logger() if get_world().is_main else NoLogger()
    if resume_step is not None:
        logger.truncate_after(resume_step)
    return logger


class NoLogger:
    """The metrics logger of ranks other than 0: they compute the same rows but write nothing."""

    def log(self, step: int, metrics: dict) -> None:
        """Write nothing."""

    def truncate_after(self, step: int) -> int:
        """Drop nothing."""
        return 0

    def close(self) -> None:
        """Nothing to close."""


# --------------------------------------------------------------------------- checkpoints


def checkpoint_state(policy, optimizer_state: dict, train_time: float, **extra: Any) -> dict:
    """A checkpoint's contents: ``extra`` first, then the trainable weights, the optimizer state,
    the policy's snapshots, the RNG states and the training seconds so far."""
    return {
        **extra,
        "policy": {k: p.detach().clone() for k, p in policy.trainable_state().items()},
        "optimizer": optimizer_state,
        "snapshots": policy.snapshot_state(),
        "rng": capture_rng(),
        "train_time": train_time,
    }


def restore_checkpoint(run: RunDir, policy, optimizer, load_extra: Callable[[dict], None]) -> dict:
    """Load the run's latest checkpoint into ``policy`` and ``optimizer``; ``load_extra`` restores
    the trainer's own entries before the RNG states are restored last. Returns the state."""
    run.require_checkpoint()  # says how to restart a run that stopped before its first checkpoint
    state = load_checkpoint(run)
    with torch.no_grad():
        params = policy.trainable_state()
        for k, v in state["policy"].items():
            params[k].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    policy.load_snapshot_state(state["snapshots"])
    load_extra(state)
    restore_rng(state["rng"])
    return state


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_to_grid(policy, run: RunDir, tag: str, split: str, num_images: int, *, steps: int,
                     guidance_scale: float, tasks=None) -> dict:
    """Verifier metrics of ``num_images`` deterministic samples on ``split``'s prompts (of task
    types ``tasks`` only, when given); the first 64 go to ``samples/<tag>.png`` with their prompts
    and a mark on each correct one."""
    from diffalign.evaluation.quick import evaluate_policy

    res, images, prompts, verdicts = evaluate_policy(policy, split, num_images, steps=steps,
                                                     guidance_scale=guidance_scale, tasks=tasks)
    save_grid(images[:64], run.samples_dir / f"{tag}.png", ncol=8, captions=prompts[:64],
              marks=[v.score == 1.0 for v in verdicts[:64]])
    return res


# --------------------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    """How a :meth:`TrainLoop.run` ended."""

    done: int
    """Steps completed (the start step when there was nothing left to run)."""
    stopped_by_budget: bool
    """The ``max_train_minutes`` budget ended the run before ``total``."""


@dataclass
class TrainLoop:
    """One run loop over steps ``start … total − 1`` of a trainer's work.

    ``step(index, on_phase)`` runs step ``index`` (0-based), adds its time to the trainer's
    training time and returns its ``metrics.jsonl`` row, which carries ``train_time_s`` (the
    training seconds so far) and ``metric``; ``on_phase`` is told each phase's name as it
    starts. ``evaluate(tag)`` returns evaluation metrics (with ``score``) and writes the sample
    grid ``tag``; ``save(done)`` writes the checkpoint after ``done`` steps (every rank calls it).
    """

    step: Callable[[int, Callable[[str], None]], dict]
    evaluate: Callable[[str], dict]
    save: Callable[[int], None]
    unit: str
    """What a step is called: ``epoch`` or ``update`` (progress bar and sample-grid tags)."""
    label: str
    """Name on the progress bar (the algorithm)."""
    start: int
    total: int
    eval_every: int
    """Steps between evaluations (0 = only before training and after the last step)."""
    ckpt_every: int
    """Steps between checkpoints (the last step always saves)."""
    max_train_minutes: float | None
    metric: str = "reward"
    """Row entry shown on the progress bar."""
    metric_format: str = ".3f"

    def run(self, logger: MetricsLogger | NoLogger, console=None) -> LoopResult:
        """Base evaluation (at step 0), then every step with its evaluation, row and checkpoint."""
        if self.start == 0:
            base = run_on_main(partial(self.evaluate, f"{self.unit}0000"))
            logger.log(0, {f"eval/{k}": v for k, v in base.items()} | {"train_time_s": 0.0})
        done, stopped = self.start, False
        with self._progress(console) as update_bar:
            for index in range(self.start, self.total):
                row = self.step(index, lambda phase: update_bar(phase=phase))
                done = index + 1
                out_of_time = self.max_train_minutes is not None and row["train_time_s"] >= 60 * self.max_train_minutes
                stopped = broadcast_object(out_of_time)  # rank 0's clock decides for all
                last = done == self.total or stopped
                if (self.eval_every and done % self.eval_every == 0) or last:
                    update_bar(phase="eval")
                    res = run_on_main(partial(self.evaluate, f"{self.unit}{done:04d}"))
                    row |= {f"eval/{k}": v for k, v in res.items()}
                    update_bar(score=f"{res['score']:.3f}")
                logger.log(done, row)
                if done % self.ckpt_every == 0 or last:
                    self.save(done)
                update_bar(completed=done, value=row[self.metric], phase="")
                if stopped:
                    break
        logger.close()
        return LoopResult(done, stopped)

    @contextmanager
    def _progress(self, console) -> Iterator[Callable[..., None]]:
        """A rich progress bar (rank 0 only); yields ``update(**fields)``."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("[bold]{task.fields[algo]}"), BarColumn(),
                   TextColumn(f"{self.unit} {{task.completed}}/{{task.total}}"),
                   TextColumn("{task.fields[phase]:>8}"),
                   TextColumn(f"{self.metric} {{task.fields[value]:{self.metric_format}}}"),
                   TextColumn("eval {task.fields[score]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=not get_world().is_main) as bar:
            task = bar.add_task("train", total=self.total, completed=self.start, algo=self.label, phase="",
                                value=float("nan"), score="-")
            yield partial(bar.update, task)


# --------------------------------------------------------------------------- summary


def write_summary(run: RunDir, final: dict, plot: Callable[[Path, list[dict]], Any],
                  extend: Callable[[list[dict]], dict] | None = None) -> dict:
    """``summary.json``: ``final``, then the first and last evaluation scores of the metrics
    (``base_score``, ``final_score``), then ``extend(rows)``; and ``plot(run.path, rows)``."""
    rows = read_metrics(run.metrics_path)
    evals = [r for r in rows if "eval/score" in r]
    if evals:
        final |= {"base_score": evals[0]["eval/score"], "final_score": evals[-1]["eval/score"]}
    if extend is not None:
        final |= extend(rows)
    plot(run.path, rows)
    (run.path / "summary.json").write_text(json.dumps(final, indent=2))
    return final


def plot_run_curves(run_path: Path, rows: list[dict], train_key: str, panels: int, width: float,
                    draw: Callable[[Any, list[dict], list[dict]], None]) -> Path | None:
    """``<run>/curves.png`` from the metrics rows: ``draw(axes, eval_rows, train_rows)`` fills a
    row of ``panels`` panels ``width`` inches wide (train rows: those with ``train_key``). None,
    and no file, when the rows hold neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r for r in rows if "eval/score" in r]
    tr = [r for r in rows if train_key in r]
    if not ev and not tr:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(width, 3.6))
    draw(axes, ev, tr)
    fig.suptitle(run_path.name)
    fig.tight_layout()
    out = run_path / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
