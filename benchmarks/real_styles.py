"""Digits that no one here drew: MNIST test digits scanned small, cropped tight, faint,
blurred or re-drawn with other pens, and printed digits in fonts held out of training.

Every image is a pure function of (seed, style, index): the same command gives the same
files. Handwritten styles use only MNIST *test* digits; printed styles use only the font
families that training never sees (``HELD_OUT_FAMILIES``: FreeFont and Noto; training
renders DejaVu and Liberation).

    from real_styles import HANDWRITTEN, render_handwritten
    data, ext = render_handwritten(digit_28x28_uint8, "scan-8", np.random.default_rng(...))

Handwritten (from a 28x28 MNIST digit, white on black):

* scan-8 / scan-12 / scan-16: the digit cropped to its ink, reduced so that its longer
  side is 8, 12 or 16 px (area averaging, 17 grey levels, as a scan counted in blocks),
  enlarged bicubically to 64 px, blurred; no margin: the strokes touch the edges
* tiny: the digit 8-16 px tall as it is (not enlarged), a 0-2 px margin, either polarity
* tight-crop: drawn at 4-8x, the image exactly the digit's bounding box, dark on light
* faint: contrast of 6-20 % between ink and paper, sensor noise, either polarity
* blurred: drawn at 4-8x and blurred by 0.6-1.2 MNIST pixels (out of focus)
* pen-thin / pen-medium / pen-thick / pen-marker: the digit's skeleton re-drawn with a
  round pen 3, 8, 15 and 22 % of its height wide

Printed (a held-out font's digit):

* print-clean: black on white, tilted up to 10 degrees, 60-200 px tall, PNG
* print-photo: the same photographed: grey paper, tint, uneven light, noise, blur, JPEG
* print-small: screen text 10-20 px tall, drawn at that size (hinted), light or dark theme
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vit_mqa.data.printed import DIGITS, font_files, render_digits

HELD_OUT_FAMILIES = ("Free", "Noto")
HANDWRITTEN = ("scan-8", "scan-12", "scan-16", "tiny", "tight-crop", "faint", "blurred",
               "pen-thin", "pen-medium", "pen-thick", "pen-marker")
PRINTED = ("print-clean", "print-photo", "print-small")
STYLES = HANDWRITTEN + PRINTED


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _encode(a: np.ndarray, fmt: str, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = io.BytesIO()
    img = Image.fromarray(a if a.dtype == np.uint8 else _u8(a))
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 91)))
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _crop(a: np.ndarray, level: float = 0.05) -> np.ndarray:
    rows, cols = np.flatnonzero(a.max(1) > level), np.flatnonzero(a.max(0) > level)
    return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _resize(a: np.ndarray, size: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    """Float (H, W) -> (h, w)."""
    out = Image.fromarray(a.astype(np.float32)).resize((size[1], size[0]), method)
    return np.clip(np.asarray(out), 0, 1)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float image (edges replicated), separable."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, r, mode="edge")
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def _fit(a: np.ndarray, side: int) -> tuple[int, int]:
    s = side / max(a.shape)
    return max(1, round(a.shape[0] * s)), max(1, round(a.shape[1] * s))


def _drawn(digit: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """28x28 uint8 -> float ink at ``scale`` x, edges sharpened like a pen's."""
    side = max(8, round(28 * scale))
    a = _resize(digit.astype(np.float32) / 255.0, (side, side), Image.Resampling.BICUBIC)
    centre, width = rng.uniform(0.35, 0.5), rng.uniform(0.15, 0.45)
    return np.clip((a - centre) / width + 0.5, 0, 1)


def _paper(ink: np.ndarray, rng: np.random.Generator, dark_on_light: bool) -> np.ndarray:
    paper, level = rng.uniform(0.88, 1.0), rng.uniform(0.0, 0.15)
    if not dark_on_light:
        paper, level = 1 - paper, 1 - level
    return paper + (level - paper) * ink


