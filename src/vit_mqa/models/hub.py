"""Model folders and the Hugging Face Hub: what a trained model offers besides its network.

A model folder is a ``config.json`` (architecture, preprocessing, class names) beside a
``model.safetensors``, as in Hugging Face; a training run's directory is one too.
``resolve_model_dir`` finds a folder from a path, a built-in model's name or a Hub id,
``save_model_dir`` writes one and ``load_model`` reads one. ``PretrainedMixin`` gives the
model class ``save_pretrained`` (with a Hub model card) / ``push_to_hub`` and
``from_pretrained``, the model's identity (``classes``, ``preprocess``, kept in its config),
and timm's fine-tuning helpers ``reset_classifier`` and ``no_weight_decay``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_text,
    check_weights_file,
    load_weights,
    read_config,
    read_weights_header,
    save_weights,
    write_json,
)
from ..config.checks import TEMPERATURE_RANGE, checked_classes, checked_preprocess
from ..config.sections import ViTConfig
from ..data.preprocess import Preprocess
from ..errors import VitMqaError
from .builtin import builtin_dir, is_builtin_name

ModelT = TypeVar("ModelT", bound=nn.Module)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for part in parts for c in part))


def resolve_model_dir(name_or_path: str | Path, weights: str = WEIGHTS_NAME,
                      **hub_options: Any) -> Path:
    """A local directory as it is; a built-in model's name ("vit-mqa/mnist") that is not a
    local folder -> its directory inside the package; a Hub id ("user/name") -> the cached
    snapshot holding its config.json and weights (downloaded if needed)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if is_builtin_name(name_or_path):
        return builtin_dir(str(name_or_path))
    if not _looks_like_repo_id(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=[CONFIG_NAME, weights],
                                      **hub_options))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitMqaError(f"{name_or_path} is not a local directory, and the Hugging Face "
                          f"Hub model of that name could not be fetched ({reason})") from None


def save_model_dir(model: nn.Module, directory: str | Path,
                   extra_config: dict[str, Any] | None = None) -> None:
    """config.json (the model's config, identity included, and ``extra_config``) and
    model.safetensors, each written atomically."""
    directory = Path(directory)
    config = {"model": model.config.to_dict(), **(extra_config or {})}
    save_weights(model, directory / WEIGHTS_NAME)
    write_json(directory / CONFIG_NAME, config)


def model_config_from(config: dict[str, Any], where: str | Path) -> ViTConfig:
    """The model config of a config.json, checked. Folders written before the class names
    and preprocessing moved into the "model" section keep them beside it ("classes",
    "preprocess" with the image size and channels); they are read from there."""
    model = config["model"]
    try:
        if isinstance(model, dict) and ("preprocess" not in model or "classes" not in model):
            model = {**model, **legacy_identity(config, model)}
        return ViTConfig.from_dict(model)
    except TypeError as e:
        raise VitMqaError(f"{where}: malformed model config ({e})") from None
    except VitMqaError as e:
        raise VitMqaError(f"{where}: {e}") from None


