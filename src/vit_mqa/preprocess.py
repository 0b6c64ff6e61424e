"""Reading images of any kind and making them look like a run's training data.

Two layers:

* reading (:func:`open_image`, :func:`load_source`, :func:`read_image`): only regular
  files are opened (a FIFO would block), Pillow's decompression-bomb guard becomes a
  one-line error, EXIF orientation is applied, and 16-bit and float images are scaled
  to 8 bits by their real depth rather than clipped;
* normalisation procedures, recorded in a run's ``config.json`` and applied before
  prediction: ``"mnist"`` (the LeCun-Cortes-Burges procedure: polarity, background
  removal, crop to the ink, longer side to 20 px, centre of mass at the centre of
  28x28), ``"fashion-mnist"`` (Xiao-Rasul-Vollgraf: trim the background, longer side
  to the full size, centre, invert to light-on-dark), and the plain geometric
  ``"stretch"``, ``"pad"`` and ``"center-crop"`` of image-folder runs.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .config import RESIZES
from .errors import MAX_IMAGE_SIDE, VitMqaError

PROCEDURES = (*RESIZES, "mnist", "fashion-mnist")
ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Above this many pixels on the longer side the ink-finding steps work on a reduced copy:
# the result is 28x28 anyway, and a 12-megapixel photo would take seconds.
_WORK_SIDE = 512
MAX_IMAGE_FILE_BYTES = 256 << 20


# ---------------------------------------------------------------- reading


def open_image(path: str | Path) -> Image.Image:
    """A regular image file -> a loaded PIL image, EXIF orientation applied.

    Raises VitMqaError("cannot read image PATH: reason") for anything else, without
    blocking on FIFOs or devices and without decoding decompression bombs.
    """
    def nonblocking(name: str, flags: int) -> int:
        # Opening a FIFO for reading would otherwise wait for a writer.
        return os.open(name, flags | getattr(os, "O_NONBLOCK", 0))

    try:
        f = open(path, "rb", opener=nonblocking)
    except OSError as e:
        raise VitMqaError(f"cannot read image {path}: {e.strerror or e}") from None
    with f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise VitMqaError(f"cannot read image {path}: not a regular file")
        if info.st_size > MAX_IMAGE_FILE_BYTES:
            raise VitMqaError(f"cannot read image {path}: {info.st_size:,} bytes is more than "
                              f"the {MAX_IMAGE_FILE_BYTES:,} an image file may have")
        # Decoded from memory: a damaged length field then reads past the end of a buffer
        # the size of the file, where a file object would first allocate what it claims.
        data = io.BytesIO(f.read())
        try:
            with Image.open(data) as img:
                img.load()
                return ImageOps.exif_transpose(img)
        except Image.DecompressionBombError as e:
            raise VitMqaError(f"cannot read image {path}: too large to decode safely "
                              f"({e})") from None
        except UnidentifiedImageError:
            raise VitMqaError(f"cannot read image {path}: not an image format Pillow "
                              "reads, or a damaged file") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise VitMqaError(f"cannot read image {path}: {e}") from None


def _array_to_image(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) arrays of bool, integer or float pixels -> a PIL image.

    Floats are taken as [0, 1] when their maximum is at most 1, else as [0, 255];
    uint16 keeps its 16 bits.
    """
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise VitMqaError(f"an image array must be (H, W) or (H, W, 1|3|4), got {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16 and a.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(a))  # mode "I;16"
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float32))
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
        a = (np.clip(a * scale, 0, 255) + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))  # "L", "RGB" or "RGBA" by shape


