"""``create_model``: a model from a preset name, optionally with a run's weights (as timm's).

The architecture is layered: the defaults < the pretrained directory's "model" config
(when given) < the preset's "model" section < ``overrides`` < ``num_classes`` /
``image_size``. Fine-tuning changes are adapted as ``--init-from`` does: another
``num_classes`` gets a freshly initialised head (``reset_classifier``), another
``image_size`` bicubically resampled position embeddings. Any other difference from the
pretrained architecture is an error naming the mismatched weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.presets import DEFAULT_PRESET, PRESETS
from ..errors import VitMqaError
from .adapt import copy_with, transfer_weights
from .builtin import BUILTIN_MODELS, preset_weights
from .vit import VisionTransformer, ViTConfig


def create_model(name_or_preset: str | None = None,
                 pretrained: bool | str | Path | None = None,
                 num_classes: int | None = None, image_size: int | tuple[int, int] | None = None,
                 **overrides: Any) -> VisionTransformer:
    """A VisionTransformer built from a preset (e.g. "mnist-fast", "vit-ti").

    ``pretrained=True``: the built-in weights of ``name_or_preset``, a built-in model's
    name ("vit-mqa/mnist") or the preset that trained it ("mnist-pretrained").
    ``pretrained`` as a path or name: a model or run directory (or a built-in or Hub
    model) whose best weights to load; its config
    supplies what the preset does not fix (image size, channels, classes, norm_eps, ...),
    and ``name_or_preset`` may then be None to take its architecture as it is. Without
    it, ``name_or_preset`` defaults to the default preset. ``overrides`` are "model"
    config fields (``dim=96``, ``drop_path=0.1``, ``in_channels=3``, ...). A pretrained
    model is returned in eval mode (as ``from_pretrained``), a new one in train mode.
    """
    if pretrained is True:
        if name_or_preset in BUILTIN_MODELS:
            name_or_preset, pretrained = None, name_or_preset
        else:
            pretrained = preset_weights(name_or_preset or DEFAULT_PRESET)
            if pretrained is None:
                with_weights = [*BUILTIN_MODELS, *BUILTIN_MODELS.values()]
                raise VitMqaError(f"{name_or_preset or DEFAULT_PRESET!r} has no built-in "
                                  f"weights; pretrained=True takes one of "
                                  f"{', '.join(with_weights)}")
    elif pretrained is False:
        pretrained = None
    if name_or_preset is None and pretrained is None:
        name_or_preset = DEFAULT_PRESET
    fields = ViTConfig().to_dict()
    source: VisionTransformer | None = None
    if pretrained is not None:
        source = VisionTransformer.from_pretrained(pretrained)
        fields.update(source.config.to_dict())
    if name_or_preset is not None:
        if name_or_preset not in PRESETS:
            raise VitMqaError(f"unknown model name {name_or_preset!r}; choose from "
                              f"{', '.join(PRESETS)}")
        fields.update(PRESETS[name_or_preset].get("model", {}))
    fields.update(overrides)
    if num_classes is not None:
        fields["num_classes"] = num_classes
    if image_size is not None:
        fields["image_size"] = image_size
    if source is None:
        return VisionTransformer(ViTConfig.from_dict(fields))
    model = copy_with(source, **fields)  # keeps the source's class names and preprocessing
    transfer_weights(model, source, pretrained)  # refuses another channel count
    return model.eval()
