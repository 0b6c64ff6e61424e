"""Reading images of any kind: only regular files are opened (a FIFO would block),
Pillow's decompression-bomb guard becomes a one-line error, EXIF orientation is applied,
and 16-bit and float images are scaled to 8 bits by their real depth rather than clipped.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config.checks import RESIZES
from ..errors import VitMqaError

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
MAX_IMAGE_FILE_BYTES = 256 << 20



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


def has_alpha(img: Image.Image) -> bool:
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
    if has_alpha(img):
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


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm",
                    ".ppm")


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files among paths, searching folders recursively, in sorted order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.exists():  # FIFOs and devices too: reading them reports "not a regular file"
            found.append(p)
        else:
            raise VitMqaError(f"no such file or folder: {p}")
    return found
