"""The models that ship inside the package: ``vit-mqa/mnist`` and ``vit-mqa/fashion-mnist``.

Each is a model directory (config.json with the preprocessing, the fitted temperature and
the recipe; model.safetensors) plus card.json: what it was trained with, how it was
measured and the SHA-256 of its weights. They resolve from the installed package,
offline, wherever a run directory is accepted (``resolve_model_dir``); a local folder of
the same name wins. ``scripts/pretrained.py`` trains and exports them again.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import VitMqaError

PREFIX = "vit-mqa/"
# Built-in name -> the preset that trains it (with seed 0).
BUILTIN_MODELS = {"vit-mqa/mnist": "mnist-pretrained",
                  "vit-mqa/fashion-mnist": "fmnist-pretrained"}
CARD_NAME = "card.json"


def builtin_root() -> Path:
    return Path(str(resources.files("vit_mqa") / "pretrained"))


def builtin_dir(name: str) -> Path:
    """The packaged directory of a built-in model; one line naming the built-in models
    for another "vit-mqa/..." name or a package installed without them."""
    if name not in BUILTIN_MODELS:
        raise VitMqaError(f"unknown built-in model {name!r}: the built-in models are "
                          f"{', '.join(BUILTIN_MODELS)}")
    path = builtin_root() / name.removeprefix(PREFIX)
    if not (path / "model.safetensors").is_file():
        raise VitMqaError(f"the weights of {name} are missing from the installed package "
                          f"({path}); reinstall vit-mqa")
    return path


def is_builtin_name(name: str | Path) -> bool:
    """Whether ``name`` is in the built-in namespace ("vit-mqa/..."), known or not."""
    return isinstance(name, str) and name.startswith(PREFIX)


def preset_weights(preset: str) -> str | None:
    """The built-in model trained by ``preset`` (e.g. "mnist-pretrained"), if any."""
    return next((name for name, p in BUILTIN_MODELS.items() if p == preset), None)


def model_card(name: str) -> dict[str, Any]:
    """A built-in model's card.json: figures, recipe, command, CPU, size and SHA-256."""
    path = builtin_dir(name) / CARD_NAME
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VitMqaError(f"cannot read {path} ({e}); reinstall vit-mqa") from None
    if not isinstance(card, dict):
        raise VitMqaError(f"{path} does not hold a model card; reinstall vit-mqa")
    return card


def card_text(name: str) -> str:
    """The card as a few lines of text, for ``vit-mqa models``."""
    card = model_card(name)
    lines = [f"{name}: {card['summary']}",
             f"  {card['parameters']:,} parameters, {card['size_bytes'] / 1e6:.2f} MB "
             f"(model.safetensors, SHA-256 {card['sha256']})"]
    for figure in card["figures"]:
        shown = (f"{100 * figure['accuracy']:.2f} %" if "accuracy" in figure
                 else f"{100 * figure['declined']:.1f} % declined"
                 + (f", {100 * figure['answered_accuracy']:.1f} % of the answered right"
                    if "answered_accuracy" in figure else ""))
        lines.append(f"  {figure['what']}: {shown}"
                     + (f" ({figure['images']:,} images)" if figure.get("images") else ""))
    lines.append(f"  trained with: {card['command']}")
    lines.append(f"  on: {card['cpu']} ({card['train_time_s']:.0f} s of training, "
                 f"{card['train_time_note']})")
    return "\n".join(lines)