def load_source(source: ImageInput) -> tuple[Image.Image, str]:
    """A path, PIL image, numpy array (H, W[, C]) or tensor ([C,] H, W) -> (image, name)."""
    if isinstance(source, (str, Path)):
        return open_image(source), str(source)
    if isinstance(source, Image.Image):
        try:
            return ImageOps.exif_transpose(source), "image"
        except (OSError, ValueError) as e:
            raise VitMqaError(f"cannot read image: {e}") from None
    if isinstance(source, torch.Tensor):
        t = source.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # torch's channels-first layout
            t = t.permute(1, 2, 0)
        return _array_to_image(t.numpy()), "tensor"
    if isinstance(source, np.ndarray):
        return _array_to_image(source), "array"
    raise VitMqaError(f"cannot read an image from a {type(source).__name__}")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit modes -> "L" by their real range (convert("L") would clip them)."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32) / 65535.0
    elif img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        # Pillow reads some 16-bit files as "I": values above 255 mean a 16-bit range.
        a = a / (65535.0 if a.max(initial=0) > 255 else 255.0)
    elif img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float32))
        top = a.max(initial=0.0)
        a = a / (1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0)
    else:
        return img
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))


def _resize(img: Image.Image, size: tuple[int, int], resize: str) -> Image.Image:
    """Geometric fit to (H, W): stretch, fit and pad with black, or fill and crop."""
    h, w = size
    if img.size == (w, h):
        return img
    if resize == "stretch":
        return img.resize((w, h), Image.Resampling.BILINEAR)
    if resize not in RESIZES:
        raise VitMqaError(f"unknown resize {resize!r}: use one of {', '.join(RESIZES)}")
    scale = (min if resize == "pad" else max)(w / img.width, h / img.height)
    nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    scaled = img.resize((nw, nh), Image.Resampling.BILINEAR)
    if resize == "center-crop":
        left, top = (nw - w) // 2, (nh - h) // 2
        return scaled.crop((left, top, left + w, top + h))
    canvas = Image.new(img.mode, (w, h))  # black: zero is the padding of a normalised batch
    canvas.paste(scaled, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def image_to_tensor(img: Image.Image, image_size: tuple[int, int], in_channels: int,
                    resize: str = "stretch") -> torch.Tensor:
    """A PIL image -> uint8 (C, H, W) by a geometric fit; transparency composited on black."""
    if in_channels not in (1, 3):
        raise VitMqaError(f"image files give 1 or 3 channels, the model wants {in_channels}")
    img = to_8bit(img)
    if _has_alpha(img):
        # Composite transparency onto black, the background of MNIST-style data.
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    img = _resize(img.convert("L" if in_channels == 1 else "RGB"), image_size, resize)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, image_size: tuple[int, int], in_channels: int,
               resize: str = "stretch") -> torch.Tensor:
    """Any image file Pillow reads -> uint8 (C, H, W) at image_size."""
    return image_to_tensor(open_image(path), image_size, in_channels, resize)


# ---------------------------------------------------------------- ink


