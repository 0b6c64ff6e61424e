"""What a run directory holds across epochs: recorded paths, the config a resumed run
keeps, metrics cut back to the last saved epoch, and the error of a diverged run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..checkpoint import CONFIG_NAME, atomic_write_text, read_config
from ..config.recipe import resume_config
from ..data.datasets import DATASETS
from ..device import launched_by_torchrun
from ..errors import VitMqaError
from ..models.hub import legacy_identity


def absolute_data_paths(data: dict[str, Any]) -> dict[str, Any]:
    """The "data" section with its paths absolute (a new dict), as a run records them, so
    that `vit-mqa eval RUN` works from any folder."""
    data = dict(data)
    if data.get("data_dir"):
        data["data_dir"] = str(Path(data["data_dir"]).expanduser().absolute())
    dataset = data.get("dataset")
    if isinstance(dataset, str) and dataset not in DATASETS and Path(dataset).expanduser().is_dir():
        data["dataset"] = str(Path(dataset).expanduser().absolute())
    return data


def default_run_dir(preset: str) -> Path:
    """Where a run goes without --out: runs/PRESET-TIME, made here (-2, -3, ... when taken,
    so that two runs started in the same second get different folders). Every torchrun
    process must pick the same one, so there it is named after the run id instead."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") if launched_by_torchrun() else None
    if run_id:
        return Path(f"runs/{preset}-{run_id}")
    stem = f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = Path(stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()  # exclusive: only one process gets each name
            return candidate
        except FileExistsError:
            continue
    raise VitMqaError(f"no free run directory name beside {stem}; pass --out DIR")


def diverged_error(run_dir: Path, epoch: int, step: int, lr: float) -> VitMqaError:
    """The error that stops a run whose loss is no longer finite. Nothing of the diverged
    epoch is saved: the checkpoints on disk are those of the last good epoch."""
    kept = (f"{run_dir} keeps the weights and state of epoch {epoch}" if epoch > 0
            else "no epoch finished, so no weights were saved")
    return VitMqaError(f"training diverged: the loss is NaN or infinite in epoch {epoch + 1} "
                       f"(by step {step}); {kept}; try a lower `lr` (now {lr:g})")


def metrics_epoch(path: Path, number: int, line: str) -> int:
    try:
        record = json.loads(line)
        epoch = record.get("epoch", 0) if isinstance(record, dict) else None
    except json.JSONDecodeError:
        epoch = None
    if type(epoch) is not int:
        raise VitMqaError(f"cannot resume: line {number} of {path} is not an epoch record")
    return epoch


def keep_metrics_up_to(path: Path, epoch: int) -> None:
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        kept = [x for n, x in enumerate(lines, 1) if metrics_epoch(path, n, x) <= epoch]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(x + "\n" for x in kept))


def resumed_config(run_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's own config; only settings that do not change the run may be overridden."""
    saved = read_config(run_dir)
    try:
        saved["model"] = {**saved["model"], **legacy_identity(saved, saved["model"])}
    except VitMqaError as e:
        raise VitMqaError(f"{run_dir / CONFIG_NAME}: {e}") from None
    return resume_config(saved, overrides, run_dir)
