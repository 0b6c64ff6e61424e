"""Shared fixtures: the real MNIST files, a trained run, small image folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def mnist_root() -> Path:
    """The data root holding mnist/: $VIT_MQA_DATA, else ../shared/data beside the repo."""
    root = Path(os.environ.get("VIT_MQA_DATA") or REPO.parent / "shared" / "data")
    assert (root / "mnist" / "train-images-idx3-ubyte.gz").is_file(), (
        f"MNIST IDX files not found under {root}/mnist; set VIT_MQA_DATA")
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    return mnist_root()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # No test may read or fill the user's real cache, or reach the network.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("VIT_MQA_MIRRORS", "http://127.0.0.1:9/")  # discard port: refused


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vit_mqa", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_root) -> Path:
    """A short real training run of the default preset on MNIST, through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "mnist"
    result = run_cli("train", "--data-dir", str(data_root), "--out", str(out),
                     "--epochs", "1", "--max-steps", "400", "--warmup-epochs", "0.1", "--quiet",
                     env={"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("c"))})
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def mnist_test_arrays(data_root):
    from vit_mqa.data import DATASETS, load_idx_dataset

    arrays, _ = load_idx_dataset(DATASETS["mnist"], str(data_root), download=False)
    return arrays["test-images"], arrays["test-labels"]


def write_image_folder(root: Path, per_class: int = 12, size=(20, 24), mode="L",
                       seed: int = 0) -> Path:
    """Two classes that differ visibly: bright bar on the left vs the right."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(["left", "right"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 40, size=size, dtype=np.uint8)
            w = size[1]
            cols = slice(0, w // 3) if label == 0 else slice(2 * w // 3, w)
            a[:, cols] = 220
            img = Image.fromarray(a, mode="L").convert(mode)
            img.save(root / name / f"{i}.png")
    return root
