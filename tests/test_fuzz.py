"""Seeded random mutations of what people download and hand to vit-mqa: a run's
config.json, its safetensors header, and image files. Whatever the mutation, a command
ends with exit 0, or with exit 1 and one line per failed input; never a traceback, never
an allocation past the memory limit (the harness runs under one)."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli_cases

SEED = 0
CONFIG_CASES = 700
HEADER_CASES = 500
IMAGE_CASES = 700

# Values a mutated config field may take: wrong types, edge and absurd numbers.
HOSTILE_VALUES = [None, True, -1, 0, 1, 3, 2**31, 2**63, 10**30, -1e308, 1e308, math.nan,
                  math.inf, -math.inf, 0.5, 1e-30, "", "abc", "mnist", [], [0], [1e9, 1e9],
                  [1, 2, 3], ["a", "b"], {}, {"x": 1}, [[1]], [-5, -5], [0.0], [28, 28]]


def _json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _json_paths(v, (*prefix, i))


def _mutate_config(config: dict, rng: np.random.Generator) -> bytes:
    """One to three edits: replace a value anywhere, delete a key; or garbage bytes."""
    if rng.random() < 0.05:
        raw = json.dumps(config).encode()
        return raw[: int(rng.integers(0, len(raw)))]
    config = json.loads(json.dumps(config))
    for _ in range(int(rng.integers(1, 4))):
        paths = [p for p in _json_paths(config) if p]
        path = paths[int(rng.integers(len(paths)))]
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[path[-1]]
        else:
            parent[path[-1]] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    return json.dumps(config).encode()  # NaN and Infinity as Python writes them


def _mutate_bytes(raw: bytes, rng: np.random.Generator, region: int) -> bytes:
    """Flip, overwrite or drop bytes within the first ``region`` bytes, or truncate."""
    data = bytearray(raw)
    kind = rng.integers(4)
    if kind == 0:  # truncate anywhere
        return bytes(data[: int(rng.integers(0, len(data)))])
    for _ in range(int(rng.integers(1, 9))):
        at = int(rng.integers(0, min(region, len(data))))
        if kind == 1:
            data[at] ^= 1 << int(rng.integers(8))
        elif kind == 2:
            data[at] = int(rng.integers(256))
        else:
            data[at:at + 1] = b""
    return bytes(data)


def _odd_image(rng: np.random.Generator) -> bytes:
    """A valid image in a mode and shape people do not usually have."""
    mode = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"][int(rng.integers(10))]
    h, w = (int(rng.choice([1, 2, 3, 17, 300])), int(rng.choice([1, 5, 28, 999])))
    pixels = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA").convert("RGB" if mode in ("I;16", "I", "F") else mode)
    if mode in ("I;16", "I", "F"):
        img = img.convert("L").convert(mode)
    fmt = "TIFF" if mode in ("I", "F", "CMYK") else "PNG"
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def digit_png(mnist_test_arrays) -> bytes:
    images, _ = mnist_test_arrays
    out = io.BytesIO()
    Image.fromarray(255 - images[0]).resize((64, 64)).save(out, format="PNG")
    return out.getvalue()


def test_fuzzed_runs_headers_and_images(tiny_run, digit_png, tmp_path):
    rng = np.random.default_rng(SEED)
    config = json.loads((tiny_run / "config.json").read_text())
    weights = (tiny_run / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(weights[:8], "little")
    good_image = tmp_path / "digit.png"
    good_image.write_bytes(digit_png)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(digit_png)).convert("RGB").save(jpeg, format="JPEG", quality=80)

    cases: list[list[str]] = []
    for i in range(CONFIG_CASES):
        run = shutil.copytree(tiny_run, tmp_path / f"c{i}")
        (run / "config.json").write_bytes(_mutate_config(config, rng))
        command = "eval" if i % 10 == 0 else "predict"
        cases.append([command, str(run), str(good_image)] if command == "predict"
                     else [command, str(run), "--device", "cpu"])
    for i in range(HEADER_CASES):
        run = shutil.copytree(tiny_run, tmp_path / f"h{i}")
        (run / "model.safetensors").write_bytes(_mutate_bytes(weights, rng, header_end))
        cases.append(["predict", str(run), str(good_image)])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(IMAGE_CASES):
        if i % 4 == 3:
            raw, suffix = _odd_image(rng), ".img"
        else:
            source = jpeg.getvalue() if i % 2 else digit_png
            raw, suffix = _mutate_bytes(source, rng, len(source)), (".jpg" if i % 2 else ".png")
        path = images / f"{i}{suffix}"
        path.write_bytes(raw)
        cases.append(["predict", str(tiny_run), str(path)])

    results = run_cli_cases(cases, tmp_path)
    assert len(results) == len(cases)
    outcomes = {"ok": 0, "refused": 0}
    failures: dict[str, str] = {}  # one example per distinct problem
    for result in results:
        argv = " ".join(result["argv"])
        lines = result["stderr"].strip().splitlines()
        if result["raised"] is not None:
            failures.setdefault(result["raised"].strip().splitlines()[-1],
                                f"{argv} raised:\n{result['raised']}")
        elif result["code"] == 0:
            if any(not line.startswith("vit-mqa: note: ") for line in lines):
                failures.setdefault(lines[0], f"{argv}: exit 0 but stderr {lines}")
            outcomes["ok"] += 1
        elif result["code"] != 1 or len(lines) != 1 or not lines[0].startswith("vit-mqa: error"):
            failures.setdefault(str(lines[:1]), f"{argv}: exit {result['code']}, {lines}")
        else:
            outcomes["refused"] += 1
    assert not failures, "\n\n".join(list(failures.values())[:8])
    # Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert outcomes["ok"] > 50 and outcomes["refused"] > 500, outcomes
