"""Making a picture look like a run's training data, before prediction.

The procedure is recorded in a run's ``config.json``: ``"mnist"`` (the
LeCun-Cortes-Burges procedure: the ink found by :mod:`vit_mqa.data.ink`, cropped, its longer
side to 20 px, its strokes brought to MNIST's width, its centre of mass at the centre of
28x28), ``"fashion-mnist"`` (Xiao-Rasul-Vollgraf: trim the background, longer side to
the full size, centre, invert to light-on-dark), and the plain geometric ``"stretch"``,
``"pad"`` and ``"center-crop"`` of image-folder runs. Files are read by
:mod:`vit_mqa.data.images`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..config.checks import PROCEDURES, RESIZES, checked_preprocess
from ..errors import MAX_IMAGE_SIDE, VitMqaError
from .images import ImageInput, image_to_tensor, load_source
from .ink import bbox, gray_and_alpha, ink_map, robust_sigma


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
    found = bbox(changed > 0.05)
    if found is None:  # eroded away: keep the strokes as drawn
        return crop
    y0, y1, x0, x1 = found
    return changed[y0:y1, x0:x1]


def mnist_normalize(ink: np.ndarray, image_size: tuple[int, int] = (28, 28),
                    name: str = "image") -> np.ndarray:
    """Ink (H, W) in [0, 1] -> uint8 image_size the MNIST way: crop to the ink, longer
    side to 20/28 of the size keeping the aspect ratio, centre of mass at the centre."""
    box = bbox(ink > 0.05)
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
    gray, alpha = gray_and_alpha(img)
    if alpha is not None:  # product shots are on white: transparency is that white
        gray = gray * alpha + (1 - alpha)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    diff = np.abs(gray - background)
    noise = max(robust_sigma(border), 1.0 / 255)
    box = bbox(diff > max(4 * noise, 0.04))
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


def check_procedure(procedure: str) -> None:
    """A clear error for a procedure that is none of PROCEDURES."""
    if procedure not in PROCEDURES:
        raise VitMqaError(f"unknown preprocessing procedure {procedure!r}: use one of "
                          f"{', '.join(PROCEDURES)}")


def prepare(source: ImageInput, image_size: tuple[int, int], in_channels: int,
            procedure: str = "stretch", raw: bool = False) -> torch.Tensor:
    """Any supported input -> uint8 (C, H, W) at image_size after the procedure.

    raw=True skips the procedure and only stretches to the size (inputs already in the
    dataset's format). "mnist" and "fashion-mnist" raise VitMqaError for an image
    without ink.
    """
    check_procedure(procedure)
    try:
        return _prepare(source, image_size, in_channels, procedure, raw)
    except (VitMqaError, MemoryError):
        raise
    except Exception as e:  # a decoder's or numpy's surprise, for one image
        # One picture that trips an unforeseen case (a Pillow plug-in, a numpy shape edge)
        # is that picture's error, one line, not a traceback that ends a folder's run.
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise VitMqaError(f"cannot prepare image {source_name(source)}: "
                          f"{type(e).__name__}{': ' + detail if detail else ''}") from e


def source_name(source: ImageInput) -> str:
    """How an image is named in messages: its path, else its kind."""
    if isinstance(source, (str, Path)):
        return str(source)
    return "tensor" if isinstance(source, torch.Tensor) else \
        "array" if isinstance(source, np.ndarray) else "image"


def _prepare(source: ImageInput, image_size: tuple[int, int], in_channels: int,
             procedure: str, raw: bool) -> torch.Tensor:
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
        """From a config.json's "preprocess" of the layout with image size and channels,
        every field checked (it may come from a file someone downloaded)."""
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
        rest = checked_preprocess({k: v for k, v in d.items()
                                   if k not in ("image_size", "in_channels")}, channels)
        return cls((size[0], size[1]), channels, tuple(rest["mean"]), tuple(rest["std"]),
                   rest["resize"], rest["procedure"])

    @classmethod
    def of_model(cls, config: Any) -> Preprocess:
        """A model's preprocessing, from its config (``ViTConfig``): its own image size and
        channels, and the normalisation and procedure it records (unset: [-1, 1])."""
        c = config
        d = c.preprocess or {"mean": [0.5] * c.in_channels, "std": [0.5] * c.in_channels}
        return cls(tuple(c.image_size), c.in_channels, tuple(d["mean"]), tuple(d["std"]),
                   d.get("resize", "stretch"), d.get("procedure", "stretch"))

    def model_config_entry(self) -> dict[str, Any]:
        """What a model's config records of this (``ViTConfig.preprocess``): everything
        but the size and channels, which the model's own config gives."""
        return {"mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "procedure": self.procedure}

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


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device, not per batch: on a GPU each would be a host-to-device copy.
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1))
