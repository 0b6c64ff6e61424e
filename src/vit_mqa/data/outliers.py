"""Pictures that are none of a model's classes, to teach it to say so.

Outlier exposure (Hendrycks et al. 2019): besides its classes, a model trains on pictures
that belong to none of them, toward a uniform prediction, so that at prediction time its
energy (-logsumexp of the logits; Liu et al. 2020) tells a digit from a letter, a
scribble or a pattern. ``generated_outliers`` makes such pictures for digit models
without any download, seeded: letters and symbols rendered from the training fonts
(DejaVu and Liberation, shipped as ``printed-letters.npz`` so that a machine without
fonts trains the same), scribbles, compound shapes, textures, and pieces of the training
digits (two digits side by side, or one over another). Each is made as a picture and goes through
MNIST's own normalisation (crop to the ink, 20 px box, centre of mass), as prediction
would treat it. A folder of a user's own pictures works for any model (``outliers`` in
the data settings).

What is left out on purpose: anything round and closed (a circle reads as a 0), single
strokes (a 1), and letters that are written like digits (O, I, l, Z, S, B, G, b, g, q,
T, ...): a model cannot be asked to decline what people write for a digit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..errors import VitMqaError
from .datasets import DATASETS, Data, load_idx_dataset
from .images import list_images
from .preprocess import mnist_normalize, prepare

LETTERS_ASSET = "printed-letters.npz"
# Letters and symbols unlike any digit in print and in handwriting.
OUTLIER_CHARS = "ACEFHKLMNPRUVWXYacdefhkmnpruvwxy#%@?+=*<>"
_CANVAS = 64


def letters_asset_path() -> Path:
    return Path(str(resources.files("vit_mqa") / "assets" / LETTERS_ASSET))


def render_letters(paths: list[Path]) -> dict[str, np.ndarray]:
    """``OUTLIER_CHARS`` of each font in MNIST's format: {"images": uint8 (N, 28, 28),
    "chars": str (N,), "fonts": str (N,)}; fonts without Latin glyphs are skipped."""
    from PIL import ImageFont

    from .printed import RENDER_SIZE, _glyph, render_digits

    images, chars, fonts = [], [], []
    for path in paths:
        if render_digits(path) is None:  # no Latin glyphs (the test the digits pass)
            continue
        font = ImageFont.truetype(str(path), RENDER_SIZE)
        for char in OUTLIER_CHARS:
            ink = _glyph(font, char)
            if ink.size == 0:
                continue
            images.append(mnist_normalize(ink, (28, 28), f"{path.name} {char}"))
            chars.append(char)
            fonts.append(path.name)
    return {"images": np.stack(images) if images else np.zeros((0, 28, 28), np.uint8),
            "chars": np.asarray(chars, dtype=str), "fonts": np.asarray(fonts, dtype=str)}


@functools.cache
def load_letters() -> np.ndarray:
    """The shipped letter renders, uint8 (N, 28, 28)."""
    path = letters_asset_path()
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["images"]
    except (OSError, KeyError, ValueError) as e:
        raise VitMqaError(f"cannot read {path} ({e}); reinstall vit-mqa") from None
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise VitMqaError(f"{path} does not hold 28x28 images; reinstall vit-mqa")
    return images


# ---------------------------------------------------------------- drawn pictures


def _points(rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
    return [tuple(p) for p in rng.uniform(8, _CANVAS - 8, size=(n, 2))]


def _width(rng: np.random.Generator) -> int:
    return int(rng.integers(2, 7))


def scribble(rng: np.random.Generator) -> np.ndarray:
    """Two to five strokes, each a polyline through three to six random points."""
    img = Image.new("L", (_CANVAS, _CANVAS))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        draw.line(_points(rng, int(rng.integers(3, 7))), fill=255, width=_width(rng),
                  joint="curve")
    return np.asarray(img, dtype=np.float32) / 255.0


def shapes(rng: np.random.Generator) -> np.ndarray:
    """A compound of straight-edged shapes: polygons, stars, crosses, grids, arrows."""
    img = Image.new("L", (_CANVAS, _CANVAS))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4))):
        kind = int(rng.integers(0, 5))
        w = _width(rng)
        cx, cy = rng.uniform(16, _CANVAS - 16, size=2)
        r = rng.uniform(8, 22)
        if kind == 0:  # polygon, 3-6 corners
            k = int(rng.integers(3, 7))
            a = rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k
            draw.polygon([(cx + r * np.cos(t), cy + r * np.sin(t)) for t in a], outline=255,
                         width=w)
        elif kind == 1:  # star
            a = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
            rr = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
            draw.polygon([(cx + q * np.cos(t), cy + q * np.sin(t)) for t, q in zip(a, rr)],
                         outline=255, width=w)
        elif kind == 2:  # cross or asterisk
            for t in rng.uniform(0, np.pi) + np.arange(int(rng.integers(2, 4))) * np.pi / 3:
                dx, dy = r * np.cos(t), r * np.sin(t)
                draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=w)
        elif kind == 3:  # grid
            n = int(rng.integers(2, 5))
            for i in range(n + 1):
                o = -r + 2 * r * i / n
                draw.line([(cx + o, cy - r), (cx + o, cy + r)], fill=255, width=w)
                draw.line([(cx - r, cy + o), (cx + r, cy + o)], fill=255, width=w)
        else:  # arrow
            t = rng.uniform(0, 2 * np.pi)
            tip = (cx + r * np.cos(t), cy + r * np.sin(t))
            draw.line([(cx - r * np.cos(t), cy - r * np.sin(t)), tip], fill=255, width=w)
            for s in (0.6, -0.6):
                barb = (tip[0] - 0.5 * r * np.cos(t + s), tip[1] - 0.5 * r * np.sin(t + s))
                draw.line([tip, barb], fill=255, width=w)
    return np.asarray(img, dtype=np.float32) / 255.0


def texture(rng: np.random.Generator) -> np.ndarray:
    """A patch of stripes, checks or blotches: ink everywhere, no one shape."""
    y, x = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32)
    t = rng.uniform(0, np.pi)
    period = rng.uniform(5, 14)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        a = np.sin((x * np.cos(t) + y * np.sin(t)) * 2 * np.pi / period)
    elif kind == 1:
        a = np.sin(x * 2 * np.pi / period) * np.sin(y * 2 * np.pi / period)
    else:
        noise = rng.random((8, 8)).astype(np.float32)
        a = np.asarray(Image.fromarray(noise).resize((_CANVAS, _CANVAS), Image.BICUBIC)) - 0.5
    return (a > rng.uniform(-0.2, 0.3)).astype(np.float32)


def digit_pair(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two training digits side by side (touching, apart or overlapping a little), or one
    drawn over another turned a quarter: a number, or a tangle, but no one digit."""
    a, b = (digits[int(i)].astype(np.float32) / 255.0 for i in rng.integers(0, len(digits), 2))
    if rng.random() < 0.25:
        return np.maximum(a, np.rot90(b, k=int(rng.choice([1, 3]))))
    gap = int(rng.integers(-4, 3))
    out = np.zeros((28, 56 + gap), np.float32)
    out[:, :28] = a
    out[:, 28 + gap:] = np.maximum(out[:, 28 + gap:], b)
    return out


