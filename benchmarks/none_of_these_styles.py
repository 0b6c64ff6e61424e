"""Pictures that are not digits, for the "none of these" benchmark (none_of_these.py).

Every image is a pure function of (seed, source, index): the same command gives the same
files, in any order. None of the styles is one that training's "not a digit" examples
use (letters and symbols in DejaVu and Liberation, random strokes and scribbles, single
shapes, textures, pieces of MNIST digits):

* letters-print-clean / letters-print-photo: one letter, black on white, tilted up to 10
  degrees, 60-200 px tall, in a held-out font family (FreeFont, Noto, URW's Nimbus,
  Bookman, Gothic, C059, P052, Z003; never DejaVu or Liberation), clean (PNG) or
  photographed as real_styles.py's print-photo: grey paper, tint, uneven light, noise,
  blur, JPEG. Letters that look like digits (O o D Q I l i j Z z S s B b G g q T t) are
  left out.
* letters-hand: such a letter's skeleton slanted, bent by a smooth random field (elastic
  distortion) and redrawn with a wobbly round pen 3-22 % of its height wide, on paper
* clothing-print / clothing-photo: a Fashion-MNIST *test* image enlarged 3-8x, dark on
  light paper (PNG) or photographed
* scenes: smooth colour pictures with no strokes: gradients, soft blobs, sky with
  clouds, a lit wall; sensor noise, JPEG
* objects: compound drawings that are not digits (house, star, arrow, smiley,
  cross-hatch, musical note, sun) in pens 2-7 % of the picture wide, dark on light or
  light on dark

    from none_of_these_styles import NOT_DIGITS, render_not_digit
    data, ext = render_not_digit("scenes", index, seed, fonts, clothing)
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from real_styles import _crop, _encode, _margin, _paper, _thin, _u8, photographed

from vit_mqa.data.printed import TRAINING_FAMILIES, font_files

LETTER_FAMILIES = ("Free", "Noto", "Nimbus", "URW", "C059", "P052", "Z003")
DIGIT_LIKE = "OoDQIlijZzSsBbGgqTt"
LETTERS = "".join(c for c in string.ascii_letters if c not in DIGIT_LIKE)
NOT_DIGITS = ("letters-print-clean", "letters-print-photo", "letters-hand",
              "clothing-print", "clothing-photo", "scenes", "objects")
LETTER_SOURCES = NOT_DIGITS[:3]
CLOTHING_SOURCES = NOT_DIGITS[3:5]
OBJECTS = ("house", "star", "arrow", "smiley", "cross-hatch", "note", "sun")
SCENES = ("gradient", "blobs", "sky", "wall")
Box = tuple[float, float, float, float]


def source_rng(seed: int, source: str, index: int) -> np.random.Generator:
    """The generator for one image: independent of which other images are made."""
    return np.random.default_rng([seed, 300 + NOT_DIGITS.index(source), index])


# ---------------------------------------------------------------- letters


def letter_ink(font: Path, letter: str, size: int) -> np.ndarray:
    """``letter`` drawn white on black at font ``size``, float, cropped to its ink
    (empty when the font draws nothing)."""
    f = ImageFont.truetype(str(font), size)
    left, top, right, bottom = f.getbbox(letter)
    pad = max(2, size // 8)
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), letter, fill=255, font=f)
    a = np.asarray(canvas, dtype=np.float32) / 255
    return _crop(a) if a.max() > 0.05 else np.zeros((0, 0), dtype=np.float32)


def _draws_latin(font: Path) -> bool:
    """Whether the font has its own, distinct glyphs for every letter of LETTERS (not
    the "missing glyph" box that fonts for other scripts draw)."""
    try:
        glyphs = [letter_ink(font, c, 32) for c in LETTERS]
        missing = letter_ink(font, "\U0010fffd", 32)  # a private-use code point
    except OSError:
        return False
    shapes = {(g.shape, g.tobytes()) for g in glyphs}
    return (len(shapes) == len(glyphs) and all(g.size for g in glyphs)
            and (missing.shape, missing.tobytes()) not in shapes)


@functools.cache
def held_out_letter_fonts() -> tuple[Path, ...]:
    """Installed fonts of the held-out families that draw the Latin letters."""
    files = [f for f in font_files(LETTER_FAMILIES) if not f.name.startswith(TRAINING_FAMILIES)]
    return tuple(f for f in files if _draws_latin(f))


def _tilted_letter(font: Path, letter: str, rng: np.random.Generator) -> np.ndarray:
    size = max(8, round(int(rng.integers(60, 201)) / 0.73))
    img = Image.fromarray(_u8(letter_ink(font, letter, size)))
    return np.asarray(img.rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC,
                                 expand=True), dtype=np.float32) / 255


def photo(ink: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """Float ink (light on dark) photographed on grey paper, as real_styles.print_photo."""
    return photographed(ink, rng)


def _pick(fonts: Sequence[Path], rng: np.random.Generator) -> tuple[Path, str]:
    return fonts[int(rng.integers(len(fonts)))], LETTERS[int(rng.integers(len(LETTERS)))]


def letters_print_clean(fonts: Sequence[Path], rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin(_tilted_letter(*_pick(fonts, rng), rng), rng, 1.2, 2.0)
    return _encode(1 - ink, "png", rng)


def letters_print_photo(fonts: Sequence[Path], rng: np.random.Generator) -> tuple[bytes, str]:
    return photo(_margin(_tilted_letter(*_pick(fonts, rng), rng), rng, 1.5, 3.0), rng)


def smooth_field(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise of unit spread: a cells x cells grid of normals, enlarged bicubically."""
    grid = rng.normal(size=(cells, cells)).astype(np.float32)
    big = Image.fromarray(grid).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    a = np.asarray(big, dtype=np.float32)
    return a / max(float(a.std()), 1e-6)