def legacy_identity(config: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The class names and preprocessing that an older config.json keeps beside its
    "model" section, in the model section's form (empty when it has none there)."""
    found: dict[str, Any] = {}
    if "classes" not in model and config.get("classes") not in (None, []):
        found["classes"] = config["classes"]
    if "preprocess" not in model and "preprocess" in config:
        pre = Preprocess.from_dict(config["preprocess"])
        size = model.get("image_size", ViTConfig.image_size)
        size = tuple(size) if isinstance(size, list) else (size, size)
        channels = model.get("in_channels", ViTConfig.in_channels)
        if tuple(pre.image_size) != size or pre.in_channels != channels:
            raise VitMqaError(f"preprocess gives {pre.in_channels}x{pre.image_size[0]}x"
                              f"{pre.image_size[1]} images, the model takes {channels}x"
                              f"{size[0]}x{size[1]}")
        data = config.get("data")
        dataset = data.get("dataset") if isinstance(data, dict) else None
        if "procedure" not in config["preprocess"] and dataset in ("mnist", "fashion-mnist"):
            # Saved before the procedure was recorded: people's drawings and photos need the
            # dataset's own normalisation, not a plain stretch.
            pre.procedure = dataset
        found["preprocess"] = pre.model_config_entry()
    return found


def load_model(model_class: Callable[[ViTConfig], ModelT], directory: str | Path,
               weights: str = WEIGHTS_NAME, map_location: str | torch.device = "cpu",
               **hub_options: Any) -> tuple[ModelT, dict[str, Any]]:
    """(``model_class(config)`` with the folder's weights, in eval mode; the full config
    dict) from a run or model directory, or a Hub model id (``hub_options`` go to
    ``huggingface_hub.snapshot_download``). The model's config carries its class names and
    preprocessing."""
    directory = resolve_model_dir(directory, weights, **hub_options)
    config = read_config(directory)
    model_config = model_config_from(config, Path(directory) / CONFIG_NAME)
    path = Path(directory) / weights
    stored = sum(math.prod(shape) for shape, _ in read_weights_header(path).values())
    wanted = model_config.num_parameters()
    # A config.json that asks for far more than the weights file holds (which safetensors
    # bounds by the file's size) fails before the model is built, so that a downloaded
    # directory cannot make the loader allocate without limit. (Cheaper than a skeleton on
    # the meta device, whose first use imports 0.4 s of torch.)
    if wanted > 2 * stored + (1 << 20):
        raise VitMqaError(f"weights {path} do not match the model config: the file holds "
                          f"{stored:,} values, the config asks for {wanted:,}")
    model = model_class(model_config)
    check_weights_file(path, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    load_weights(model, path, map_location)
    return model.to(map_location).eval(), config


def model_card(metadata: dict[str, Any]) -> str:
    """A README.md model card for the Hub: its metadata as YAML front matter."""
    lines = ["---"]
    for key, value in metadata.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {v}" for v in value)]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join([*lines, "---", "", "A Vision Transformer whose query heads share "
                      "their keys and values (multi-query / grouped-query attention), made "
                      "with [vit-mqa](https://pypi.org/project/vit-mqa/):", "", "```python",
                      "from vit_mqa import VisionTransformer", "",
                      'model = VisionTransformer.from_pretrained("this/repo")', "```", ""])