def _like_a_one(ink: np.ndarray) -> bool:
    """Whether the ink is a tall, thin mark, which a digit model reads as a 1."""
    box = np.flatnonzero(ink.max(1) > 0.2), np.flatnonzero(ink.max(0) > 0.2)
    return box[0].size == 0 or box[1].size < 0.4 * box[0].size


_DRAWN: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "scribble": scribble, "shapes": shapes, "texture": texture}


def generated_outliers(count: int, seed: int, digits: np.ndarray | None = None,
                       single_digits: bool = False) -> np.ndarray:
    """``count`` outlier pictures in MNIST's format, uint8 (count, 28, 28), the same for the
    same seed: a quarter each of letters and symbols (the shipped renders, each drawn once
    before any repeats), scribbles and shapes, textures, and pairs of ``digits`` (uint8
    (N, 28, 28) training digits; without them that quarter is scribbles and shapes).
    ``single_digits``: for a model of other classes, half of the pairs are single digits."""
    rng = np.random.default_rng([seed, 0x0D1])
    letters = load_letters()
    kinds = ["letters", "drawn", "texture", "pairs" if digits is not None else "drawn"]
    out = np.zeros((count, 28, 28), np.uint8)
    order = rng.permutation(len(letters))
    made_letters = 0
    for i in range(count):
        kind = kinds[i % 4]
        if kind == "letters":
            out[i] = letters[order[made_letters % len(letters)]]
            made_letters += 1
            continue
        ink = None
        while ink is None or ink.max() < 0.5 or (_like_a_one(ink) and not single_digits):
            if kind == "pairs" and single_digits and rng.random() < 0.5:
                ink = digits[int(rng.integers(0, len(digits)))].astype(np.float32) / 255.0
            elif kind == "pairs":
                ink = digit_pair(digits, rng)  # type: ignore[arg-type]
            elif kind == "texture":
                ink = texture(rng)
            else:
                ink = _DRAWN["scribble" if rng.random() < 0.5 else "shapes"](rng)
        out[i] = mnist_normalize(ink, (28, 28), f"outlier {i}")
    return out


