"""MNIST test digits re-rendered the way people draw, export and photograph digits.

Every image is a pure function of (seed, style, MNIST test index): the same command
gives the same files, in any order. Only MNIST *test* images are used, so a model
trained on MNIST's training set never saw the digits underneath.

    from people_styles import STYLES, render
    data, ext = render(digit_28x28_uint8, "phone-photo", np.random.default_rng(...))

Styles (the digit is scaled up, its strokes sharpened to look drawn rather than
blurred, and placed on a canvas larger than the digit):

* white-paper-png: black ink on white paper, PNG
* grey-paper-jpeg: dark ink on grey paper, JPEG quality 60-90
* transparent-rgba: an RGBA export, black ink on a transparent background
* off-centre: a small digit anywhere on a canvas 2-10x larger than 28 px, dark on light
* thick-strokes / thin-strokes: strokes dilated / eroded (marker, fine pen), dark on light
* phone-photo: 640x480 RGB photo of grey paper: tinted, uneven lighting (gradient and
  vignette), sensor noise, slight blur, JPEG quality 60-90
* white-on-black: light ink on a dark canvas with margins, PNG
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

STYLES = ("white-paper-png", "grey-paper-jpeg", "transparent-rgba", "off-centre",
          "thick-strokes", "thin-strokes", "phone-photo", "white-on-black")


def _drawn(digit: np.ndarray, scale: float, rng: np.random.Generator,
           morph: int = 0) -> np.ndarray:
    """28x28 uint8 -> float ink in [0, 1] at ``scale`` x, edges sharpened like a pen's.

    morph > 0 dilates the strokes by that many pixels (of the scaled image), < 0 erodes.
    """
    side = max(8, round(28 * scale))
    up = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    if morph:
        size = 2 * abs(morph) + 1
        up = up.filter(ImageFilter.MaxFilter(size) if morph > 0 else ImageFilter.MinFilter(size))
    a = np.asarray(up, dtype=np.float32) / 255.0
    # A steeper or gentler edge: upscaled MNIST is blurry, drawn strokes are not.
    centre, width = rng.uniform(0.35, 0.5), rng.uniform(0.15, 0.45)
    return np.clip((a - centre) / width + 0.5, 0, 1)


def _place(ink: np.ndarray, canvas: tuple[int, int], rng: np.random.Generator,
           centred: bool = False) -> np.ndarray:
    """Put ink (h, w) on a zero canvas (H, W) at a random (or roughly centred) spot."""
    h, w = ink.shape
    ch, cw = canvas
    out = np.zeros(canvas, dtype=np.float32)
    if centred:
        top = (ch - h) // 2 + int(rng.integers(-(ch - h) // 8, (ch - h) // 8 + 1))
        left = (cw - w) // 2 + int(rng.integers(-(cw - w) // 8, (cw - w) // 8 + 1))
    else:
        top, left = int(rng.integers(0, ch - h + 1)), int(rng.integers(0, cw - w + 1))
    out[top:top + h, left:left + w] = ink
    return out


def _on_paper(ink: np.ndarray, paper: float, ink_level: float) -> np.ndarray:
    return paper + (ink_level - paper) * ink


def _encode(img: Image.Image, fmt: str, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 91)))
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _margin_canvas(ink: np.ndarray, rng: np.random.Generator, lo: float = 1.3,
                   hi: float = 2.0) -> np.ndarray:
    h, w = ink.shape
    ch, cw = int(h * rng.uniform(lo, hi)), int(w * rng.uniform(lo, hi))
    return _place(ink, (ch, cw), rng, centred=True)


def white_paper_png(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin_canvas(_drawn(digit, rng.uniform(3, 8), rng), rng)
    a = _on_paper(ink, rng.uniform(0.92, 1.0), rng.uniform(0.0, 0.2))
    return _encode(Image.fromarray(_u8(a)).convert("RGB"), "png", rng)


def grey_paper_jpeg(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin_canvas(_drawn(digit, rng.uniform(3, 8), rng), rng)
    a = _on_paper(ink, rng.uniform(0.55, 0.85), rng.uniform(0.02, 0.3))
    return _encode(Image.fromarray(_u8(a)), "jpeg", rng)


def transparent_rgba(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin_canvas(_drawn(digit, rng.uniform(3, 8), rng), rng)
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)  # black ink; colour only where drawn
    rgba[..., 3] = _u8(ink)
    return _encode(Image.fromarray(rgba), "png", rng)


def off_centre(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    factor = rng.uniform(2, 10)
    side = int(28 * factor)
    ink = _drawn(digit, rng.uniform(1, min(3.0, factor * 0.6)), rng)
    canvas = (int(side * rng.uniform(0.75, 1.0)), side)
    canvas = (max(canvas[0], ink.shape[0]), max(canvas[1], ink.shape[1]))
    a = _on_paper(_place(ink, canvas, rng), rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.25))
    return _encode(Image.fromarray(_u8(a)), "png", rng)


def thick_strokes(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    scale = rng.uniform(4, 8)
    ink = _drawn(digit, scale, rng, morph=max(1, round(scale * rng.uniform(0.3, 0.6))))
    a = _on_paper(_margin_canvas(ink, rng), rng.uniform(0.9, 1.0), rng.uniform(0.0, 0.2))
    return _encode(Image.fromarray(_u8(a)), "png", rng)


def thin_strokes(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    scale = rng.uniform(4, 8)
    ink = _drawn(digit, scale, rng, morph=-max(1, round(scale * rng.uniform(0.2, 0.35))))
    a = _on_paper(_margin_canvas(ink, rng), rng.uniform(0.9, 1.0), rng.uniform(0.0, 0.2))
    return _encode(Image.fromarray(_u8(a)), "png", rng)


def phone_photo(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    h, w = 480, 640
    side = int(h * rng.uniform(0.3, 0.7))
    ink = _place(_drawn(digit, side / 28, rng), (h, w), rng)
    # Lighting: a linear gradient across the sheet times a vignette.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle))
    r2 = ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) / 0.5
    light = (1 + rng.uniform(0.1, 0.4) * ramp) * (1 - rng.uniform(0.1, 0.35) * r2)
    paper = rng.uniform(0.55, 0.85)
    gray = _on_paper(ink, paper, rng.uniform(0.05, 0.25)) * light
    tint = 1 + rng.uniform(-0.08, 0.08, size=3)  # white balance
    rgb = gray[..., None] * tint + rng.normal(0, rng.uniform(0.01, 0.04), size=(h, w, 3))
    img = Image.fromarray(_u8(rgb)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return _encode(img, "jpeg", rng)


def white_on_black(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin_canvas(_drawn(digit, rng.uniform(2, 6), rng), rng)
    a = _on_paper(ink, rng.uniform(0.0, 0.12), rng.uniform(0.85, 1.0))
    return _encode(Image.fromarray(_u8(a)), "png", rng)


RENDERERS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[bytes, str]]] = {
    "white-paper-png": white_paper_png,
    "grey-paper-jpeg": grey_paper_jpeg,
    "transparent-rgba": transparent_rgba,
    "off-centre": off_centre,
    "thick-strokes": thick_strokes,
    "thin-strokes": thin_strokes,
    "phone-photo": phone_photo,
    "white-on-black": white_on_black,
}


def style_rng(seed: int, style: str, index: int) -> np.random.Generator:
    """The generator for one image: independent of which other images are made."""
    return np.random.default_rng([seed, STYLES.index(style), index])


def render(digit: np.ndarray, style: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """One 28x28 uint8 MNIST digit (white on black) -> (encoded file bytes, extension)."""
    return RENDERERS[style](digit, rng)


def pick_digits(num: int, seed: int, total: int = 10000) -> np.ndarray:
    """``num`` distinct MNIST test indices, sorted, fixed by the seed."""
    return np.sort(np.random.default_rng([seed, 9999]).choice(total, size=num, replace=False))
