"""Named training recipes, as plain data: partial configs layered over the defaults.

Each preset may set any key of the "model", "data", "augment" and "train"
sections (see ``train.build_config``). Flags and JSON config files override them.
"""

from __future__ import annotations

from typing import Any

DEFAULT_PRESET = "mnist-fast"

PRESETS: dict[str, dict[str, Any]] = {
    # Default: >= 98.5% MNIST test accuracy in a few minutes on a 2-core laptop CPU.
    "mnist-fast": {
        "model": {"patch_size": 7, "dim": 64, "depth": 6, "num_heads": 4, "num_kv_heads": 1,
                  "mlp_ratio": 2.0},
        "data": {"dataset": "mnist"},
        "train": {"epochs": 10, "batch_size": 64, "lr": 2e-3},
    },
}