def _gray_and_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Luminance in [0, 1] at real depth, and alpha in [0, 1] when the image has any."""
    img = to_8bit(img)
    alpha = None
    if _has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        gray = np.einsum("hwc,c->hw", rgba[..., :3],
                         np.array([0.299, 0.587, 0.114], dtype=np.float32))
        alpha = rgba[..., 3]
    else:
        gray = np.asarray(img.convert("L") if img.mode != "L" else img,
                          dtype=np.float32) / 255.0
    return gray, alpha


def _shrink(a: np.ndarray, side: int) -> np.ndarray:
    h, w = a.shape
    if max(h, w) <= side:
        return a
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize(size, Image.Resampling.BOX))


def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (edges replicated), by integral images."""
    if r < 1:
        return a
    p = np.pad(a.astype(np.float64), r, mode="edge")
    c = np.pad(p.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = 2 * r + 1
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return (s / (k * k)).astype(np.float32)


def _robust_sigma(x: np.ndarray) -> float:
    med = np.median(x)
    return float(1.4826 * np.median(np.abs(x - med)))


def _flatten(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """Subtract a smooth background (uneven lighting, grey paper): a quadratic surface
    fitted to the pixels that are not ink, by iterated outlier rejection. Returns the
    residual and the noise level of the background."""
    h, w = gray.shape
    step = max(1, int(np.sqrt(h * w / 10000)))  # a lighting surface needs few samples
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    v = gray[::step, ::step].ravel()

    def design(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        u, t = xx.ravel() / max(w - 1, 1) - 0.5, yy.ravel() / max(h - 1, 1) - 0.5
        return np.stack([np.ones_like(u), u, t, u * u, u * t, t * t], axis=1)

    a = design(ys, xs)
    # Start from a flat background (the median) so that a large digit cannot pull the
    # first surface towards itself; ink is the minority of the pixels.
    coef = np.zeros(6)
    coef[0] = np.median(v)
    sigma = _robust_sigma(v)
    keep = np.abs(v - coef[0]) < 3.0 * max(sigma, 1.5 / 255)
    for _ in range(8):
        if keep.sum() < 12:
            break
        # Normal equations with einsum, solved at 6x6: a least-squares call on the whole
        # sample starts OpenBLAS's threads, which then fight torch's for the cores (the
        # demo's p95 latency went from 23 ms to 114 ms on 2 cores).
        sub = a[keep]
        coef = np.linalg.lstsq(np.einsum("ij,ik->jk", sub, sub),
                               np.einsum("ij,i->j", sub, v[keep]), rcond=None)[0]
        res = v - np.einsum("ij,j->i", a, coef)
        sigma = _robust_sigma(res[keep])
        new = np.abs(res - np.median(res[keep])) < 3.0 * max(sigma, 1.5 / 255)
        if np.array_equal(new, keep):
            break
        keep = new
    u = np.arange(w, dtype=np.float64)[None, :] / max(w - 1, 1) - 0.5
    t = np.arange(h, dtype=np.float64)[:, None] / max(h - 1, 1) - 0.5
    surface = (coef[0] + coef[1] * u + coef[2] * t + coef[3] * u * u + coef[4] * u * t
               + coef[5] * t * t)
    return (gray - surface).astype(np.float32), max(sigma, 1.0 / 255)


def ink_map(img: Image.Image) -> np.ndarray:
    """Ink as light-on-dark float (H, W) in [0, 1], paper texture, lighting and noise
    removed, grey levels kept inside the strokes. All zero when there is no ink."""
    gray, alpha = _gray_and_alpha(img)
    if alpha is not None and (alpha < 0.9).mean() > 0.01:
        opaque = gray[alpha > 0.5]
        if opaque.size and (opaque.size >= 0.5 * alpha.size or opaque.std() > 0.15):
            # An opaque sheet (paper and ink) with transparent margins: margins are paper.
            paper = float(np.median(opaque))
            gray = gray * alpha + paper * (1 - alpha)
        else:
            # Strokes of one colour on a transparent canvas: the alpha channel is the ink,
            # whatever colour the strokes were given.
            gray = alpha
    gray = _shrink(gray, _WORK_SIDE)
    residual, sigma = _flatten(gray)
    # Polarity: ink is the side whose excursions from the background add up to more.
    over = np.clip(residual - 3 * sigma, 0, None).sum()
    under = np.clip(-residual - 3 * sigma, 0, None).sum()
    ink = residual if over >= under else -residual
    # Find the strokes on a blurred copy (noise averages out, strokes do not), then keep
    # the unblurred grey levels near them.
    r = max(1, round(max(gray.shape) / 160))
    blurred = _box_blur(ink, r)
    sigma_b = max(_robust_sigma(blurred), 0.5 / 255)
    peak = float(blurred.max(initial=0.0))
    if peak < max(6 * sigma_b, 0.06):
        return np.zeros_like(ink)
    strokes = blurred > max(5 * sigma_b, 0.25 * peak)
    near = _box_blur(strokes.astype(np.float32), r) > 0
    hi = float(np.percentile(ink[strokes], 90))
    lo = min(max(4 * sigma, 0.2 * hi), 0.5 * hi)
    return np.clip((ink - lo) / max(hi - lo, 1e-6), 0, 1) * near


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _resize_float(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float (H, W) -> (h, w) with Lanczos (antialiased when shrinking), clipped."""
    h, w = size
    out = Image.fromarray(a.astype(np.float32)).resize((w, h), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(out), 0, 1)


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: twice the area over the perimeter of the ink (ink
    > 0.5), exact for long ribbons."""
    m = ink > 0.5
    area = int(m.sum())
    if area == 0:
        return 0.0
    p = np.pad(m, 1)
    perimeter = int((p[1:] != p[:-1]).sum() + (p[:, 1:] != p[:, :-1]).sum())
    return 2.0 * area / perimeter


def _morph(a: np.ndarray, r: int) -> np.ndarray:
    """Grey dilation (r > 0) or erosion (r < 0) by a (2|r|+1)^2 square."""
    filt = ImageFilter.MaxFilter if r > 0 else ImageFilter.MinFilter
    img = Image.fromarray(a.astype(np.float32))
    for _ in range(abs(r)):
        img = img.filter(filt(3))
    return np.asarray(img)


def _blank(name: str) -> VitMqaError:
    return VitMqaError(f"no ink found in {name}: the image is blank")


# Stroke widths (stroke_width, in pixels of the 20 px box) of MNIST training digits after
# this procedure: median 1.8, 5th-95th percentile 1.17-2.63. A marker's or a fine pen's
# strokes outside the band are thinned or thickened to its nearer edge.
_STROKE_BAND = (1.1, 2.6)
_MORPH_SIDE = 4  # morphology on a copy 4x the final box: fine steps, cheap


def _normalize_strokes(crop: np.ndarray, box: int) -> np.ndarray:
    """Thin or thicken strokes far from MNIST's width; returns the re-cropped ink."""
    side = box * _MORPH_SIDE
    if max(crop.shape) > side:
        s = side / max(crop.shape)
        crop = np.clip(np.asarray(Image.fromarray(crop.astype(np.float32)).resize(
            (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))),
            Image.Resampling.BOX)), 0, 1)
    per_px = box / max(crop.shape)  # final pixels per pixel of this copy
    width = stroke_width(crop) * per_px
    lo, hi = _STROKE_BAND
    if lo <= width <= hi or width == 0:
        return crop
    # Each step of a 3x3 filter moves both edges of a stroke by one pixel.
    steps = round(((lo if width < lo else hi) - width) / per_px / 2)
    if steps == 0:
        return crop
    if steps > 0:
        crop = np.pad(crop, steps)
    changed = _morph(crop, steps)
    found = _bbox(changed > 0.05)
    if found is None:  # eroded away: keep the strokes as drawn
        return crop
    y0, y1, x0, x1 = found
    return changed[y0:y1, x0:x1]


def mnist_normalize(ink: np.ndarray, image_size: tuple[int, int] = (28, 28),
                    name: str = "image") -> np.ndarray:
    """Ink (H, W) in [0, 1] -> uint8 image_size the MNIST way: crop to the ink, longer
    side to 20/28 of the size keeping the aspect ratio, centre of mass at the centre."""
    box = _bbox(ink > 0.05)
    if box is None:
        raise _blank(name)
    y0, y1, x0, x1 = box
    crop = ink[y0:y1, x0:x1]
    size_h, size_w = image_size
    target = max(1, round(min(size_h, size_w) * 20 / 28))
    crop = _normalize_strokes(crop, target)
    scale = target / max(crop.shape)
    digit = _resize_float(crop, (max(1, round(crop.shape[0] * scale)),
                                 max(1, round(crop.shape[1] * scale))))
    mass = digit.sum()
    if mass <= 0:
        raise _blank(name)
    cy = (digit.sum(1) * np.arange(digit.shape[0])).sum() / mass
    cx = (digit.sum(0) * np.arange(digit.shape[1])).sum() / mass
    # Integer shift, as in MNIST: the centre of mass lands on pixel (H/2, W/2).
    oy, ox = round(size_h / 2 - cy), round(size_w / 2 - cx)
    out = np.zeros(image_size, dtype=np.float32)
    ys, xs = slice(max(oy, 0), min(oy + digit.shape[0], size_h)), \
        slice(max(ox, 0), min(ox + digit.shape[1], size_w))
    out[ys, xs] = digit[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox]
    return (out * 255 + 0.5).astype(np.uint8)


def fashion_normalize(img: Image.Image, image_size: tuple[int, int] = (28, 28),
                      name: str = "image") -> np.ndarray:
    """The Fashion-MNIST conversion: trim the background, longer side to the full size
    keeping the aspect ratio, centre, grayscale, invert to light-on-dark."""
    gray, alpha = _gray_and_alpha(img)
    if alpha is not None:  # product shots are on white: transparency is that white
        gray = gray * alpha + (1 - alpha)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    diff = np.abs(gray - background)
    noise = max(_robust_sigma(border), 1.0 / 255)
    box = _bbox(diff > max(4 * noise, 0.04))
    if box is None:
        raise _blank(name)
    y0, y1, x0, x1 = box
    crop = gray[y0:y1, x0:x1]
    if background > 0.5:
        crop, background = 1 - crop, 1 - background
    # Background to black, the rest stretched over what is left.
    crop = np.clip((crop - background) / max(1 - background, 1e-6), 0, 1)
    size_h, size_w = image_size
    scale = min(size_h / crop.shape[0], size_w / crop.shape[1])
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    item = _resize_float(crop, (h, w))
    out = np.zeros(image_size, dtype=np.float32)
    top, left = (size_h - h) // 2, (size_w - w) // 2
    out[top:top + h, left:left + w] = item
    return (out * 255 + 0.5).astype(np.uint8)


def prepare(source: ImageInput, image_size: tuple[int, int], in_channels: int,
            procedure: str = "stretch", raw: bool = False) -> torch.Tensor:
    """Any supported input -> uint8 (C, H, W) at image_size after the procedure.

    raw=True skips the procedure and only stretches to the size (inputs already in the
    dataset's format). "mnist" and "fashion-mnist" raise VitMqaError for an image
    without ink.
    """
    if procedure not in PROCEDURES:
        raise VitMqaError(f"unknown preprocessing procedure {procedure!r}: use one of "
                          f"{', '.join(PROCEDURES)}")
    img, name = load_source(source)
    if raw or procedure in RESIZES:
        out = image_to_tensor(img, image_size, in_channels, "stretch" if raw else procedure)
        if procedure in ("mnist", "fashion-mnist") and int(out.max()) == int(out.min()):
            raise _blank(name)
        return out
    if procedure == "mnist":
        array = mnist_normalize(ink_map(img), image_size, name)
    else:
        array = fashion_normalize(img, image_size, name)
    tensor = torch.from_numpy(array).unsqueeze(0)
    return tensor.expand(in_channels, -1, -1).contiguous()


# ---------------------------------------------------------------- model input


@dataclass
class Preprocess:
    """How raw pixels become model input; saved with every run so that prediction
    sees exactly what training saw."""

    image_size: tuple[int, int]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "stretch"  # images of another size are resized to image_size (bilinear)
    # What prediction does to people's images first (see preprocess.PROCEDURES): "mnist" or
    # "fashion-mnist" for those datasets, else the resize. Configs without it: "stretch".
    procedure: str = "stretch"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """From config.json's "preprocess", every field checked (it may come from a file
        someone downloaded)."""
        if not isinstance(d, dict):
            raise VitMqaError(f"\"preprocess\" must be an object, got {type(d).__name__}")
        missing = [k for k in ("image_size", "in_channels", "mean", "std") if k not in d]
        if missing:
            raise VitMqaError(f"\"preprocess\" has no {', '.join(missing)}")
        size, channels = d["image_size"], d["in_channels"]
        if not (isinstance(size, list) and len(size) == 2 and all(
                _is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in size)):
            raise VitMqaError(f"preprocess.image_size must be [height, width], each 1 to "
                              f"{MAX_IMAGE_SIDE}, got {size!r}")
        if not (_is_int(channels) and channels in (1, 3)):
            raise VitMqaError(f"preprocess.in_channels must be 1 or 3, got {channels!r}")
        for key in ("mean", "std"):
            values = d[key]
            if not (isinstance(values, list) and len(values) == channels and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in values)):
                raise VitMqaError(f"preprocess.{key} must be {channels} finite number(s), "
                                  f"got {values!r}")
        if not all(v > 0 for v in d["std"]):
            raise VitMqaError(f"preprocess.std must be > 0, got {d['std']!r}")
        resize, procedure = d.get("resize", "stretch"), d.get("procedure", "stretch")
        if not (isinstance(resize, str) and isinstance(procedure, str)):
            raise VitMqaError("preprocess.resize and preprocess.procedure must be names")
        return cls((size[0], size[1]), channels, tuple(float(v) for v in d["mean"]),
                   tuple(float(v) for v in d["std"]), resize, procedure)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (B, C, H, W) -> normalised model input."""
        mean, std = _channel_stats(tuple(self.mean), tuple(self.std), images.device,
                                   images.dtype)
        return (images - mean) / std

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images -> model input (B, C, H, W), as in training.

        A 4-D tensor is a batch already at the model's size: uint8 in 0-255 (as the
        datasets store pixels) or float in [0, 1]. Anything else, one picture or a list
        (paths, PIL images, numpy arrays, 2-D/3-D tensors), goes through the recorded
        procedure first (:func:`prepare`), as ``vit-mqa predict`` does.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            batch = images
        else:
            items = images if isinstance(images, (list, tuple)) else [images]
            if not items:
                raise VitMqaError("no images given")
            batch = torch.stack([prepare(item, tuple(self.image_size), self.in_channels,
                                         self.procedure) for item in items])
        if tuple(batch.shape[1:]) != (self.in_channels, *self.image_size):
            raise VitMqaError(f"expected images of shape (B, {self.in_channels}, "
                              f"{self.image_size[0]}, {self.image_size[1]}), got "
                              f"{tuple(batch.shape)}")
        if batch.dtype == torch.uint8:
            return self.normalize(batch.float().div_(255.0))
        return self.normalize(batch.float())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def run_preprocess(config: dict[str, Any], image_size: tuple[int, int], in_channels: int,
                   where: str | Path) -> Preprocess:
    """A run's recorded preprocessing, checked against the model it goes with; a bare
    model directory without one gets plain [-1, 1] scaling."""
    if "preprocess" not in config:
        return Preprocess(tuple(image_size), in_channels, (0.5,) * in_channels,
                          (0.5,) * in_channels)
    try:
        pre = Preprocess.from_dict(config["preprocess"])
    except VitMqaError as e:
        raise VitMqaError(f"{where}: {e}") from None
    data = config.get("data")
    dataset = data.get("dataset") if isinstance(data, dict) else None
    if "procedure" not in config["preprocess"] and dataset in ("mnist", "fashion-mnist"):
        # A run saved before the procedure was recorded: people's drawings and photos need
        # the dataset's own normalisation, not a plain stretch.
        pre.procedure = dataset
    if tuple(pre.image_size) != tuple(image_size) or pre.in_channels != in_channels:
        raise VitMqaError(f"{where}: preprocess gives {pre.in_channels}x{pre.image_size[0]}x"
                          f"{pre.image_size[1]} images, the model takes {in_channels}x"
                          f"{image_size[0]}x{image_size[1]}")
    return pre


def run_classes(config: dict[str, Any], num_classes: int, where: str | Path) -> list[str]:
    """A run's class names (default "0", "1", ...), one per model output."""
    classes = config.get("classes")
    if classes is None or classes == []:
        return [str(i) for i in range(num_classes)]
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise VitMqaError(f"{where}: \"classes\" must be a list of names")
    if len(classes) != num_classes:
        raise VitMqaError(f"{where}: config lists {len(classes)} classes but the model has "
                          f"{num_classes} outputs")
    return classes


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device, not per batch: on a GPU each would be a host-to-device copy.
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1))
