"""Printed digits: 0-9 rendered from TrueType fonts, in MNIST's format.

A model trained on MNIST alone has seen handwriting only; typed digits (a form, a
screen, a price tag) have serifs, flags on their ones, crossbars and even strokes that
no MNIST writer drew. Training adds them (``data.printed``) from the renders that ship
with the package, ``assets/printed-digits.npz``: the DejaVu and Liberation families,
each digit cropped to its ink and put through the MNIST procedure
(:func:`vit_mqa.preprocess.mnist_normalize`), so that training is the same on every
machine, one without any fonts included. Every "1" of those fonts stands on a foot (a
base serif), while the most common sans faces (Helvetica and its kin, Noto Sans, Roboto)
draw it with a flag and no foot, which a model trained on MNIST and footed ones reads as
a "7"; so each font also gives its "1" with the foot cut off (:func:`footless_one`).
``scripts/render_printed_digits.py`` makes the file again from the fonts installed here;
other families (FreeFont, Noto) stay out of training, for evaluation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import VitMqaError

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


def footless_one(glyph: np.ndarray) -> np.ndarray | None:
    """A rendered "1" (float ink, cropped) without the foot it stands on, or None when it
    has none. The stem's centre line is fitted on the rows between 35 % and 70 % of the
    height (a straight line, so slanted stems of italics work too); rows from the bottom
    up that have ink wider than the stem by a quarter of its width are the foot, and keep
    only the stem's band, with a one-pixel soft edge."""
    height, width = glyph.shape
    mask = glyph > 0.5
    rows, centres, halves = [], [], []
    for y in range(int(0.35 * height), int(0.7 * height)):
        cols = np.flatnonzero(mask[y])
        if cols.size:
            rows.append(y)
            centres.append((cols[0] + cols[-1]) / 2)
            halves.append((cols[-1] - cols[0] + 1) / 2)
    if len(rows) < 3:
        return None
    slope, offset = np.polyfit(rows, centres, 1)
    half = float(np.median(halves))
    band = half + max(1.0, 0.25 * half)
    x = np.arange(width)
    lowest_stem_row = int(0.7 * height)
    foot = []
    for y in range(height - 1, lowest_stem_row, -1):
        if not (mask[y] & (np.abs(x - (slope * y + offset)) > band)).any():
            break
        foot.append(y)
    if not foot or foot[-1] == lowest_stem_row + 1:  # no foot, or no stem above it
        return None
    out = glyph.copy()
    for y in foot:
        out[y] *= np.clip(band + 0.5 - np.abs(x - (slope * y + offset)), 0, 1)
    return out


def render_printed_digits(paths: Iterable[str | Path]) -> dict[str, np.ndarray]:
    """Each font's digits in MNIST's format, then its footless "1" where its own has a
    foot: {"images": uint8 (N, 28, 28), "labels": int64 (N,), "fonts": str (N,), "footless":
    bool (N,)}; fonts without Latin digits are skipped."""
    from .preprocess import mnist_normalize

    images, labels, fonts, footless = [], [], [], []
    for path in paths:
        glyphs = render_digits(path)
        if glyphs is None:
            continue
        variant = footless_one(glyphs[1])
        drawn = [(d, ink, False) for d, ink in enumerate(glyphs)]
        drawn += [(1, variant, True)] if variant is not None else []
        for digit, ink, cut in drawn:
            name = f"{Path(path).name} {digit}{' without its foot' if cut else ''}"
            images.append(mnist_normalize(ink, (28, 28), name))
            labels.append(digit)
            fonts.append(Path(path).name)
            footless.append(cut)
    return {"images": np.stack(images) if images else np.zeros((0, 28, 28), np.uint8),
            "labels": np.asarray(labels, dtype=np.int64),
            "fonts": np.asarray(fonts, dtype=str),
            "footless": np.asarray(footless, dtype=bool)}


def asset_path() -> Path:
    return Path(str(resources.files("vit_mqa") / "assets" / ASSET))


@functools.cache
def load_printed_digits() -> tuple[np.ndarray, np.ndarray]:
    """One cycle of the shipped renders, as training repeats them: uint8 images (N, 28,
    28), int64 labels. The cycle is every font's ten digits twice, the second time with
    its footless "1" in place of its own, so that each digit is as frequent as any other
    and a footed and a footless "1" are equally frequent."""
    path = asset_path()
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels, fonts, footless = f["images"], f["labels"], f["fonts"], f["footless"]
    except (OSError, KeyError, ValueError) as e:
        raise VitMqaError(f"cannot read the printed digits shipped with vit-mqa ({path}: "
                          f"{e}); reinstall the package") from None
    n = images.shape[0] if images.ndim == 3 else -1
    if (images.dtype != np.uint8 or n < 0 or images.shape[1:] != (28, 28)
            or not labels.shape == fonts.shape == footless.shape == (n,)
            or not np.isin(labels, range(10)).all() or not (labels[footless] == 1).all()):
        raise VitMqaError(f"{path} does not hold 28x28 digit images; reinstall the package")
    plain = np.flatnonzero(~footless)
    cut = {str(fonts[i]): i for i in np.flatnonzero(footless)}
    swapped = np.array([cut.get(str(fonts[i]), i) if labels[i] == 1 else i for i in plain])
    order = np.concatenate([plain, swapped])
    return images[order], labels[order].astype(np.int64)


