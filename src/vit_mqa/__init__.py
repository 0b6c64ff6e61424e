"""vit-mqa: Vision Transformers with multi-query and grouped-query attention.

The public names are importable from here; each is imported on first use, so that
``import vit_mqa`` (and ``vit-mqa --help``) does not load torch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> the module that defines it. The training function lives in
# `vit_mqa.training.loop`: no subpackage or module here is called `train`, which would take
# the function's place in this namespace once imported.
_EXPORTS = {
    "AugmentConfig": "config.sections",
    "DataConfig": "config.sections",
    "GroupedQueryAttention": "models.attention",
    "Predictor": "evaluation.predict",
    "Preprocess": "data.preprocess",
    "TrainConfig": "config.sections",
    "ViTConfig": "config.sections",
    "VisionTransformer": "models.vit",
    "VitMqaError": "errors",
    "attention_rollout": "evaluation.explain",
    "build_config": "config.recipe",
    "convert_kv_heads": "models.adapt",
    "create_model": "models.factory",
    "export_onnx": "models.interop",
    "load_external": "models.interop",
    "train": "training.loop",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vit_mqa' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__() -> list[str]:
    # The public names only: not the helpers above, nor submodules once imported.
    return sorted({*__all__, *(n for n in globals() if n.startswith("__") and n.endswith("__"))})
