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

from .checkpoint import WEIGHTS_NAME, describe_mismatch, load_model_dir
from .errors import VitMqaError
from .interop import adapt_state_dict
from .model import VisionTransformer, ViTConfig
from .presets import DEFAULT_PRESET, PRESETS


def create_model(name_or_preset: str | None = None, pretrained: str | Path | None = None,
                 num_classes: int | None = None, image_size: int | tuple[int, int] | None = None,
                 **overrides: Any) -> VisionTransformer:
    """A VisionTransformer built from a preset (e.g. "mnist-fast", "vit-ti").

    ``pretrained``: a model or run directory whose best weights to load; its config
    supplies what the preset does not fix (image size, channels, classes, norm_eps, ...),
    and ``name_or_preset`` may then be None to take its architecture as it is. Without
    it, ``name_or_preset`` defaults to the default preset. ``overrides`` are "model"
    config fields (``dim=96``, ``drop_path=0.1``, ``in_channels=3``, ...). A pretrained
    model is returned in eval mode (as ``from_pretrained``), a new one in train mode.
    """
    if name_or_preset is None and pretrained is None:
        name_or_preset = DEFAULT_PRESET
    fields = ViTConfig().to_dict()
    source: VisionTransformer | None = None
    if pretrained is not None:
        source, _ = load_model_dir(pretrained, WEIGHTS_NAME, "cpu")
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
    config = ViTConfig.from_dict(fields)
    if source is None:
        return VisionTransformer(config)

    # Load into the pretrained number of classes, then replace the head if that differs.
    loading = ViTConfig.from_dict({**config.to_dict(), "num_classes": source.config.num_classes})
    model = VisionTransformer(loading)
    state = adapt_state_dict(source.state_dict(), source.config, loading)
    mismatch = describe_mismatch({k: tuple(v.shape) for k, v in state.items()},
                                 {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if mismatch:
        raise VitMqaError(f"the weights in {pretrained} do not fit this model ({mismatch})")
    model.load_state_dict(state)
    if config.num_classes != loading.num_classes:
        model.reset_classifier(config.num_classes)
    return model.eval()
