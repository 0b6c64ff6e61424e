"""Printed digits: the renders shipped for training, the font check, the data option."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vit_mqa.config import DataConfig
from vit_mqa.data import load_data
from vit_mqa.errors import VitMqaError
from vit_mqa.printed import (
    TRAINING_FAMILIES,
    asset_path,
    font_files,
    load_printed_digits,
    render_digits,
    render_printed_digits,
)

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
LAO = Path("/usr/share/fonts/truetype/noto/NotoLoopedLao-Regular.ttf")  # no Latin digits


def test_shipped_renders_are_every_digit_of_training_fonts_only():
    images, labels = load_printed_digits()
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() == counts.max() > 20  # every font gives all ten digits
    with np.load(asset_path(), allow_pickle=False) as f:
        fonts = set(f["fonts"].tolist())
    assert fonts and all(name.startswith(TRAINING_FAMILIES) for name in fonts)
    # In MNIST's format: light ink on black, a 20 px box centred in 28 px.
    assert (images[:, :3].max() == 0) and (images.max(axis=(1, 2)) == 255).all()


@pytest.mark.skipif(not DEJAVU.is_file(), reason="DejaVu Sans is not installed")
def test_a_latin_font_renders_ten_distinct_digits_in_mnist_format(tmp_path):
    shutil.copy(DEJAVU, tmp_path / DEJAVU.name)
    (tmp_path / "README.txt").write_text("not a font")
    assert font_files(["DejaVu"], [tmp_path]) == [tmp_path / DEJAVU.name]
    assert font_files(["Liberation"], [tmp_path]) == []
    glyphs = render_digits(tmp_path / DEJAVU.name)
    assert glyphs is not None and len(glyphs) == 10
    rendered = render_printed_digits([tmp_path / DEJAVU.name])
    assert rendered["images"].shape == (10, 28, 28)
    assert rendered["labels"].tolist() == list(range(10))
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