class PretrainedMixin:
    """Hugging Face-style directories (config.json + model.safetensors) and the Hub, and
    the helpers that adapt a trained model to fine-tuning, for a model class that has
    ``config``, a linear ``head`` and ``_init_head``. The Hub's own package is imported
    only to push or download: reading a local folder and predicting do without it."""

    config: ViTConfig
    head: nn.Linear
    card_metadata: dict[str, Any] = {}

    def __init_subclass__(cls, **metadata: Any) -> None:
        # The model card's metadata, given in the class statement (library_name, tags, ...).
        super().__init_subclass__()
        cls.card_metadata = {**cls.card_metadata, **metadata}

    def save_pretrained(self, save_directory: str | Path, *, push_to_hub: bool = False,
                        repo_id: str | None = None, **push_options: Any) -> str | None:
        """config.json, model.safetensors and a README.md model card (kept if there is
        one) in ``save_directory``; with ``push_to_hub``, also uploaded to ``repo_id``
        (default: the folder's name). Returns the upload's URL when pushed."""
        directory = Path(save_directory)
        save_model_dir(self, directory)
        card = directory / "README.md"
        if not card.exists():
            atomic_write_text(card, model_card(self.card_metadata))
        if push_to_hub:
            return self.push_to_hub(repo_id or directory.name, **push_options)
        return None

    def push_to_hub(self, repo_id: str, *, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload vit-mqa model",
                    **upload_options: Any) -> str:
        """Save into a temporary folder and upload it to the Hub repository ``repo_id``
        (made if missing); returns the commit's URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo, folder_path=tmp,
                                     commit_message=commit_message, **upload_options)
        return str(info)

    def _init_head(self) -> None:
        raise NotImplementedError  # the model's own initialisation of a new head

    # The model's identity lives in its config, so every copy made from the config (loading,
    # conversion, resizing, create_model) keeps it.
    @property
    def classes(self) -> list[str]:
        """The names of the outputs, in order (a new model's: "0", "1", ...)."""
        return list(self.config.classes or (str(i) for i in range(self.config.num_classes)))

    @classes.setter
    def classes(self, names: Sequence[str]) -> None:
        self.config.classes = checked_classes(list(names), self.config.num_classes)

    @property
    def preprocess(self) -> Preprocess:
        """What turns pictures into this model's input (a new model's: pixels to [-1, 1])."""
        return Preprocess.of_model(self.config)

    @preprocess.setter
    def preprocess(self, pre: Preprocess) -> None:
        c = self.config
        if tuple(pre.image_size) != tuple(c.image_size) or pre.in_channels != c.in_channels:
            raise VitMqaError(f"preprocess gives {pre.in_channels}x{pre.image_size[0]}x"
                              f"{pre.image_size[1]} images, the model takes {c.in_channels}x"
                              f"{c.image_size[0]}x{c.image_size[1]}")
        c.preprocess = checked_preprocess(pre.model_config_entry(), c.in_channels)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes
        (and record it in ``config``), e.g. to fine-tune on another label set."""
        # Validated as a config would be (type, >= 1, parameter limit) before allocating.
        dataclasses.replace(self.config, num_classes=num_classes, classes=None)
        old = self.head.weight
        self.head = nn.Linear(self.config.dim, num_classes, device=old.device, dtype=old.dtype)
        self._init_head()
        self.config.num_classes = num_classes
        self.config.classes = None  # the new outputs are "0", "1", ...

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters to train without weight decay besides the 1-D ones
        (biases, norms), as in timm."""
        names = {"pos_embed", "cls_token"}
        return {name for name, _ in self.named_parameters() if name in names}

    @classmethod
    def from_pretrained(
        cls: type[ModelT], pretrained_model_name_or_path: str | Path, *,
        weights: str = WEIGHTS_NAME, map_location: str | torch.device = "cpu",
        revision: str | None = None, cache_dir: str | Path | None = None,
        force_download: bool = False, local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> ModelT:
        """A model directory or run (``save_pretrained``, ``vit-mqa train``), or a model
        on the Hugging Face Hub ("user/name", downloaded into the Hub's cache and read
        from there when offline), in eval mode with its ``preprocess`` and ``classes``."""
        return load_model(cls, pretrained_model_name_or_path, weights, map_location,
                          revision=revision, cache_dir=cache_dir,
                          force_download=force_download,
                          local_files_only=local_files_only, token=token)[0]


def run_thresholds(config: dict[str, Any], where: object) -> dict[str, float]:
    """A run's fitted decision thresholds, checked: "unknown_energy" (above it, none of
    the classes) and "unsure_below" (a calibrated top probability); each absent when the
    run has none."""
    entry = config.get("calibration")
    found = entry.get("thresholds") if isinstance(entry, dict) else None
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise VitMqaError(f"{where}: calibration.thresholds must be an object")
    out = {}
    for key, lo, hi in (("unknown_energy", -1e6, 1e6), ("unsure_below", 0.0, 1.0)):
        value = found.get(key)
        if value is None:
            continue
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and lo <= value <= hi):
            raise VitMqaError(f"{where}: calibration.thresholds.{key} must be a number in "
                              f"[{lo:g}, {hi:g}], got {value!r}")
        out[key] = float(value)
    return out


def run_temperature(config: dict[str, Any], where: object) -> float:
    """A run's fitted temperature, checked (config.json may come from a download); 1.0
    for runs saved without one."""
    entry = config.get("calibration")
    if entry is None:
        return 1.0
    t = entry.get("temperature") if isinstance(entry, dict) else None
    lo, hi = TEMPERATURE_RANGE
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
            and lo <= t <= hi):
        raise VitMqaError(f"{where}: calibration.temperature must be a number in "
                          f"[{lo:g}, {hi:g}], got {t!r}")
    return float(t)
