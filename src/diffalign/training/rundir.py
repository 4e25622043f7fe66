"""The run directory: config, metrics, checkpoints and RNG state of one training run.

::

    run/
      config.yaml                 the resolved config (written once, by RunDir.create)
      metrics.jsonl               one JSON line per logged step: {"step", "wall_time", **metrics}
      tb/                         TensorBoard event files (same scalars)
      samples/                    image grids
      .lock                       held (flock) by the process training in it, so a second one
                                  started on the same directory stops with a clear error
      checkpoints/
        step_0000200/state.pt     torch.save of a nested dict of tensors / plain values
        step_0000400/state.pt
        latest                    text file naming the newest complete checkpoint dir

A checkpoint is written into a hidden temp dir and renamed into place, then ``latest`` is
replaced; a crash at any point leaves the previous checkpoint intact, and the leftover temp dir
is ignored and removed on the next save or load. On resume, ``MetricsLogger.truncate_after``
drops the metric lines logged after the checkpoint, so the JSONL equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.config import config_to_dict, load_yaml, save_config
from diffalign.errors import CheckpointError, ConfigError, DiffalignError

__all__ = [
    "MetricsLogger",
    "RunDir",
    "capture_rng",
    "checkpoint_dir_step",
    "generator_state",
    "latest_step",
    "list_checkpoints",
    "load_checkpoint",
    "read_metrics",
    "restore_rng",
    "save_checkpoint",
    "set_generator_state",
]

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
_CKPT_RE = re.compile(r"^step_(\d{7,})$")
_TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"

try:  # POSIX advisory locks; where there are none (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

# run directories this process holds the lock of: resolved path -> open lock file
_HELD: dict[str, Any] = {}


class RunDir:
    """A run's directory; ``create`` a new one or ``open`` an existing one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    def is_run(self) -> bool:
        """Whether the directory already holds a run (has a config.yaml)."""
        return self.config_path.is_file()

    def has_checkpoint(self) -> bool:
        """Whether the run saved a complete checkpoint (so ``--resume`` can continue it)."""
        return latest_step(self) is not None

    def create(self, config: Mapping[str, Any] | Any, *, exist_ok: bool = False) -> RunDir:
        """Start a run here: write ``config.yaml`` (a dict or a config dataclass) and the subdirs.

        A run directory is either resumable or restartable: one holding a run with a checkpoint is
        refused (resume it, or choose another directory); one whose run stopped before its first
        checkpoint (killed early, or a start that failed) is started afresh — its partial metrics
        are dropped and a note says so — so the same command works again."""
        self._require_directory()
        if self.is_run() and not exist_ok:
            if self.has_checkpoint():
                raise ConfigError(
                    f"{self.path} already holds a run with a checkpoint (step {latest_step(self)}). "
                    f"Continue it with `diffalign train --resume {self.path}`, choose another "
                    f"directory with --out, or delete it (rm -r {self.path}) to start over."
                )
            self._clear_unfinished()
        self.config = config_to_dict(config)
        for d in (self.path, self.samples_dir, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.config_path)
        return self

    def _require_directory(self) -> None:
        """A ConfigError when the path exists and is a file."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a directory; choose another output directory.")

    def _clear_unfinished(self) -> None:
        """Drop what a run that never checkpointed left (metrics, TensorBoard events, temp files)."""
        print(f"note: {self.path} holds a run that stopped before its first checkpoint; starting it "
              "afresh (its partial metrics are replaced)", file=sys.stderr, flush=True)
        self.metrics_path.unlink(missing_ok=True)
        shutil.rmtree(self.tb_dir, ignore_errors=True)
        _clean_temp(self.checkpoints_dir)

    def require_checkpoint(self, how: str = "") -> int:
        """The step ``--resume`` continues from; a CheckpointError that says how to restart when the
        run stopped before its first checkpoint. ``how``: the command that restarts it."""
        step = latest_step(self)
        if step is None:
            how = how or f"diffalign train {self.config_path} --out {self.path}"
            raise CheckpointError(
                f"{self.path}: the run stopped before its first checkpoint, so there is nothing to "
                f"resume. Start it again without --resume (a run directory with no checkpoint is "
                f"started afresh), e.g. `{how}`."
            )
        return step

    def lock(self) -> RunDir:
        """Take this run directory for this process, so that no second process trains in it.

        An exclusive ``flock`` on ``.lock``, held until :meth:`unlock` or the process exits (the
        kernel drops it then, so a killed run leaves no stale lock). Re-entrant within a
        process. A directory another process holds raises a ConfigError naming its pid."""
        if fcntl is None:
            return self
        self._require_directory()
        key = str(self.path.resolve())
        if key in _HELD:
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(
                f"{self.path} is in use: another process (pid {holder}) is training in it. Wait for it to "
                f"finish (or stop it) before resuming this run, or choose another directory with --out."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD[key] = f
        return self

    def unlock(self) -> None:
        """Release :meth:`lock` (a no-op when this process does not hold it)."""
        f = _HELD.pop(str(self.path.resolve()), None)
        if f is not None:
            f.close()  # closing the file releases the flock

    def open(self) -> RunDir:
        """Open an existing run (to resume or evaluate it); its config is in ``self.config``."""
        if not self.is_run():
            raise ConfigError(
                f"not a run directory: {self.path} (no {CONFIG_FILE} there). Check the path, or start "
                "a new run there without --resume."
            )
        self.config = load_yaml(self.config_path)
        return self

    def metrics_logger(self, *, tensorboard: bool = True) -> MetricsLogger:
        """A logger appending to this run's metrics.jsonl (and its tb/ dir)."""
        return MetricsLogger(self.metrics_path, tb_dir=self.tb_dir if tensorboard else None)