def _stamp(xs: np.ndarray, ys: np.ndarray, radii: np.ndarray, pad: float) -> np.ndarray:
    """Round pen stamps at (xs, ys), drawn at 2x and reduced: float ink."""
    xs, ys = xs - xs.min() + pad, ys - ys.min() + pad
    w, h = int(xs.max() + pad) + 1, int(ys.max() + pad) + 1
    canvas = Image.new("L", (2 * w, 2 * h))
    draw = ImageDraw.Draw(canvas)
    for x, y, r in zip(xs, ys, radii):
        draw.ellipse((2 * (x - r), 2 * (y - r), 2 * (x + r), 2 * (y + r)), fill=255)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255


def letters_hand(fonts: Sequence[Path], rng: np.random.Generator) -> tuple[bytes, str]:
    ink = letter_ink(*_pick(fonts, rng), 160)
    ys, xs = np.nonzero(_thin(ink > 0.5))
    height = float(ys.max() - ys.min() + 1)
    x = xs + rng.uniform(-0.3, 0.3) * (ys - ys.mean())  # slant
    y = ys.astype(np.float64)
    for cells, amount in ((3, rng.uniform(0.02, 0.06)), (8, rng.uniform(0.005, 0.015))):
        x = x + amount * height * smooth_field(ink.shape, cells, rng)[ys, xs]
        y = y + amount * height * smooth_field(ink.shape, cells, rng)[ys, xs]
    width = float(rng.choice([0.03, 0.08, 0.15, 0.22])) * rng.uniform(0.8, 1.2)
    pressure = 1 + 0.25 * smooth_field(ink.shape, 5, rng)[ys, xs]
    radii = np.maximum(0.5, width * height / 2 * pressure)
    drawn = _stamp(x, y, radii, float(radii.max()) + 1)
    return _encode(_paper(_margin(drawn, rng, 1.2, 1.6), rng, True), "png", rng)


# ---------------------------------------------------------------- clothing