def load_outliers(config: Any, data: Data, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-back) outlier pictures for a run of ``config`` (its DataConfig) on
    ``data``: uint8 (N, C, H, W) at the data's size and channels, each as the run's own
    procedure makes a picture of it, shuffled by ``seed``,
    a tenth held back to check the fitted threshold. A folder's pictures go through the
    run's own procedure (as `vit-mqa predict` reads pictures); one that cannot be read is
    an error naming it."""
    size, channels = data.preprocess.image_size, data.preprocess.in_channels
    parts = []
    for source in (part.strip() for part in config.outliers.split(",")):
        if source == "generated":
            parts.append(_generated_for(config, data, size, channels))
            continue
        root = Path(source).expanduser()
        if not root.is_dir():
            raise VitMqaError(f"`outliers`: {source!r} is neither \"generated\" nor a folder")
        files = list_images([root])
        if not files:
            raise VitMqaError(f"`outliers`: no pictures found under {root}")
        parts.append(torch.stack([prepare(f, size, channels, data.preprocess.procedure)
                                  for f in files]))
    images = torch.cat(parts)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held = max(1, len(images) // 10) if len(images) > 1 else 0
    return images[order[held:]], images[order[:held]]


def _generated_for(config: Any, data: Data, size: tuple[int, int], channels: int
                   ) -> torch.Tensor:
    if config.dataset == "mnist":
        digits, single = data.train.images[:, 0].numpy(), False
    else:  # another model's classes: digits are none of them, as are their pairs
        arrays, _ = load_idx_dataset(DATASETS["mnist"], config.data_dir, config.download)
        digits, single = arrays["train-images"][:20000], True
    made = generated_outliers(config.num_outliers, config.split_seed, digits, single)
    procedure = data.preprocess.procedure
    if procedure != "mnist":
        # Made in MNIST's form; another model sees pictures through its own procedure
        # (Fashion-MNIST's fills the frame, centred), so each goes through it, drawn as
        # dark ink on paper, as a picture of it would come.
        return torch.stack([prepare(Image.fromarray(255 - pic).resize((56, 56)), size,
                                    channels, procedure) for pic in made])
    pics = torch.from_numpy(made).unsqueeze(1)
    if tuple(size) != (28, 28):
        pics = F.interpolate(pics.float(), size=tuple(size), mode="bilinear",
                             align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return pics.expand(-1, channels, -1, -1).contiguous()