# --------------------------------------------------------------------------- metrics

_TB_WARNED = False


def _to_number(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} is a tensor of shape {tuple(value.shape)}; log a scalar "
                             "(e.g. .mean())")
        return float(value.detach().float().item())
    if isinstance(value, np.generic | np.ndarray):
        return float(value)
    return value


class MetricsLogger:
    """Appends ``{"step", "wall_time", **metrics}`` lines to a JSONL file, mirrored to TensorBoard."""

    def __init__(self, path: str | Path, *, tb_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.tb_dir = Path(tb_dir) if tb_dir is not None else None
        self._file: Any = None
        self._writer: Any = None
        self._purge_step: int | None = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, step: int, metrics: Mapping[str, Any], *, wall_time: float | None = None) -> None:
        """Append one line for ``step``; tensors and numpy scalars become floats."""
        clash = {"step", "wall_time"} & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved; rename them")
        wall_time = time.time() if wall_time is None else float(wall_time)
        values = {k: _to_number(k, v) for k, v in metrics.items()}
        self._jsonl().write(json.dumps({"step": int(step), "wall_time": wall_time, **values}) + "\n")
        self._file.flush()
        self._tensorboard(int(step), values, wall_time)

    def _jsonl(self) -> Any:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        return self._file

    def _tensorboard(self, step: int, values: Mapping[str, Any], wall_time: float) -> None:
        writer = self._tb_writer()
        if writer is None:
            return
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                writer.add_scalar(name, value, step, walltime=wall_time)

    def _tb_writer(self) -> Any:
        global _TB_WARNED
        if self._writer is not None or self.tb_dir is None:
            return self._writer
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            if not _TB_WARNED:
                warnings.warn(f"tensorboard is not installed ({e}); logging metrics to JSONL only. "
                              "`pip install tensorboard` to get TensorBoard curves.", stacklevel=3)
                _TB_WARNED = True
            self.tb_dir = None
            return None
        self._writer = SummaryWriter(str(self.tb_dir), purge_step=self._purge_step)
        return self._writer

    def truncate_after(self, step: int) -> int:
        """Drop lines with ``step`` greater than the given one (call on resume); returns how many."""
        self.close()
        self._purge_step = step + 1
        if not self.path.exists():
            return 0
        rows = read_metrics(self.path)
        kept = [r for r in rows if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
        return len(rows) - len(kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All lines of a metrics.jsonl; a truncated last line (from a crash) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"no metrics file at {path}; is this a run directory that has logged?")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # half-written by a crash
            raise DiffalignError(f"{path}:{i + 1} is not a JSON line ({e}); the metrics file is "
                                 "corrupt — delete or fix that line.") from None
    return rows


# --------------------------------------------------------------------------- checkpoints


def _checkpoints_dir(rundir: RunDir | str | Path) -> Path:
    return rundir.checkpoints_dir if isinstance(rundir, RunDir) else Path(rundir) / "checkpoints"


def _clean_temp(ckdir: Path) -> None:
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(_TMP_PREFIX):
                p.unlink(missing_ok=True)


def list_checkpoints(rundir: RunDir | str | Path) -> list[int]:
    """Steps of the complete checkpoints in a run, ascending."""
    ckdir = _checkpoints_dir(rundir)
    if not ckdir.is_dir():
        return []
    steps = []
    for p in ckdir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def _ckpt_name(step: int) -> str:
    return f"step_{step:07d}"


_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _plain_state(value: Any, where: str) -> Any:
    """numpy → torch/python; anything ``torch.load(weights_only=True)`` can't read fails here."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain_state(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple) and not isinstance(value, torch.Size):
        return type(value)(_plain_state(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, _LEAVES):
        return value
    raise TypeError(f"checkpoint {where} is a {type(value).__name__}; checkpoints hold tensors and plain "
                    "python values (dict, list, tuple, numbers, str) — convert it first "
                    "(e.g. config_to_dict(cfg), module.state_dict()).")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(_TMP_PREFIX + path.name)
    tmp.write_text(text)
    tmp.replace(path)


def save_checkpoint(rundir: RunDir | str | Path, step: int, state: Mapping[str, Any], *, keep: int = 2,
                    keep_every: int = 0) -> Path:
    """Write ``checkpoints/step_{step:07d}/state.pt`` atomically, point ``latest`` at it, keep the
    newest ``keep``, and never prune a step that is a multiple of ``keep_every`` (0 = none): the
    kept history that matched-reward comparisons evaluate."""
    if keep < 1:
        raise ValueError(f"keep={keep}; keep at least the checkpoint just written (keep >= 1)")
    if keep_every < 0:
        raise ValueError(f"keep_every={keep_every}; use 0 (prune all but the newest) or a positive step interval")
    ckdir = _checkpoints_dir(rundir)
    ckdir.mkdir(parents=True, exist_ok=True)
    _clean_temp(ckdir)
    name = _ckpt_name(step)
    tmp = ckdir / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(_plain_state(dict(state), "state"), f)
        f.flush()
        os.fsync(f.fileno())
    final = ckdir / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _atomic_write_text(ckdir / LATEST_FILE, name + "\n")
    _prune(ckdir, keep, step, keep_every)
    return final


def _prune(ckdir: Path, keep: int, current: int, keep_every: int = 0) -> None:
    old = [s for s in list_checkpoints(ckdir.parent) if s != current]
    for s in old[: max(0, len(old) - (keep - 1))]:
        if keep_every and s % keep_every == 0:
            continue
        shutil.rmtree(ckdir / _ckpt_name(s), ignore_errors=True)


def checkpoint_dir_step(path: str | Path) -> int | None:
    """The step of a ``<run>/checkpoints/step_NNNNNNN`` directory; None for any other path."""
    path = Path(path)
    m = _CKPT_RE.match(path.name)
    return int(m.group(1)) if m and path.parent.name == "checkpoints" else None


def latest_step(rundir: RunDir | str | Path) -> int | None:
    """Step of the checkpoint a resume would load, or None if the run has none."""
    ckdir = _checkpoints_dir(rundir)
    latest = ckdir / LATEST_FILE
    if latest.is_file():
        m = _CKPT_RE.match(latest.read_text().strip())
        if m and (ckdir / m.group(0) / STATE_FILE).is_file():
            return int(m.group(1))
    steps = list_checkpoints(rundir)  # `latest` lost or stale: the newest complete one
    return steps[-1] if steps else None


def _resolve_step(rundir: RunDir | str | Path, step: int | None) -> int:
    ckdir = _checkpoints_dir(rundir)
    available = list_checkpoints(rundir)
    if step is None:
        found = latest_step(rundir)
        if found is None:
            raise CheckpointError(f"no checkpoint in {ckdir}; nothing to resume. Start a fresh run "
                                  "(without --resume) or point at the right run directory.")
        return found
    if step not in available:
        raise CheckpointError(f"no checkpoint for step {step} at {ckdir / _ckpt_name(step)}; "
                              f"available steps: {available or 'none'}.")
    return step


def load_checkpoint(rundir: RunDir | str | Path, step: int | None = None, *,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the latest checkpoint (or ``step``'s); CheckpointError if missing or corrupt."""
    _clean_temp(_checkpoints_dir(rundir))
    path = _checkpoints_dir(rundir) / _ckpt_name(_resolve_step(rundir, step)) / STATE_FILE
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {first[:200]}). Delete "
            f"{path.parent} to resume from the previous checkpoint, or pass an explicit step."
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict.")
    return state