def _margin(ink: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    h, w = ink.shape
    ch, cw = int(h * rng.uniform(lo, hi)), int(w * rng.uniform(lo, hi))
    out = np.zeros((max(ch, h), max(cw, w)), dtype=np.float32)
    top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    out[top:top + h, left:left + w] = ink
    return out


def _scan(digit: np.ndarray, rng: np.random.Generator, side: int, fmt: str,
          dark_on_light: bool) -> tuple[bytes, str]:
    ink = _crop(digit.astype(np.float32) / 255.0)
    small = _resize(ink, _fit(ink, side), Image.Resampling.BOX)
    small = np.round(small * 16) / 16
    up = _resize(small, _fit(small, 64), Image.Resampling.BICUBIC)
    up = _blur(up, rng.uniform(1.0, 2.0))
    up = (up - up.min()) / max(float(up.max() - up.min()), 1e-6)  # full contrast
    return _encode(1 - up if dark_on_light else up, fmt, rng)


def tiny(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _crop(digit.astype(np.float32) / 255.0)
    small = _resize(ink, _fit(ink, int(rng.integers(8, 17))), Image.Resampling.BOX)
    small = _margin(small, rng, 1.0, 1.0 + 4 / max(small.shape))
    return _encode(_paper(small, rng, bool(rng.integers(0, 2))), "png", rng)


def tight_crop(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _crop(_drawn(digit, rng.uniform(4, 8), rng))
    return _encode(_paper(ink, rng, True), "png", rng)


def faint(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin(_drawn(digit, rng.uniform(3, 6), rng), rng, 1.3, 2.0)
    paper = rng.uniform(0.5, 0.9)
    contrast = rng.uniform(0.06, 0.2) * (1 if rng.integers(0, 2) else -1)
    a = paper - contrast * ink + rng.normal(0, rng.uniform(0.005, 0.02), ink.shape)
    return _encode(a, "png", rng)


def blurred(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    scale = rng.uniform(4, 8)
    ink = _margin(_drawn(digit, scale, rng), rng, 1.3, 1.8)
    ink = _blur(ink, scale * rng.uniform(0.6, 1.2))
    return _encode(_paper(ink, rng, True), "png", rng)


def _thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a boolean image to one-pixel-wide lines."""
    m = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = [np.roll(np.roll(m, -dy, 0), -dx, 1) for dy, dx in
                 ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))]
            neighbours = sum(p)
            transitions = sum((p[i] == 0) & (p[(i + 1) % 8] == 1) for i in range(8))
            if step == 0:
                a, b = p[0] * p[2] * p[4], p[2] * p[4] * p[6]
            else:
                a, b = p[0] * p[2] * p[6], p[0] * p[4] * p[6]
            remove = ((m == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1)
                      & (a == 0) & (b == 0))
            if remove.any():
                m[remove] = 0
                changed = True
        if not changed:
            return m[1:-1, 1:-1].astype(bool)


def _pen(digit: np.ndarray, rng: np.random.Generator, width: float) -> tuple[bytes, str]:
    ink = _drawn(digit, 6, rng)
    skeleton = _thin(ink > 0.5)
    ys, xs = np.nonzero(skeleton)
    height = ys.max() - ys.min() + 1
    r = max(0.5, width * height / 2)
    canvas = Image.new("L", (ink.shape[1] * 2, ink.shape[0] * 2))  # 2x for round edges
    draw = ImageDraw.Draw(canvas)
    for y, x in zip(ys, xs):
        draw.ellipse((2 * x - 2 * r, 2 * y - 2 * r, 2 * x + 2 * r, 2 * y + 2 * r), fill=255)
    drawn = np.asarray(canvas.resize(ink.shape[::-1], Image.Resampling.BOX),
                       dtype=np.float32) / 255
    return _encode(_paper(_margin(drawn, rng, 1.2, 1.6), rng, True), "png", rng)


HANDWRITTEN_RENDERERS: dict[str, Callable[[np.ndarray, np.random.Generator],
                                          tuple[bytes, str]]] = {
    "scan-8": lambda d, rng: _scan(d, rng, 8, "png", True),
    "scan-12": lambda d, rng: _scan(d, rng, 12, "png", False),
    "scan-16": lambda d, rng: _scan(d, rng, 16, "jpeg", True),
    "tiny": tiny,
    "tight-crop": tight_crop,
    "faint": faint,
    "blurred": blurred,
    "pen-thin": lambda d, rng: _pen(d, rng, 0.03),
    "pen-medium": lambda d, rng: _pen(d, rng, 0.08),
    "pen-thick": lambda d, rng: _pen(d, rng, 0.15),
    "pen-marker": lambda d, rng: _pen(d, rng, 0.22),
}


def render_handwritten(digit: np.ndarray, style: str,
                       rng: np.random.Generator) -> tuple[bytes, str]:
    """One 28x28 uint8 MNIST digit (white on black) -> (encoded file bytes, extension)."""
    return HANDWRITTEN_RENDERERS[style](digit, rng)


# ---------------------------------------------------------------- printed


def held_out_fonts() -> list[Path]:
    """Installed fonts of the held-out families that draw the Latin digits."""
    return [f for f in font_files(HELD_OUT_FAMILIES) if render_digits(f, 32) is not None]


def _tilted(font: Path, digit: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """The digit as float ink, about ``height`` px tall, tilted up to 10 degrees."""
    size = max(8, round(height / 0.73))  # digits are about 0.73 em tall
    img = Image.fromarray(_u8(render_digits(font, size)[digit]))
    return np.asarray(img.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC,
                                 expand=True), dtype=np.float32) / 255


def print_clean(font: Path, digit: int, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin(_tilted(font, digit, int(rng.integers(60, 201)), rng), rng, 1.2, 2.0)
    return _encode(1 - ink, "png", rng)


def print_photo(font: Path, digit: int, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin(_tilted(font, digit, int(rng.integers(60, 201)), rng), rng, 1.5, 3.0)
    return photographed(ink, rng)


def photographed(ink: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """Float ink (light on dark) photographed on grey paper: tint, uneven light (gradient
    and vignette), sensor noise, blur, JPEG."""
    h, w = ink.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle)
    r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) / 0.5
    light = (1 + rng.uniform(0.1, 0.4) * ramp) * (1 - rng.uniform(0.1, 0.35) * r2)
    paper = rng.uniform(0.55, 0.85)
    gray = (paper + (rng.uniform(0.05, 0.25) - paper) * ink) * light
    rgb = (gray[..., None] * (1 + rng.uniform(-0.08, 0.08, size=3))
           + rng.normal(0, rng.uniform(0.01, 0.04), size=(h, w, 3)))
    img = Image.fromarray(_u8(rgb)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return _encode(np.asarray(img), "jpeg", rng)


def print_small(font: Path, digit: int, rng: np.random.Generator) -> tuple[bytes, str]:
    height = int(rng.integers(10, 21))
    f = ImageFont.truetype(str(font), max(6, round(height / 0.73)))
    left, top, right, bottom = f.getbbox(DIGITS[digit])
    pad = int(rng.integers(1, 4))
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), DIGITS[digit], fill=255, font=f)
    ink = np.asarray(canvas, dtype=np.float32) / 255
    dark_theme = bool(rng.integers(0, 2))
    background, text = (0.12, 0.9) if dark_theme else (1.0, 0.1)
    return _encode(background + (text - background) * ink, "png", rng)


PRINTED_RENDERERS: dict[str, Callable[[Path, int, np.random.Generator], tuple[bytes, str]]] = {
    "print-clean": print_clean,
    "print-photo": print_photo,
    "print-small": print_small,
}


def style_rng(seed: int, style: str, index: int) -> np.random.Generator:
    """The generator for one image: independent of which other images are made."""
    return np.random.default_rng([seed, 100 + STYLES.index(style), index])
