"""How a run's config is made: the defaults < a preset < a JSON file < flags, each value
checked as it is layered in, and what a resumed run may still change.

A run is described by a plain nested dict with the sections "model", "data", "augment"
and "train" (plus the preset's name), as saved in its ``config.json``; the sections are
the dataclasses of :mod:`vit_mqa.config.sections`. No torch is imported, so that the command line
answers ``--help`` at once.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any

from ..checkpoint import read_json
from ..errors import VitMqaError
from .checks import checked_setting, dataclass_from_dict
from .presets import DEFAULT_PRESET, PRESETS
from .sections import SECTIONS, DataConfig, ViTConfig

RESUME_OVERRIDABLE = (("train", "epochs"), ("train", "max_steps"), ("train", "device"),
                      ("train", "eval_batch_size"), ("train", "compile"), ("data", "data_dir"),
                      ("train", "tensorboard"))
# Taken from the data (or the model trained on), never from a flag.
DERIVED_MODEL_FIELDS = ("image_size", "in_channels", "num_classes", "classes", "preprocess")


def parse_duration(text: str) -> float:
    """Seconds from "180", "180s", "3m", "3min", "1.5h"."""
    units = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    number = text.strip().rstrip("".join(units)).strip()
    unit = text.strip()[len(number):].strip() or "s"
    try:
        seconds = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"not a duration: {text!r} (e.g. 180, 180s, 3m, 1h)") from None
    return seconds


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the string literal under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def default_config() -> dict[str, dict[str, Any]]:
    config = {}
    for section, cls in SECTIONS.items():
        config[section] = {f.name: copy.deepcopy(f.default) for f in dataclasses.fields(cls)}
    config["model"]["image_size"] = list(ViTConfig().image_size)
    return config


def field_section(name: str) -> str:
    """The section that owns a flat setting name (names are unique across sections)."""
    for section, cls in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            if section == "model" and name in DERIVED_MODEL_FIELDS:
                continue  # e.g. image_size: the data section's is the one to set
            return section
    raise VitMqaError(f"unknown setting {name!r}")


def _merge(config: dict[str, dict[str, Any]], layer: dict[str, Any], origin: str) -> None:
    for section, values in layer.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise VitMqaError(f"{origin}: unknown config section {section!r} "
                              f"(expected {', '.join(SECTIONS)})")
        for key, value in values.items():
            if key not in config[section]:
                raise VitMqaError(f"{origin}: unknown setting {section}.{key}")
            config[section][key] = checked_value(section, key, value, origin)


def checked_value(section: str, key: str, value: Any, origin: str) -> Any:
    """The value if its type fits the setting (ints are accepted for floats), else an error."""
    return checked_setting(SECTIONS[section], key, value, f"{origin}: {section}")


def sectioned(overrides: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Overrides by section, from flat setting names ({"lr": 1e-3}, as the flags give
    them), sections ({"train": {"lr": 1e-3}}, as config.json holds them), or both."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in (overrides or {}).items():
        if name in SECTIONS and isinstance(value, dict):
            out.setdefault(name, {}).update(value)
        else:
            out.setdefault(field_section(name), {})[name] = value
    return out


def build_config(preset: str | None = None, config_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None,
                 init_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """defaults < preset < init_model < JSON config file < overrides (flat setting names,
    sections, or both: see ``sectioned``). The one way a run's config is made; what it
    returns is not changed afterwards (training records it as it is, plus what the data
    and the machine decide: image size, classes, CPU speed-ups).

    ``init_model`` is the "model" section of a run to start from (``--init-from``):
    its architecture replaces the preset's.
    """
    config: dict[str, Any] = default_config()
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise VitMqaError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    _merge(config, PRESETS[preset], f"preset {preset}")
    if init_model is not None:
        shape = {k: v for k, v in init_model.items() if k not in DERIVED_MODEL_FIELDS}
        _merge(config, {"model": shape}, "`init_from` config.json")
    if config_file is not None:
        path = Path(config_file)
        layer = read_json(path, f"cannot read config file {path}")
        if not isinstance(layer, dict):
            raise VitMqaError(f"config file {path} must hold a JSON object")
        _merge(config, layer, str(path))
    for section, values in sectioned(overrides).items():
        for name, value in values.items():
            if name not in config[section]:
                raise VitMqaError(f"unknown setting {section}.{name}")
            config[section][name] = checked_value(section, name, value, "override")
    config["preset"] = preset
    return config


def resume_config(saved: dict[str, Any], overrides: dict[str, Any] | None,
                  where: str | Path) -> dict[str, Any]:
    """A run's saved config with the few settings a resume may change replaced
    (``overrides`` as ``build_config`` takes them)."""
    missing = [k for k in SECTIONS if not isinstance(saved.get(k), dict)]
    if missing:
        raise VitMqaError(f"cannot resume {where}: its config.json has no "
                          f"{', '.join(missing)} section (not a training run)")
    config = {k: copy.deepcopy(saved[k]) for k in (*SECTIONS, "preset") if k in saved}
    for section, values in sectioned(overrides).items():
        for key, value in values.items():
            if (section, key) not in RESUME_OVERRIDABLE:
                allowed = ", ".join(f"`{k}`" for _, k in RESUME_OVERRIDABLE)
                raise VitMqaError(f"`{key}` cannot change on `resume` (the run keeps its "
                                  f"settings; allowed: {allowed})")
            config[section][key] = checked_value(section, key, value, "resume")
    return config


def data_config_from_dict(d: Any, where: str | Path) -> DataConfig:
    """A run's "data" section, checked."""
    try:
        return dataclass_from_dict(DataConfig, d, '"data"')
    except VitMqaError as e:
        raise VitMqaError(f"{where}: {e}") from None