# --------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """State of the global RNGs: python ``random``, numpy, torch CPU (and CUDA when available)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                        "pos": int(np_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned (also after a torch.save / torch.load round trip)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(_numpy_state(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state:
        _restore_cuda(state["cuda"])


def _numpy_state(s: Mapping[str, Any]) -> dict[str, Any]:
    key = s["state"]["key"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    inner = {"key": key.astype(np.uint32), "pos": int(s["state"]["pos"])}
    return {**s, "state": inner, "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}


def _byte_tensor(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).to(device="cpu", dtype=torch.uint8)


def _restore_cuda(states: list[Any]) -> None:
    if not torch.cuda.is_available():
        warnings.warn("checkpoint holds CUDA RNG state but CUDA is unavailable; skipping it", stacklevel=3)
        return
    if len(states) != torch.cuda.device_count():
        warnings.warn(f"checkpoint holds CUDA RNG state for {len(states)} devices, this machine has "
                      f"{torch.cuda.device_count()}; restoring the common ones", stacklevel=3)
    for i, s in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(_byte_tensor(s), device=i)


def generator_state(g: torch.Generator | np.random.Generator | random.Random) -> Any:
    """Checkpointable state of an explicit generator (torch, numpy or python ``random.Random``)."""
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    if isinstance(g, random.Random):
        return g.getstate()
    raise TypeError(f"generator_state takes a torch, numpy or random.Random generator, got {type(g).__name__}")


def set_generator_state(g: torch.Generator | np.random.Generator | random.Random, state: Any) -> None:
    """Inverse of :func:`generator_state`."""
    if isinstance(g, torch.Generator):
        g.set_state(_byte_tensor(state))
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = dict(state)
    elif isinstance(g, random.Random):
        version, internal, gauss = state
        g.setstate((version, tuple(internal), gauss))
    else:
        raise TypeError(f"set_generator_state takes a torch, numpy or random.Random generator, "
                        f"got {type(g).__name__}")
