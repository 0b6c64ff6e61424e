"""Seeded random mutations of what people download and hand to vit-mqa: a run's
config.json, its safetensors header, and image files. Whatever the mutation, a command
ends with exit 0, or with exit 1 and one line per failed input; never a traceback, never
an allocation past the memory limit (the harness runs under one)."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
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
            # A copy: the same dict or list placed twice could come to hold itself.
            parent[path[-1]] = copy.deepcopy(HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))])
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


# ---------------------------------------------------------------- the picture path, in process

PICTURE_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA", "PA"]
PICTURE_CASES = 160
PICTURE_SECONDS = 6.0  # stop early past this on a slow or busy machine...
PICTURE_MIN_CASES = 40  # ...but never with too few cases to mean anything
_FORMATS = {"1": ["PNG", "GIF", "TIFF"], "L": ["PNG", "JPEG", "GIF", "TIFF", "WEBP"],
            "P": ["PNG", "GIF"], "RGB": ["PNG", "JPEG", "TIFF", "WEBP"],
            "RGBA": ["PNG", "TIFF", "WEBP"], "CMYK": ["JPEG", "TIFF"], "I;16": ["PNG", "TIFF"],
            "I": ["TIFF"], "F": ["TIFF"], "LA": ["PNG", "TIFF"], "PA": ["TIFF"]}


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    """(w, h) from 1x1 to 20000 on one side; past 2000 the other side stays thin (a
    strip) so that memory stays bounded."""
    long = int(np.exp(rng.uniform(0, np.log(20000))))
    short = int(rng.integers(1, 65 if long > 2000 else min(long, 600) + 1))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _random_picture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Paper (flat, noisy or a gradient) of either polarity, perhaps with a digit."""
    from tests.test_predict_isolation import draw_digit

    w, h = size
    paper, ink = (255, 0) if rng.random() < 0.6 else (0, 255)
    if min(w, h) >= 8 and rng.random() < 0.7:
        img = draw_digit(int(rng.integers(10)), size, ink=ink, paper=paper)
    else:
        img = Image.new("L", size, paper)
    a = np.asarray(img, dtype=np.float32)
    kind = rng.integers(3)
    if kind == 1:
        a = a + rng.normal(0, float(rng.uniform(1, 60)), a.shape)
    elif kind == 2:
        a = a * np.linspace(float(rng.uniform(0.3, 1)), 1, w, dtype=np.float32)[None, :]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def _in_mode(gray: Image.Image, mode: str, rng: np.random.Generator) -> Image.Image:
    if mode in ("I;16", "I", "F"):
        a = np.asarray(gray, dtype=np.float64) * float(rng.choice([1, 257, 1 / 255]))
        if mode == "F" and rng.random() < 0.3:  # non-finite values where a scanner failed
            flat = a.reshape(-1)
            flat[rng.integers(0, flat.size, max(1, flat.size // 50))] = rng.choice(
                [np.nan, np.inf, -np.inf])
        if mode == "F":
            return Image.fromarray(a.astype(np.float32), "F")
        a = np.clip(a, 0, 65535)
        return (Image.fromarray(a.astype(np.uint16)) if mode == "I;16"
                else Image.fromarray(a.astype(np.int32), "I"))
    img = gray.convert("RGB").convert(mode)
    if mode in ("RGBA", "LA", "PA"):
        alpha = [np.full(gray.size[::-1], 255, np.uint8),
                 255 - np.asarray(gray),  # the ink opaque on a transparent canvas
                 rng.integers(0, 256, gray.size[::-1], dtype=np.uint8)][int(rng.integers(3))]
        img.putalpha(Image.fromarray(alpha, "L"))
    return img


def _picture_case(rng: np.random.Generator, path) -> object:
    """A file (or sometimes an in-memory image) of a random mode, size, format, EXIF
    orientation and frame count, perhaps truncated or corrupted."""
    size = _random_size(rng)
    mode = PICTURE_MODES[int(rng.integers(len(PICTURE_MODES)))]
    frames = [_in_mode(_random_picture(rng, size), mode, rng)
              for _ in range(1 if rng.random() < 0.75 else int(rng.integers(2, 4)))]
    if rng.random() < 0.1:
        return frames[0]  # in memory: a PIL image straight from a program
    fmt = str(rng.choice(_FORMATS[mode]))
    if fmt == "WEBP" and max(size) > 16383:
        fmt = "PNG" if mode in ("L", "RGB", "RGBA") else "TIFF"
    kw: dict = {"format": fmt}
    if len(frames) > 1 and fmt in ("GIF", "TIFF", "PNG", "WEBP"):
        kw.update(save_all=True, append_images=frames[1:])
    if fmt in ("JPEG", "PNG", "TIFF", "WEBP") and rng.random() < 0.4:
        exif = frames[0].getexif()
        exif[0x0112] = int(rng.integers(1, 9))
        kw["exif"] = exif
    out = io.BytesIO()
    frames[0].save(out, **kw)
    raw = out.getvalue()
    if rng.random() < 0.25:
        raw = _mutate_bytes(raw, rng, len(raw))
    path.write_bytes(raw)
    return path


def test_fuzzed_pictures_give_an_answer_or_one_clean_error(tmp_path):
    """Property of the picture path (reading, ink, the MNIST procedure): a 28x28 uint8
    image or one VitMqaError line, never another exception, whatever the picture."""
    import time

    from vit_mqa.data.preprocess import prepare
    from vit_mqa.errors import VitMqaError

    rng = np.random.default_rng(SEED)
    start, seen = time.perf_counter(), {"ok": 0, "refused": 0}
    problems: list[str] = []
    for i in range(PICTURE_CASES):
        if i >= PICTURE_MIN_CASES and time.perf_counter() - start > PICTURE_SECONDS:
            break
        source = _picture_case(rng, tmp_path / f"p{i}.img")
        try:
            out = prepare(source, (28, 28), 1, "mnist")
        except VitMqaError as e:
            seen["refused"] += 1
            if "\n" in str(e) or not str(e):
                problems.append(f"case {i}: a message of {len(str(e).splitlines())} lines")
            if e.__cause__ is not None:  # prepare()'s last resort caught a surprise
                problems.append(f"case {i}: {e} (from {type(e.__cause__).__name__})")
        except Exception as e:  # the property under test: nothing else, ever
            problems.append(f"case {i}: {type(e).__name__}: {e}")
        else:
            seen["ok"] += 1
            if out.dtype != torch.uint8 or tuple(out.shape) != (1, 28, 28):
                problems.append(f"case {i}: {out.dtype} {tuple(out.shape)}")
    assert not problems, "\n".join(problems[:8])
    assert seen["ok"] >= 10 and seen["refused"] >= 10, seen
