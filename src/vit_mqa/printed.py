"""Printed digits: 0-9 rendered from TrueType fonts, in MNIST's format.

A model trained on MNIST alone has seen handwriting only; typed digits (a form, a
screen, a price tag) have serifs, flags on their ones, crossbars and even strokes that
no MNIST writer drew. Training adds them (``data.printed``) from the renders that ship
with the package, ``assets/printed-digits.npz``: the DejaVu and Liberation families,
each digit cropped to its ink and put through the MNIST procedure
(:func:`vit_mqa.preprocess.mnist_normalize`), so that training is the same on every
machine, one without any fonts included. ``scripts/render_printed_digits.py`` makes
the file again from the fonts installed here; other families (FreeFont, Noto) stay out
of training, for evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import VitMqaError

TRAINING_FAMILIES = ("DejaVu", "Liberation")
DIGITS = "0123456789"
ASSET = "printed-digits.npz"
# Font size of the renders: large enough that hinting and anti-aliasing do not shape the
# 20 px digit that the MNIST procedure makes of them.
RENDER_SIZE = 96
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
             "/Library/Fonts", "/System/Library/Fonts", "C:/Windows/Fonts")


def font_files(families: Iterable[str], dirs: Sequence[str | os.PathLike[str]] = FONT_DIRS
               ) -> list[Path]:
    """TrueType / OpenType files under ``dirs`` whose file name starts with one of the
    ``families`` (e.g. "DejaVu"), one per file name (the first found), sorted by name."""
    prefixes = tuple(families)
    found: dict[str, Path] = {}
    for root in dirs:
        base = Path(root).expanduser()
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if (path.suffix.lower() in (".ttf", ".otf") and path.name.startswith(prefixes)
                    and path.name not in found):
                found[path.name] = path
    return [found[name] for name in sorted(found)]


def _glyph(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    """``char`` drawn white on black, cropped to its ink, float in [0, 1]."""
    left, top, right, bottom = font.getbbox(char)
    pad = RENDER_SIZE // 8
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, fill=255, font=font)
    a = np.asarray(canvas, dtype=np.float32) / 255.0
    rows, cols = np.flatnonzero(a.max(1) > 0.05), np.flatnonzero(a.max(0) > 0.05)
    if rows.size == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def render_digits(path: str | Path, size: int = RENDER_SIZE) -> list[np.ndarray] | None:
    """The ten digits of a font as float ink (light on dark, cropped to the ink), or None
    when the font has no glyphs for them: many fonts for other scripts draw the
    "missing glyph" box instead, so a digit that looks like that box, or like another
    digit, or is empty, disqualifies the font."""
    try:
        font = ImageFont.truetype(str(path), size)
    except OSError:
        return None
    missing = _glyph(font, "\U0010fffd")  # a private-use code point no font draws
    glyphs = [_glyph(font, d) for d in DIGITS]
    shapes = {(g.shape, g.tobytes()) for g in glyphs}
    if (len(shapes) < len(DIGITS) or any(g.size == 0 for g in glyphs)
            or (missing.shape, missing.tobytes()) in shapes):
        return None
    return glyphs


def render_printed_digits(paths: Iterable[str | Path]) -> dict[str, np.ndarray]:
    """Each font's digits in MNIST's format: {"images": uint8 (N, 28, 28), "labels":
    int64 (N,), "fonts": str (N,)}; fonts without Latin digits are skipped."""
    from .preprocess import mnist_normalize

    images, labels, fonts = [], [], []
    for path in paths:
        glyphs = render_digits(path)
        if glyphs is None:
            continue
        for digit, ink in enumerate(glyphs):
            images.append(mnist_normalize(ink, (28, 28), f"{Path(path).name} {digit}"))
            labels.append(digit)
            fonts.append(Path(path).name)
    return {"images": np.stack(images) if images else np.zeros((0, 28, 28), np.uint8),
            "labels": np.asarray(labels, dtype=np.int64),
            "fonts": np.asarray(fonts, dtype=str)}


def asset_path() -> Path:
    return Path(str(resources.files("vit_mqa") / "assets" / ASSET))


@functools.cache
def load_printed_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shipped renders of the training fonts: uint8 images (N, 28, 28), int64 labels."""
    path = asset_path()
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise VitMqaError(f"cannot read the printed digits shipped with vit-mqa ({path}: "
                          f"{e}); reinstall the package") from None
    if (images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28)
            or labels.shape != (images.shape[0],) or not np.isin(labels, range(10)).all()):
        raise VitMqaError(f"{path} does not hold 28x28 digit images; reinstall the package")
    return images, labels.astype(np.int64)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
