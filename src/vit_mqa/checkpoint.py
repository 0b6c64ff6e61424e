"""Run directories and atomic file writes.

A run directory, as written by ``vit-mqa train``::

    config.json            model, data, augment, train settings and preprocessing
    model.safetensors      weights with the best validation accuracy
    last.safetensors       weights after the latest epoch
    training_state.pt      optimizer, scheduler, RNG states and counters, for --resume
    metrics.jsonl          one JSON line per epoch
    results.json           final test metrics

``config.json`` + ``model.safetensors`` alone is also a valid model directory
(``VisionTransformer.save_pretrained``). Every file is written under a temporary
name in the same folder and renamed into place, so a killed process never leaves
a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import VitMqaError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LAST_WEIGHTS_NAME = "last.safetensors"
STATE_NAME = "training_state.pt"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"

# mkstemp creates files readable by the owner only; give written files the usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def load_weights(model: torch.nn.Module, path: str | Path,
                 map_location: str | torch.device = "cpu") -> None:
    """Load safetensors weights strictly; any mismatch is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise VitMqaError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise VitMqaError(f"cannot read weights {path}: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
        for k in wrong[:4]:
            parts.append(f"{k} has shape {tuple(state[k].shape)}, "
                         f"model wants {tuple(expected[k].shape)}")
        raise VitMqaError(f"weights {path} do not match the model config: {'; '.join(parts)}")
    model.load_state_dict(state)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The config.json of a run or model directory, or a clear error."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise VitMqaError(f"{directory} is not a directory")
    if not path.is_file():
        raise VitMqaError(f"{directory} is not a vit-mqa run directory (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitMqaError(f"cannot parse {path}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise VitMqaError(f"{path} has no \"model\" section: not a vit-mqa config")
    return config


def save_model_dir(model: torch.nn.Module, directory: str | Path,
                   extra_config: dict[str, Any] | None = None) -> None:
    directory = Path(directory)
    config = {"model": model.config.to_dict(), **(extra_config or {})}
    save_weights(model, directory / WEIGHTS_NAME)
    write_json(directory / CONFIG_NAME, config)


def load_model_dir(directory: str | Path, weights: str = WEIGHTS_NAME,
                   map_location: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, full config dict) from a run or model directory."""
    from .model import VisionTransformer, ViTConfig

    config = read_config(directory)
    try:
        model = VisionTransformer(ViTConfig.from_dict(config["model"]))
    except TypeError as e:
        path = Path(directory) / CONFIG_NAME
        raise VitMqaError(f"{path}: malformed model config ({e})") from None
    load_weights(model, Path(directory) / weights, map_location)
    return model.to(map_location).eval(), config


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise VitMqaError(f"cannot resume: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise VitMqaError(f"cannot resume: {path} is unreadable ({type(e).__name__})") from None