def _enlarged(item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = round(28 * rng.uniform(3, 8))
    big = Image.fromarray(item).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255


def clothing_print(item: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    ink = _margin(_enlarged(item, rng), rng, 1.2, 1.8)
    return _encode(_paper(ink, rng, True), "png", rng)


def clothing_photo(item: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    return photo(_margin(_enlarged(item, rng), rng, 1.5, 3.0), rng)


# ---------------------------------------------------------------- scenes


def _colours(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.1, 0.95, size=(n, 3)).astype(np.float32)


def _gradient(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx / w * np.cos(angle) + yy / h * np.sin(angle)
    t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6)) ** rng.uniform(0.6, 1.6)
    c = _colours(2, rng)
    return c[0] + (c[1] - c[0]) * t[..., None]


def _blobs(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n = int(rng.integers(2, 6))
    img = np.broadcast_to(_colours(1, rng)[0], (h, w, 3)).copy()
    for colour in _colours(n, rng):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.15, 0.4) * min(h, w)
        a = rng.uniform(0.4, 0.9) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        img += (colour - img) * a[..., None]
    return img


def _sky(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] ** rng.uniform(0.5, 1.5)
    top = np.array([0.15, 0.35, 0.75]) + rng.uniform(-0.1, 0.1, 3)
    low = np.array([0.75, 0.85, 0.95]) + rng.uniform(-0.05, 0.05, 3)
    img = np.broadcast_to(top + (low - top) * t, (h, w, 3)).astype(np.float32)
    cloud = np.clip((smooth_field((h, w), int(rng.integers(3, 6)), rng) - 0.3) / 1.5, 0, 0.85)
    return img + (rng.uniform(0.85, 1.0) - img) * cloud[..., None]


def _wall(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array([0.8, 0.75, 0.65]) + rng.uniform(-0.25, 0.15, 3)
    xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * rng.choice([-1, 1])
    light = 1 + rng.uniform(0.1, 0.3) * xx + 0.04 * smooth_field((h, w), 4, rng)
    grain = rng.normal(0, rng.uniform(0.005, 0.015), (h, w))
    return (base * light[..., None] + grain[..., None]).astype(np.float32)


SCENE_MAKERS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "gradient": _gradient, "blobs": _blobs, "sky": _sky, "wall": _wall}


def scene(rng: np.random.Generator) -> tuple[bytes, str]:
    h, w = int(rng.integers(96, 321)), int(rng.integers(96, 321))
    img = SCENE_MAKERS[SCENES[int(rng.integers(len(SCENES)))]](h, w, rng)
    img = img + rng.normal(0, rng.uniform(0.004, 0.015), img.shape)
    return _encode(_u8(img), "jpeg", rng)


# ---------------------------------------------------------------- objects
# Each draws white on a black square of side s with pen width p, in its middle 80 %.


def _house(d: ImageDraw.ImageDraw, s: float, p: int, rng: np.random.Generator) -> None:
    top = s * rng.uniform(0.4, 0.5)
    d.rectangle((0.2 * s, top, 0.8 * s, 0.88 * s), outline=255, width=p)
    d.line([(0.12 * s, top + p), (0.5 * s, 0.12 * s), (0.88 * s, top + p)], fill=255,
           width=p, joint="curve")
    d.rectangle((0.42 * s, 0.65 * s, 0.58 * s, 0.88 * s), outline=255, width=p)
    d.rectangle((0.26 * s, top + 0.08 * s, 0.38 * s, top + 0.2 * s), outline=255, width=p)
    if rng.integers(0, 2):
        d.rectangle((0.64 * s, 0.18 * s, 0.72 * s, 0.3 * s), outline=255, width=p)  # chimney


def _star(d: ImageDraw.ImageDraw, s: float, p: int, rng: np.random.Generator) -> None:
    c, turn = 0.55 * s, rng.uniform(0, 2 * np.pi / 5)
    pts = [(c + r * s * np.cos(turn + k * np.pi / 5), c + r * s * np.sin(turn + k * np.pi / 5))
           for k, r in zip(range(10), [0.33, 0.14] * 5)]
    d.line(pts + pts[:1], fill=255, width=p, joint="curve")
    for k in range(3):  # a shooting star's trail
        y = 0.12 * s + k * 0.08 * s
        d.line([(0.1 * s, y + 0.1 * s), (0.3 * s, y)], fill=255, width=max(1, p // 2))


def _arrow(d: ImageDraw.ImageDraw, s: float, p: int, rng: np.random.Generator) -> None:
    a = rng.uniform(0, 2 * np.pi)
    u, v = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    c = np.array([s / 2, s / 2])
    tip, tail = c + 0.38 * s * u, c - 0.38 * s * u
    d.line([tuple(tail), tuple(tip)], fill=255, width=p)
    for side in (-1, 1):
        d.line([tuple(tip), tuple(tip - 0.15 * s * u + side * 0.1 * s * v)], fill=255, width=p)
        for k in (0.0, 0.06):  # fletching
            start = tail + k * s * u
            d.line([tuple(start), tuple(start - 0.07 * s * u + side * 0.07 * s * v)],
                   fill=255, width=max(1, p // 2))


def _smiley(d: ImageDraw.ImageDraw, s: float, p: int, rng: np.random.Generator) -> None:
    d.ellipse((0.12 * s, 0.12 * s, 0.88 * s, 0.88 * s), outline=255, width=p)
    e = 0.05 * s
    for x in (0.36 * s, 0.64 * s):
        d.ellipse((x - e, 0.38 * s - e, x + e, 0.38 * s + e), fill=255)
    smile = rng.uniform(15, 40)
    d.arc((0.28 * s, 0.3 * s, 0.72 * s, 0.72 * s), smile, 180 - smile, fill=255, width=p)


def _cross_hatch(d: ImageDraw.ImageDraw, s: float, p: int, rng: np.random.Generator) -> None:
    lo, hi = 0.15 * s, 0.85 * s
    n = int(rng.integers(4, 8))
    hatch = Image.new("L", (int(hi - lo), int(hi - lo)))
    h = ImageDraw.Draw(hatch)
    for k in np.linspace(-(hi - lo), hi - lo, 2 * n + 1):
        h.line([(k, 0), (k + hi - lo, hi - lo)], fill=255, width=max(1, p // 2))
        h.line([(k, hi - lo), (k + hi - lo, 0)], fill=255, width=max(1, p // 2))
    d.bitmap((lo, lo), hatch, fill=255)
    d.rectangle((lo, lo, hi, hi), outline=255, width=p)


def _note(d: ImageDraw.ImageDraw, s: float, p: int, rng: np.random.Generator) -> None:
    heads = [0.3 * s] if rng.integers(0, 2) else [0.25 * s, 0.6 * s]
    rx, ry = 0.1 * s, 0.07 * s
    for k, x in enumerate(heads):
        y = 0.78 * s - 0.08 * s * k
        d.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
        d.line([(x + rx - p / 2, y), (x + rx - p / 2, 0.2 * s - 0.08 * s * k)], fill=255,
               width=p)
    if len(heads) == 2:  # beamed pair
        d.line([(heads[0] + rx - p / 2, 0.2 * s), (heads[1] + rx - p / 2, 0.12 * s)],
               fill=255, width=2 * p)
    else:
        x = heads[0] + rx - p / 2
        d.line([(x, 0.2 * s), (x + 0.2 * s, 0.38 * s), (x + 0.16 * s, 0.52 * s)], fill=255,
               width=p, joint="curve")


def _sun(d: ImageDraw.ImageDraw, s: float, p: int, rng: np.random.Generator) -> None:
    d.ellipse((0.32 * s, 0.32 * s, 0.68 * s, 0.68 * s), outline=255, width=p)
    n, turn = int(rng.integers(7, 13)), rng.uniform(0, np.pi)
    for k in range(n):
        a = turn + 2 * np.pi * k / n
        u = np.array([np.cos(a), np.sin(a)])
        d.line([tuple(s / 2 + 0.26 * s * u), tuple(s / 2 + 0.42 * s * u)], fill=255, width=p)


OBJECT_MAKERS: dict[str, Callable[[ImageDraw.ImageDraw, float, int, np.random.Generator],
                                  None]] = {
    "house": _house, "star": _star, "arrow": _arrow, "smiley": _smiley,
    "cross-hatch": _cross_hatch, "note": _note, "sun": _sun}


def drawn_object(rng: np.random.Generator, kind: str | None = None) -> tuple[bytes, str]:
    kind = kind or OBJECTS[int(rng.integers(len(OBJECTS)))]
    side = int(rng.integers(128, 257))
    canvas = Image.new("L", (2 * side, 2 * side))  # 2x for smooth edges
    pen = max(2, round(2 * side * rng.uniform(0.02, 0.07)))
    OBJECT_MAKERS[kind](ImageDraw.Draw(canvas), 2.0 * side, pen, rng)
    canvas = canvas.rotate(rng.uniform(-20, 20), Image.Resampling.BICUBIC)
    ink = np.asarray(canvas.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255
    a = _paper(ink, rng, rng.uniform() < 0.8)
    return _encode(a, "jpeg" if rng.uniform() < 0.3 else "png", rng)


# ---------------------------------------------------------------- all of them


def render_not_digit(source: str, index: int, seed: int, fonts: Sequence[Path],
                     clothing: np.ndarray | None) -> tuple[bytes, str]:
    """Image ``index`` of ``source`` as (encoded file bytes, extension). ``fonts``: the
    held-out letter fonts (letter sources); ``clothing``: Fashion-MNIST test images
    (N, 28, 28) uint8 (clothing sources)."""
    rng = source_rng(seed, source, index)
    if source in LETTER_SOURCES:
        render = {"letters-print-clean": letters_print_clean,
                  "letters-print-photo": letters_print_photo, "letters-hand": letters_hand}
        return render[source](fonts, rng)
    if source in CLOTHING_SOURCES:
        assert clothing is not None, "clothing sources need the Fashion-MNIST test images"
        item = clothing[int(rng.integers(len(clothing)))]
        return (clothing_print if source == "clothing-print" else clothing_photo)(item, rng)
    return scene(rng) if source == "scenes" else drawn_object(rng)
