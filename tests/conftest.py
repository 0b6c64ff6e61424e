"""Shared fixtures: the real MNIST files, a trained run, small image folders."""

from __future__ import annotations

import json
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
    from vit_mqa.data.datasets import DATASETS, load_idx_dataset

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


# A model small enough that a run on tiny_folder takes seconds.
TINY_TRAIN = ["--dim", "16", "--depth", "1", "--num-heads", "2", "--patch-size", "4",
              "--mlp-ratio", "2", "--batch-size", "8", "--val-size", "8", "--quiet"]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """48 images of 16x16 pixels in two classes."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "bars", per_class=24,
                              size=(16, 16))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_folder) -> Path:
    """A one-epoch run of a tiny model on tiny_folder, through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli("train", "--dataset", str(tiny_folder), "--out", str(out), "--epochs", "1",
                     *TINY_TRAIN)
    assert result.returncode == 0, result.stderr
    return out


HARNESS = REPO / "tests" / "cli_harness.py"
MEMORY_LIMIT = 3 << 30  # bytes above what torch maps at import: far more than any case needs


def run_cli_cases(cases: list[list[str]], tmp_path: Path) -> list[dict]:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    # This checkout's package first: an editable install may point at another worktree.
    path = [str(REPO / "src"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run([sys.executable, str(HARNESS), str(MEMORY_LIMIT),
                             str(tmp_path / "cases.json"), str(tmp_path / "results.json")],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text())


def assert_one_line_error(result: dict, fragment: str) -> None:
    argv = " ".join(result["argv"])
    assert result["raised"] is None, f"{argv} raised:\n{result['raised']}"
    lines = result["stderr"].strip().splitlines()
    assert result["code"] in (1, 2), f"{argv}: exit {result['code']}, stderr {lines}"
    assert len(lines) == 1 and lines[0].startswith("vit-mqa: error: "), f"{argv}: {lines}"
    assert fragment in lines[0], f"{argv}: {lines[0]!r} does not say {fragment!r}"


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[int]:
    """A list that grows by one per call of the fused attention kernel (SDPA)."""
    import torch.nn.functional as F

    calls: list[int] = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls
