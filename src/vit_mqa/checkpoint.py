"""Run directories and atomic file writes.

A run directory, as written by ``vit-mqa train``::

    config.json            model, data, augment, train settings and preprocessing
    model.safetensors      weights with the best validation accuracy
    last.safetensors       weights after the latest epoch
    training_state.pt      model, optimizer, scheduler, weight average and counters, for --resume
    metrics.jsonl          one JSON line per epoch
    results.json           final test metrics

``config.json`` + ``model.safetensors`` alone is also a valid model directory
(``VisionTransformer.save_pretrained``). Every file is written under a temporary
name in the same folder and renamed into place, so a killed process never leaves
a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from .errors import VitMqaError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LAST_WEIGHTS_NAME = "last.safetensors"
STATE_NAME = "training_state.pt"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"


@dataclass
class TrainingProgress:
    """The counters of a run, saved in training_state.pt beside the module states
    (STATE_MODULES) after every epoch, and restored on --resume."""

    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps so far
    best_val_accuracy: float = -1.0
    best_epoch: int = -1  # the epoch whose weights are model.safetensors (-1: none yet)
    elapsed_s: float = 0.0  # training seconds, cumulative over resumes


# The state_dicts saved beside the counters ("ema" only when the run averages weights).
STATE_MODULES = ("model", "optimizer", "scheduler", "ema")

# mkstemp creates files readable by the owner only; give written files the usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    A failed write (a full disk, say) leaves no file behind and is one error that names
    the file and the cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise VitMqaError(f"cannot write {path}: {_write_failure(path, e)}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _write_failure(path: Path, error: BaseException) -> str:
    # torch.save reports a full disk as "unexpected pos ..."; safetensors in its own words.
    # Ask the file system instead of parsing either.
    try:
        full = shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        full = False
    if full or getattr(error, "errno", None) == errno.ENOSPC:
        return "no space left on device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


LOCK_NAME = ".lock"
# Files that a run directory may hold before a run starts in it.
_IGNORED_NAMES = (LOCK_NAME,)


def run_dir_has_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in _IGNORED_NAMES for p in run_dir.iterdir())


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of writes that a killed process left behind (only ever
    called by the process that holds the run's lock)."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run directory, held for as long as a process trains into it,
    so that a second run, or a resume of a run still going, is refused at once.

    The lock is the kernel's (``flock``): it goes with the process, however that ends.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not protected from each other
            return self
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise VitMqaError(f"{self.run_dir} is in use by another training process "
                              f"(pid {holder}); wait for it to end, or choose another "
                              "run directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        # Removed while still held, so the run directory holds only the run's own files; a
        # run that failed before writing anything leaves no folder behind.
        (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
        if self._created and not run_dir_has_files(self.run_dir):
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
        os.close(self._fd)  # releases the lock
        self._fd = None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line by rewriting the (small) file atomically."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    atomic_write_text(path, old + json.dumps(record) + "\n")


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


# Weight dtypes a model file may hold; anything else (an int64 head, say) is not weights.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def read_weights_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in a safetensors file, from its header alone
    (nothing is allocated for the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise VitMqaError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise VitMqaError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None


def describe_mismatch(found: dict[str, tuple[int, ...]],
                      expected: dict[str, tuple[int, ...]]) -> str:
    """What differs between two name -> shape maps, briefly; "" when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != expected[k])
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:4])}"
                     f"{' ...' if len(unexpected) > 4 else ''}")
    for k in wrong[:4]:
        parts.append(f"{k} has shape {tuple(found[k])}, model wants {tuple(expected[k])}")
    return "; ".join(parts)


def check_weights_file(path: str | Path, expected: dict[str, tuple[int, ...]]) -> None:
    """The file's tensors have exactly the expected names and shapes, and float dtypes
    (BatchNorm's counters: int64);
    checked from the header before anything is read or built."""
    header = read_weights_header(path)
    mismatch = describe_mismatch({k: shape for k, (shape, _) in header.items()}, expected)
    if mismatch:
        raise VitMqaError(f"weights {path} do not match the model config: {mismatch}")
    # BatchNorm's step counter (in the conv stem) is the one integer tensor.
    not_float = sorted(k for k, (_, dtype) in header.items() if dtype not in _FLOAT_DTYPES
                       and not (k.endswith(".num_batches_tracked") and dtype == "I64"))
    if not_float:
        k = not_float[0]
        raise VitMqaError(f"weights {path}: {k} is {header[k][1]}, not a float tensor")


def load_weights(model: torch.nn.Module, path: str | Path,
                 map_location: str | torch.device = "cpu") -> None:
    """Load safetensors weights strictly; any mismatch, or a NaN or infinite value, is one
    clear error."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    check_weights_file(path, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise VitMqaError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise VitMqaError(f"weights {path} hold NaN or infinite values (in {', '.join(bad[:4])}"
                          f"{' ...' if len(bad) > 4 else ''}): the run that wrote them diverged")
    model.load_state_dict(state)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The config.json of a run or model directory, or a clear error."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise VitMqaError(f"{directory} is not a directory")
    if not path.is_file():
        raise VitMqaError(f"{directory} is not a vit-mqa run directory (no {CONFIG_NAME})")
    config = read_json(path, f"cannot parse {path}")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise VitMqaError(f"{path} has no \"model\" section: not a vit-mqa config")
    return config


def save_training_state(path: str | Path, modules: dict[str, Any],
                        progress: TrainingProgress) -> None:
    """``modules``: state_dicts named as in STATE_MODULES."""
    import torch

    atomic_write(path, lambda tmp: torch.save({**modules, **dataclasses.asdict(progress)}, tmp))


def load_training_state(path: str | Path) -> tuple[dict[str, Any], TrainingProgress]:
    """(module state_dicts, counters) from training_state.pt, every part checked."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VitMqaError(f"cannot resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise VitMqaError(f"cannot resume: {path} is unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise VitMqaError(f"cannot resume: {path} holds a {type(state).__name__}, "
                          "not a training state")
    # elapsed_s is optional: runs saved before it was recorded resume from 0 s.
    required = [*STATE_MODULES[:3], *(f.name for f in dataclasses.fields(TrainingProgress)
                                      if f.name != "elapsed_s")]
    missing = [k for k in required if k not in state]
    if missing:
        raise VitMqaError(f"cannot resume: {path} has no {', '.join(missing)}")
    counters = ("epoch", "step", "best_epoch")
    if not all(type(state[k]) is int and state[k] >= (-1 if k == "best_epoch" else 0)
               for k in counters):
        raise VitMqaError(f"cannot resume: {path} has malformed counters "
                          f"({', '.join(f'{k}={state[k]!r}' for k in counters)})")
    for key in ("elapsed_s", "best_val_accuracy"):
        value = state.get(key, 0.0)
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not value >= (0 if key == "elapsed_s" else -1)):
            raise VitMqaError(f"cannot resume: {path} has a malformed {key} ({value!r})")
    if not all(isinstance(state[k], dict) for k in STATE_MODULES[:3]):
        raise VitMqaError(f"cannot resume: {path} has malformed model or optimizer state")
    modules = {k: state[k] for k in STATE_MODULES if k in state}
    progress = TrainingProgress(state["epoch"], state["step"],
                                float(state["best_val_accuracy"]), state["best_epoch"],
                                float(state.get("elapsed_s", 0.0)))
    return modules, progress


def read_json(path: Path, failure: str) -> Any:
    """The JSON value in the file ``path``; a file that cannot be read, decoded or parsed
    is a VitMqaError "``failure``: the reason" (the reason's first line)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitMqaError(f"{failure}: {str(e).splitlines()[0]}") from None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
