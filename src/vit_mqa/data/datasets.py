"""Datasets held in memory as uint8 tensors.

MNIST and Fashion-MNIST come from their standard IDX files (gzip or raw), found
by a fixed lookup order and verified by the SHA-256 of their uncompressed
content; a missing copy is downloaded into the per-user cache. A folder of
images with one sub-folder per class (the ImageFolder layout) is decoded once,
at load time, into the same uint8 form. Nothing is decoded per sample while
training: batches are slices of one tensor.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write
from ..config.sections import DataConfig
from ..errors import VitMqaError
from . import images as image_files
from .images import list_images
from .preprocess import Preprocess

SPLIT_NAMES = ("train-images", "train-labels", "test-images", "test-labels")


@dataclass(frozen=True)
class IdxDatasetSpec:
    """A dataset published as the four MNIST-style IDX files."""

    name: str
    directory: str  # sub-folder name under each data root
    files: dict[str, str]  # split name -> file name without ".gz"
    sha256: dict[str, str]  # split name -> SHA-256 of the uncompressed file
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    mean: float
    std: float


_IDX_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}

DATASETS: dict[str, IdxDatasetSpec] = {
    "mnist": IdxDatasetSpec(
        name="mnist",
        directory="mnist",
        files=_IDX_FILES,
        sha256={
            "train-images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test-images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test-labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(i) for i in range(10)),
        mean=0.1307,
        std=0.3081,
    ),
    "fashion-mnist": IdxDatasetSpec(
        name="fashion-mnist",
        directory="fashion-mnist",
        files=_IDX_FILES,
        sha256={
            "train-images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test-images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test-labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mean=0.2860,
        std=0.3530,
    ),
}


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    preprocess: Preprocess
    source: str  # where the files were found, for the log


# ---------------------------------------------------------------- IDX files


# Five times the largest MNIST-style file (47 MB): a corrupt or hostile gzip stops here
# instead of inflating without limit.
MAX_IDX_BYTES = 256 << 20


def read_maybe_gz(path: Path, compressed: bool | None = None) -> bytes:
    """A file's bytes, decompressed when it is gzip (by default: when its name ends in
    .gz), at most MAX_IDX_BYTES of them."""
    compressed = path.suffix == ".gz" if compressed is None else compressed
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            raw = f.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise VitMqaError(f"cannot read {path}: corrupt or truncated file ({e})") from None
    if len(raw) > MAX_IDX_BYTES:
        raise VitMqaError(f"{path} holds more than {MAX_IDX_BYTES:,} bytes: not an "
                          "MNIST-style file")
    return raw


def parse_idx(raw: bytes, source: str | Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (the only type MNIST-style sets use)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise VitMqaError(f"{source} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise VitMqaError(f"{source}: IDX data type 0x{raw[2]:02x} is not unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise VitMqaError(f"{source}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise VitMqaError(
            f"{source}: IDX header says shape {shape} but holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vit-mqa"


# Where Debian's dataset packages (e.g. dataset-fashion-mnist) install; last in the lookup.
SYSTEM_DATASETS = Path("/usr/share/datasets")


def data_roots(data_dir: str | None) -> list[Path]:
    """The lookup order: --data-dir, $VIT_MQA_DATA, the per-user cache, /usr/share/datasets."""
    roots = [data_dir, os.environ.get("VIT_MQA_DATA"), str(cache_dir()), str(SYSTEM_DATASETS)]
    return [Path(r).expanduser() for r in roots if r]


def candidate_dirs(spec: IdxDatasetSpec, data_dir: str | None) -> list[tuple[Path, bool]]:
    """Folders in lookup order that hold all four files, as root/<name> (named: True)
    or as the root itself (named: False)."""
    found: list[tuple[Path, bool]] = []
    for root in data_roots(data_dir):
        for directory, named in ((root / spec.directory, True), (root, False)):
            if (all(d != directory for d, _ in found)
                    and all(_find_file(directory, s) for s in spec.files.values())):
                found.append((directory, named))
    return found


def locate_idx_dataset(spec: IdxDatasetSpec, data_dir: str | None) -> Path | None:
    """First folder in the lookup order that holds all four files, verified or not."""
    dirs = candidate_dirs(spec, data_dir)
    return dirs[0][0] if dirs else None


def _mirrors(spec: IdxDatasetSpec) -> list[str]:
    override = os.environ.get("VIT_MQA_MIRRORS")
    return override.split() if override else list(spec.mirrors)


def download_idx_dataset(spec: IdxDatasetSpec, mirrors: Sequence[str] | None = None) -> Path:
    """Fetch the four files into the cache, verifying each before it is moved into place."""
    target = cache_dir() / spec.directory
    made = [d for d in (target.parent, target) if not d.exists()]
    target.mkdir(parents=True, exist_ok=True)
    try:
        _download_missing(spec, target, list(mirrors) if mirrors is not None else _mirrors(spec))
    except BaseException:
        for d in reversed(made):  # a failed download leaves no empty folders behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return target


def _download_missing(spec: IdxDatasetSpec, target: Path, mirrors: list[str]) -> None:
    for split, stem in spec.files.items():
        if _find_file(target, stem):
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + stem + ".gz"
            try:
                _download_verified(url, target / (stem + ".gz"), spec.sha256[split])
                break
            except (_DownloadFailed, VitMqaError) as e:
                errors.append(f"{url}: {e}")
        else:
            names = ", ".join(s + ".gz" for s in spec.files.values())
            raise VitMqaError(
                f"{spec.name} not found locally and the download failed "
                f"({'; '.join(errors)}). Put the four IDX files ({names}) "
                f"in {target}, or set `data_dir` (or VIT_MQA_DATA) to where they are"
            )


class _DownloadFailed(Exception):
    """A mirror that did not deliver a good file; the next one is tried."""


def _download_verified(url: str, dest: Path, sha256: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=30)
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise _DownloadFailed(getattr(e, "reason", e)) from None
            total = int(response.headers.get("Content-Length") or 0) or None
            with response, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                                disable=None, leave=False, file=sys.stderr) as bar:
                while True:
                    try:
                        chunk = response.read(1 << 16)
                    except (OSError, http.client.HTTPException) as e:
                        raise _DownloadFailed(e) from None
                    if not chunk:
                        break
                    out.write(chunk)  # a full disk is atomic_write's "cannot write" error
                    bar.update(len(chunk))
        try:
            digest = hashlib.sha256(read_maybe_gz(tmp, compressed=True)).hexdigest()
        except VitMqaError as e:
            raise _DownloadFailed(f"not a valid gzip file ({str(e).split('(')[-1]}") from None
        if digest != sha256:
            raise _DownloadFailed(f"checksum mismatch (sha256 {digest}, expected {sha256})")

    atomic_write(dest, write)


def load_idx_dataset(spec: IdxDatasetSpec, data_dir: str | None = None,
                     download: bool = True) -> tuple[dict[str, np.ndarray], Path]:
    """Find (or download), verify and parse the four files.

    A folder named for the dataset (root/mnist) whose files fail verification is an
    error: it is a corrupt copy. A bare root that fails (say, it holds Fashion-MNIST,
    whose file names are MNIST's) is passed over for the next folder in the lookup
    order; if none verifies, the first failure is the error.
    """
    failures: list[VitMqaError] = []
    for directory, named in candidate_dirs(spec, data_dir):
        try:
            return _read_verified(spec, directory), directory
        except VitMqaError as e:
            if named:
                raise
            failures.append(e)
    if failures:
        raise failures[0]
    if data_dir is not None:
        # A --data-dir that holds some of the files is a copy with a file missing: say so,
        # rather than fall through to a download.
        for directory in (Path(data_dir).expanduser() / spec.directory, Path(data_dir)):
            present = [s for s in spec.files.values() if _find_file(directory, s)]
            if present:
                absent = [s for s in spec.files.values() if s not in present]
                raise VitMqaError(f"{directory} holds {len(present)} of the 4 {spec.name} "
                                  f"files; missing: {', '.join(absent)} (.gz or raw)")
    if not download:
        places = ", ".join(str(r / spec.directory) for r in data_roots(data_dir))
        raise VitMqaError(f"{spec.name} not found in {places}; set `data_dir` to where "
                          "the files are, or allow the `download`")
    directory = download_idx_dataset(spec)
    return _read_verified(spec, directory), directory


def _read_verified(spec: IdxDatasetSpec, directory: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split, stem in spec.files.items():
        path = _find_file(directory, stem)
        assert path is not None
        raw = read_maybe_gz(path)
        digest = hashlib.sha256(raw).hexdigest()
        if digest != spec.sha256[split]:
            raise VitMqaError(f"checksum mismatch for {path}: sha256 of its content is {digest}, "
                              f"expected {spec.sha256[split]} ({spec.name}); replace the file")
        arrays[split] = parse_idx(raw, path)
    return arrays


# ---------------------------------------------------------------- image folders


def read_image(path: str | Path, image_size: tuple[int, int], in_channels: int,
               resize: str = "stretch") -> torch.Tensor:
    """Any image file Pillow reads -> uint8 (C, H, W) at image_size (see preprocess)."""
    return image_files.read_image(path, image_size, in_channels, resize)


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_image_folder(root: Path, classes: list[str] | None, image_size: tuple[int, int] | None,
                      in_channels: int | None, resize: str = "stretch"
                      ) -> tuple[Split, list[str], tuple[int, int], int]:
    """Decode every image under root/<class>/ into one uint8 tensor."""
    if not root.is_dir():
        raise VitMqaError(f"image folder {root} does not exist")
    folders = _class_folders(root)
    if classes is None:
        classes = [d.name for d in folders]
        if len(classes) < 2:
            raise VitMqaError(f"{root} needs one sub-folder per class (found {len(classes)})")
    elif sorted(d.name for d in folders) != sorted(classes):
        raise VitMqaError(f"{root} has class folders {[d.name for d in folders]}, "
                          f"expected {classes}")
    files = [(f, i) for i, c in enumerate(classes) for f in list_images([root / c])]
    if not files:
        raise VitMqaError(f"no images found under {root}")
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in files)]
    if empty:
        # A class with no examples would be a class the model can never learn or be tested on.
        raise VitMqaError(f"class folder {root / empty[0]} holds no images; add some, or "
                          "remove the folder")
    if image_size is None or in_channels is None:
        first = image_files.open_image(files[0][0])
        size = (first.height, first.width)
        gray = first.mode in ("1", "L", "LA", "I", "F") or first.mode.startswith("I;16")
        image_size = image_size or size
        in_channels = in_channels or (1 if gray else 3)
    images = torch.empty(len(files), in_channels, *image_size, dtype=torch.uint8)
    for n, (f, _) in enumerate(tqdm(files, desc=f"decoding {root.name}", disable=None,
                                    leave=False, file=sys.stderr)):
        images[n] = read_image(f, image_size, in_channels, resize)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return Split(images, labels), classes, image_size, in_channels


# ---------------------------------------------------------------- splits and entry point


def channel_stats(images: torch.Tensor, chunk: int | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) standard deviation of uint8 images (N, C, H, W) in
    [0, 1], at least 1e-3, summed ``chunk`` images at a time (default: 4 M values, 32 MB
    in float64): a float copy of the whole set would be four times its size again."""
    channels = images.shape[1]
    chunk = chunk or max(1, (4 << 20) // max(1, images[0].numel()))
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].double().div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square_().sum(dim=(0, 2, 3))
    n = images.numel() // channels
    mean = total / n
    var = (squares - n * mean.square()) / max(n - 1, 1)
    return (tuple(mean.tolist()),
            tuple(max(float(v), 1e-3) for v in var.clamp_(min=0).sqrt().tolist()))


def _holdout(split: Split, size: int, seed: int, what: str) -> tuple[Split, Split]:
    if not 0 < size < len(split) // 2 + 1:
        raise VitMqaError(f"{what} of {size} images does not fit a training set of "
                          f"{len(split)} images; pass a smaller `val_size` (a count, or a "
                          "fraction such as 0.1)")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    keep, held = order[size:].sort().values, order[:size].sort().values
    return (Split(split.images[keep], split.labels[keep]),
            Split(split.images[held], split.labels[held]))


def _with_printed(train: Split, count: int) -> Split:
    """The training split with ``count`` printed digits appended: the shipped renders
    repeated in order (every font and digit equally often, the remainder from the first
    renders). Their position in an epoch comes from the shuffled order, like any image."""
    from .printed import load_printed_digits

    images, labels = load_printed_digits()
    take = np.arange(count) % len(labels)
    return Split(torch.cat([train.images, torch.from_numpy(images[take]).unsqueeze(1)]),
                 torch.cat([train.labels, torch.from_numpy(labels[take])]))


def load_data(config: DataConfig) -> Data:
    """Load train / validation / test splits as uint8 tensors, per the config."""
    config.validate()
    spec = DATASETS.get(config.dataset)
    if spec is not None:
        if config.in_channels == 3:
            raise VitMqaError(f"{spec.name} images have one channel; in_channels applies to "
                              "image folders")
        arrays, directory = load_idx_dataset(spec, config.data_dir, config.download)

        def split(prefix: str) -> Split:
            images = torch.from_numpy(arrays[f"{prefix}-images"].copy()).unsqueeze(1)
            labels = torch.from_numpy(arrays[f"{prefix}-labels"].astype(np.int64))
            if images.shape[0] != labels.shape[0]:
                raise VitMqaError(f"{spec.name} {prefix}: {images.shape[0]} images "
                                  f"but {labels.shape[0]} labels")
            return Split(images, labels)

        train, test = split("train"), split("test")
        classes = list(spec.classes)
        mean, std = (spec.mean,), (spec.std,)
        source = str(directory)
        resize, procedure = "stretch", spec.name  # the dataset's own normalisation
    else:
        root = Path(config.dataset).expanduser()
        if not root.is_dir():
            raise VitMqaError(f"unknown dataset {config.dataset!r}: not one of "
                              f"{', '.join(DATASETS)} and not an image folder")
        resize = procedure = config.resize
        size = (config.image_size, config.image_size) if config.image_size else None
        train_root = root / "train" if (root / "train").is_dir() else root
        train, classes, size, channels = load_image_folder(train_root, None, size,
                                                           config.in_channels, resize)
        test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        if test_root is not None and train_root != root:
            test = load_image_folder(test_root, classes, size, channels, resize)[0]
        else:
            # No test folder: hold out a fixed test split the same size as validation.
            train, test = _holdout(train, config.val_count(len(train)), config.split_seed + 1,
                                   "a test split")
        mean, std = channel_stats(train.images)
        source = str(root)
    train, val = _holdout(train, config.val_count(len(train)), config.split_seed,
                          "a validation split")
    if config.printed:
        train = _with_printed(train, round(config.printed * len(train)))
    in_channels, h, w = train.images.shape[1:]
    preprocess = Preprocess((int(h), int(w)), int(in_channels), mean, std, resize, procedure)
    return Data(train, val, test, classes, preprocess, source)

