"""Printed digits: the renders shipped for training, the font check, the data option."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vit_mqa.config.sections import DataConfig
from vit_mqa.data.datasets import load_data
from vit_mqa.data.printed import (
    TRAINING_FAMILIES,
    asset_path,
    font_files,
    footless_one,
    load_printed_digits,
    render_digits,
    render_printed_digits,
)
from vit_mqa.errors import VitMqaError

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
LAO = Path("/usr/share/fonts/truetype/noto/NotoLoopedLao-Regular.ttf")  # no Latin digits


def test_shipped_renders_are_every_digit_of_training_fonts_only():
    with np.load(asset_path(), allow_pickle=False) as f:
        fonts, labels, footless = f["fonts"], f["labels"], f["footless"]
    assert fonts.size and all(name.startswith(TRAINING_FAMILIES) for name in fonts.tolist())
    # Every font gives all ten digits once, and at most one footless "1".
    plain = np.bincount(labels[~footless], minlength=10)
    assert plain.min() == plain.max() == len(set(fonts.tolist())) > 20
    assert (labels[footless] == 1).all() and len(set(fonts[footless].tolist())) == footless.sum()
    assert footless.sum() > 20  # the training fonts' ones stand on feet
    images, cycle_labels = load_printed_digits()
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
    # The cycle training repeats: every digit equally often, footed and footless ones alike.
    counts = np.bincount(cycle_labels, minlength=10)
    assert counts.min() == counts.max() == 2 * plain[0]
    with np.load(asset_path(), allow_pickle=False) as f:
        cut = {f["images"][i].tobytes() for i in np.flatnonzero(f["footless"])}
    in_cycle = [image.tobytes() in cut for image in images[cycle_labels == 1]]
    assert sum(in_cycle) == len(cut) == footless.sum()
    # In MNIST's format: light ink on black, a 20 px box centred in 28 px.
    assert (images[:, :3].max() == 0) and (images.max(axis=(1, 2)) == 255).all()


def _ink_width(glyph: np.ndarray, rows: slice) -> int:
    cols = np.flatnonzero((glyph[rows] > 0.5).any(axis=0))
    return int(cols[-1] - cols[0] + 1)


@pytest.mark.skipif(not DEJAVU.is_file(), reason="DejaVu Sans is not installed")
def test_the_footless_one_keeps_the_stem_and_flag_and_drops_the_foot():
    one = render_digits(DEJAVU)[1]
    cut = footless_one(one)
    assert cut is not None and cut.shape == one.shape
    h = one.shape[0]
    stem = _ink_width(one, slice(h // 2, h // 2 + 1))
    assert _ink_width(one, slice(h - 2, h)) > 2 * stem  # DejaVu's "1" stands on a foot
    assert _ink_width(cut, slice(h - 2, h)) <= stem + 2  # only the stem reaches the bottom
    np.testing.assert_array_equal(cut[: h // 2], one[: h // 2])  # flag and stem untouched
    # A stroke without a foot (a plain bar) has nothing to cut.
    bar = np.zeros((60, 12), np.float32)
    bar[:, 4:8] = 1
    assert footless_one(bar) is None


@pytest.mark.skipif(not DEJAVU.is_file(), reason="DejaVu Sans is not installed")
def test_a_latin_font_renders_ten_distinct_digits_in_mnist_format(tmp_path):
    shutil.copy(DEJAVU, tmp_path / DEJAVU.name)
    (tmp_path / "README.txt").write_text("not a font")
    assert font_files(["DejaVu"], [tmp_path]) == [tmp_path / DEJAVU.name]
    assert font_files(["Liberation"], [tmp_path]) == []
    glyphs = render_digits(tmp_path / DEJAVU.name)
    assert glyphs is not None and len(glyphs) == 10
    rendered = render_printed_digits([tmp_path / DEJAVU.name])
    assert rendered["images"].shape == (11, 28, 28)  # ten digits, then the footless "1"
    assert rendered["labels"].tolist() == [*range(10), 1]
    assert rendered["footless"].tolist() == [False] * 10 + [True]
    # The "1" is tall and narrow, the "0" wide: the glyphs are the digits, not boxes.
    ink = rendered["images"] > 128
    width = ink.any(axis=1).sum(axis=1)
    assert width[1] < width[0]


@pytest.mark.skipif(not LAO.is_file(), reason="Noto Looped Lao is not installed")
def test_a_font_without_latin_digits_is_skipped():
    assert render_digits(LAO) is None
    assert render_printed_digits([LAO])["images"].shape == (0, 28, 28)


def test_a_file_that_is_not_a_font_is_skipped(tmp_path):
    bad = tmp_path / "Broken.ttf"
    bad.write_bytes(b"\x00" * 100)
    assert render_digits(bad) is None


def test_training_adds_the_printed_share_after_the_validation_split(data_root):
    plain = load_data(DataConfig(data_dir=str(data_root), download=False))
    mixed = load_data(DataConfig(data_dir=str(data_root), download=False, printed=0.1))
    added = len(mixed.train.labels) - len(plain.train.labels)
    assert added == round(0.1 * len(plain.train.labels))
    assert torch.equal(mixed.val.images, plain.val.images)  # validation stays MNIST
    assert torch.equal(mixed.test.images, plain.test.images)
    images, labels = load_printed_digits()
    tail = mixed.train.images[len(plain.train.labels):][:len(labels), 0]
    assert torch.equal(tail, torch.from_numpy(images))
    assert torch.equal(mixed.train.labels[-added:][:len(labels)], torch.from_numpy(labels))


@pytest.mark.parametrize("kw", [{"printed": -0.1}, {"printed": 1.5},
                                {"printed": float("nan")},
                                {"printed": 0.1, "dataset": "fashion-mnist"}])
def test_printed_bad_settings(kw):
    with pytest.raises(VitMqaError):
        DataConfig(**kw).validate()
