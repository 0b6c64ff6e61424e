"""People's images -> the training data's format: procedures, reading at real depth,
unreadable and hostile files, and the predict CLI on folders with bad files."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from benchmarks.people_styles import STYLES, render, style_rng
from tests.conftest import run_cli, write_image_folder
from vit_mqa.data.datasets import DataConfig, load_data, read_image
from vit_mqa.data.preprocess import Preprocess, prepare
from vit_mqa.errors import VitMqaError


def mnist(source) -> np.ndarray:
    return prepare(source, (28, 28), 1, "mnist")[0].numpy()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.fixture(scope="module")
def digits(mnist_test_arrays):
    images, labels = mnist_test_arrays
    return images[:12], labels[:12]


@pytest.mark.parametrize("style", STYLES)
def test_people_styles_come_back_close_to_the_original(digits, style):
    images, _ = digits
    scores = []
    for i, digit in enumerate(images):
        data, _ = render(digit, style, style_rng(0, style, i))
        scores.append(corr(mnist(Image.open(io.BytesIO(data))), digit))
    # The digit was redrawn, resampled and re-centred: close, not identical.
    assert np.median(scores) > 0.85, scores
    assert min(scores) > 0.6, scores


def test_the_procedure_leaves_mnist_digits_nearly_unchanged(digits):
    images, _ = digits
    assert np.mean([corr(mnist(d), d) for d in images]) > 0.93
    # Black on white, the way people write, is the same digit.
    assert np.mean([corr(mnist(255 - d), d) for d in images]) > 0.93


def test_output_geometry_matches_mnist(digits):
    out = mnist(Image.fromarray(np.pad(255 - digits[0][0], 100, constant_values=255)))
    ys, xs = np.nonzero(out)
    assert max(np.ptp(ys), np.ptp(xs)) + 1 in (20, 21)  # longer side 20 px, antialiased edge
    mass = out.astype(float)
    cy = (mass.sum(1) * np.arange(28)).sum() / mass.sum()
    cx = (mass.sum(0) * np.arange(28)).sum() / mass.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def test_transparency_is_background_whatever_the_ink_colour(digits):
    digit = digits[0][0]
    for colour in ((0, 0, 0), (255, 255, 255), (200, 30, 30)):
        rgba = np.zeros((28, 28, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = digit
        big = Image.fromarray(rgba).resize((140, 140), Image.Resampling.BICUBIC)
        assert corr(mnist(big), digit) > 0.9, colour
    # An opaque sheet with transparent margins: the margins are paper, not ink.
    sheet = np.zeros((60, 60, 4), np.uint8)
    sheet[10:50, 10:50] = (255, 255, 255, 255)
    sheet[16:44, 16:44, :3] = 255 - digit[..., None]
    assert corr(mnist(Image.fromarray(sheet)), digit) > 0.9


def test_exif_orientation_is_applied(digits, tmp_path):
    digit = digits[0][0]
    upright = Image.fromarray(255 - digit).resize((84, 84))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.rotate(90, expand=True).save(tmp_path / "phone.png", exif=exif.tobytes())
    assert corr(mnist(tmp_path / "phone.png"), digit) > 0.9
    # Without the tag the stored pixels are a rotated digit.
    upright.rotate(90, expand=True).save(tmp_path / "plain.png")
    assert corr(mnist(tmp_path / "plain.png"), digit) < 0.6


def test_16_bit_images_keep_their_grey_levels(digits, tmp_path):
    digit = digits[0][0]
    full = Image.fromarray(digit.astype(np.uint16) * 257)  # 16-bit white on black
    assert full.mode == "I;16"
    full.save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode in ("I;16", "I")
    raw = read_image(tmp_path / "d16.png", (28, 28), 1)[0].numpy()
    np.testing.assert_array_equal(raw, digit)  # convert("L") would make every ink pixel 255
    quarter = Image.fromarray(digit.astype(np.uint16) * 64)  # the low quarter of the range
    quarter.save(tmp_path / "q16.png")
    raw = read_image(tmp_path / "q16.png", (28, 28), 1)[0].numpy().astype(int)
    assert np.abs(raw - np.round(digit.astype(float) * 64 / 65535 * 255)).max() <= 1
    assert corr(mnist(tmp_path / "q16.png"), digit) > 0.95
    # In-memory 16-bit and float inputs too.
    assert corr(mnist(digit.astype(np.uint16) * 64), digit) > 0.95
    assert corr(mnist(torch.from_numpy(digit / 255.0).float()), digit) > 0.95


def test_off_centre_digit_on_a_large_canvas(digits):
    digit = digits[0][0]
    canvas = np.full((280, 240), 250, np.uint8)
    canvas[200:256, 10:66] = 255 - np.asarray(Image.fromarray(digit).resize((56, 56)))
    assert corr(mnist(canvas), digit) > 0.9
    # And the old stretch sees nothing like a digit.
    assert corr(prepare(canvas, (28, 28), 1, "mnist", raw=True)[0].numpy(), digit) < 0.3


@pytest.mark.parametrize("blank", [
    np.full((64, 64), 255, np.uint8),
    np.zeros((28, 28), np.uint8),
    np.zeros((40, 40, 4), np.uint8),  # fully transparent
    np.clip(np.random.default_rng(0).normal(180, 4, (120, 160)), 0, 255).astype(np.uint8),
])
def test_blank_images_are_refused(blank):
    with pytest.raises(VitMqaError, match="no ink found in .*: the image is blank"):
        prepare(blank, (28, 28), 1, "mnist")
    with pytest.raises(VitMqaError, match="no ink found"):
        prepare(blank, (28, 28), 1, "fashion-mnist")


def _tight(digit: np.ndarray, scale: int) -> np.ndarray:
    """The digit enlarged and cropped to its ink: strokes touch every edge."""
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale),
                                                   Image.Resampling.BICUBIC))
    rows, cols = np.flatnonzero(big.max(1) > 40), np.flatnonzero(big.max(0) > 40)
    return big[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _shrunk(digit: np.ndarray, side: int) -> np.ndarray:
    """The digit's ink box reduced so that its longer side is ``side`` px, tight."""
    ink = _tight(digit, 1)
    s = side / max(ink.shape)
    size = (max(1, round(ink.shape[1] * s)), max(1, round(ink.shape[0] * s)))
    return np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.BOX))


def _faint(digit: np.ndarray, contrast: float, noise: float, seed: int) -> np.ndarray:
    big = np.asarray(Image.fromarray(digit).resize((112, 112)), dtype=np.float32) / 255
    a = 0.7 - contrast * big + np.random.default_rng(seed).normal(0, noise, big.shape)
    return (np.clip(a, 0, 1) * 255).astype(np.uint8)


def _upscaled_blurred(digit: np.ndarray, side: int) -> np.ndarray:
    """A digit scanned at ``side`` px, enlarged to 64 px and blurred, full contrast."""
    small = Image.fromarray(_shrunk(digit, side))
    up = small.resize((64 * small.width // max(small.size), 64 * small.height // max(small.size)),
                      Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1.5))
    a = np.asarray(up, dtype=np.float32)
    return ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("make", [
    lambda d: 255 - _tight(d, 4),  # dark on light, cropped to the ink
    lambda d: _tight(d, 4),  # light on dark, cropped to the ink
    lambda d: 255 - _tight(d, 1),  # at MNIST's own size, cropped
    lambda d: _faint(d, 0.08, 0.01, 0),  # 8 % contrast, noisy
    lambda d: _faint(d, -0.06, 0.005, 1),  # light ink, 6 % contrast
    lambda d: 255 - _upscaled_blurred(d, 8),  # scanned at 8 px, enlarged, blurred
    lambda d: _upscaled_blurred(d, 12),
    lambda d: 255 - _shrunk(d, 16),  # 16 px, not enlarged
    lambda d: 255 - _shrunk(d, 10),
    lambda d: _shrunk(d, 8),  # 8 px, light on dark
], ids=["tight-dark-ink", "tight-light-ink", "tight-28px", "faint-dark", "faint-light",
        "scan-8", "scan-12", "tiny-16", "tiny-10", "tiny-8"])
def test_hard_real_digits_are_read_not_refused(digits, make):
    """Digits that fill the frame, faint, blurred or a few pixels tall are digits: the
    background and polarity come from the whole image, not its border."""
    images, _ = digits
    scores = [corr(mnist(make(d)), d) for d in images]
    # Scanned at 8 px, a digit keeps its shape, not its strokes.
    assert np.median(scores) > (0.6 if "8" in str(make) else 0.75), scores


def test_a_stray_dot_darker_than_the_digit_does_not_make_it_blank(digits):
    """The strongest ink may be a speck beside the digit (a pen touching the paper): the
    digit's strokes still count as structure."""
    images, _ = digits
    for d in images[:4]:
        page = np.full((200, 200), 225.0)
        big = np.asarray(Image.fromarray(d).resize((112, 112)), dtype=np.float64) / 255
        page[60:172, 70:182] -= 150 * big  # grey strokes
        page[20:25, 20:25] = 0  # a black dot, darker than any stroke
        out = mnist(page.astype(np.uint8))
        assert corr(out, d) > 0.6


def test_dot_matrix_digits_and_marks_close_to_the_digit_are_kept(digits):
    """Only marks far from the digit are dropped as strays: a digit printed in separate
    dots stays whole, and a small mark beside the strokes stays ink."""
    from vit_mqa.data.ink import ink_map

    images, _ = digits
    for d in images[:4]:
        big = np.asarray(Image.fromarray(d).resize((112, 112)), dtype=np.float64) / 255
        grid = np.zeros((112, 112))
        for y in range(0, 112, 8):
            for x in range(0, 112, 8):
                grid[y:y + 5, x:x + 5] = 1
        page = np.full((160, 160), 225.0)
        page[24:136, 24:136] -= 200 * (big > 0.3) * grid
        assert corr(mnist(page.astype(np.uint8)), d) > 0.6
        page = np.full((200, 200), 225.0)
        page[60:172, 70:182] -= 150 * big
        rows, cols = np.nonzero(big > 0.3)
        right = cols.argmax()  # 6 px right of the digit's rightmost ink
        y, x = 60 + rows[right] - 2, 70 + cols[right] + 6
        page[y:y + 5, x:x + 5] = 0
        assert ink_map(Image.fromarray(page.astype(np.uint8)))[y + 2, x + 2] > 0.5


def test_polarity_of_tight_crops_follows_the_strokes(digits):
    """The same tight crop in both polarities gives the same light-on-dark digit."""
    for d in digits[0][:6]:
        crop = _tight(d, 3)
        assert corr(mnist(crop), mnist(255 - crop)) > 0.97


@pytest.mark.parametrize("noise", [
    np.clip(np.random.default_rng(1).normal(128, 25, (64, 64)), 0, 255),
    np.clip(np.random.default_rng(2).normal(128, 50, (480, 640)), 0, 255),
    np.random.default_rng(3).uniform(0, 255, (200, 200)),
    np.where(np.random.default_rng(4).uniform(size=(200, 200)) < 0.02,
             np.random.default_rng(5).integers(0, 2, (200, 200)) * 255, 180),
    np.clip(np.linspace(60, 230, 300)[None, :] + np.random.default_rng(6).normal(0, 8, (200, 300)),
            0, 255),
    np.tile(np.linspace(40, 220, 64), (64, 1)),  # a smooth gradient and nothing else
], ids=["gauss-64", "gauss-photo", "uniform", "salt-and-pepper", "gradient-noise", "gradient"])
def test_noise_and_gradients_are_blank(noise):
    """No structure, no digit: pure noise and smooth lighting are refused, however
    strong the noise."""
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(noise.astype(np.uint8)).save(buf, format=fmt, quality=75)
        with pytest.raises(VitMqaError, match="no ink found .*blank"):
            mnist(Image.open(io.BytesIO(buf.getvalue())))


def test_fashion_procedure_trims_centres_and_inverts(mnist_test_arrays):
    # A dark item on a white product shot, wider than tall, off-centre.
    photo = np.full((300, 400), 255, np.uint8)
    photo[40:140, 60:260] = 90
    out = prepare(photo, (28, 28), 1, "fashion-mnist")[0].numpy()
    rows, cols = np.nonzero(out > 40)
    assert cols.min() == 0 and cols.max() == 27  # longer side fills the 28 px
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1  # centred
    assert out[14, 14] > 150 and out[0, 14] == 0  # light item on black


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid PNG header that declares side x side pixels (decoding is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_one_clear_error(tmp_path):
    _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(VitMqaError, match="cannot read image .*bomb.png: too large to decode"):
        prepare(tmp_path / "bomb.png", (28, 28), 1, "mnist")
    # In image-folder training too.
    root = write_image_folder(tmp_path / "imgs", per_class=4, size=(16, 16))
    _bomb_png(root / "left" / "zz.png")
    with pytest.raises(VitMqaError, match="zz.png: too large to decode"):
        load_data(DataConfig(dataset=str(root), val_size=2))


def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "b.png")
    with pytest.raises(VitMqaError, match="b.png: not a regular file"):
        read_image(tmp_path / "b.png", (28, 28), 1)


def test_pad_and_center_crop(tmp_path):
    wide = np.zeros((20, 40), np.uint8)
    wide[:, :20] = 200  # left half bright
    Image.fromarray(wide).save(tmp_path / "wide.png")
    pad = read_image(tmp_path / "wide.png", (20, 20), 1, "pad")[0].numpy()
    assert pad.shape == (20, 20) and (pad[:5] == 0).all() and (pad[15:] == 0).all()
    assert pad[10, 2] == 200 and pad[10, 17] == 0  # whole width kept, aspect kept
    crop = read_image(tmp_path / "wide.png", (20, 20), 1, "center-crop")[0].numpy()
    assert (crop[:, :9] == 200).all() and (crop[:, 11:] == 0).all()  # the middle 20 columns
    with pytest.raises(VitMqaError, match="unknown resize"):
        load_data(DataConfig(dataset=str(tmp_path), resize="squash"))


def test_old_configs_keep_stretch():
    old = {"image_size": [28, 28], "in_channels": 1, "mean": [0.1], "std": [0.3]}
    assert Preprocess.from_dict(old).procedure == "stretch"
    new = Preprocess((28, 28), 1, (0.1,), (0.3,), procedure="mnist")
    assert Preprocess.from_dict(new.to_dict()).procedure == "mnist"


# ---------------------------------------------------------------- through a trained run


def test_run_records_the_mnist_procedure_and_predictor_takes_any_input(trained_run, digits,
                                                                       tmp_path):
    from vit_mqa.evaluation.predict import Predictor

    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"]["preprocess"]["procedure"] == "mnist"
    predictor = Predictor(trained_run)
    images, _ = digits
    Image.fromarray(255 - images[0]).save(tmp_path / "a.png")
    inputs = [tmp_path / "a.png", Image.fromarray(255 - images[0]), 255 - images[0],
              torch.from_numpy(255 - images[0]).unsqueeze(0)]
    prepared = [predictor.prepare(x) for x in inputs]
    for t in prepared:
        assert t.dtype == torch.uint8 and t.shape == (1, 28, 28)
        assert torch.equal(t, prepared[0])
    results = predictor.predict(inputs, top_k=3)
    assert results[0]["path"] == str(tmp_path / "a.png") and results[1]["input"] == 1
    assert len({r["top"][0]["class"] for r in results}) == 1
    # raw=True is the old stretch: a black-on-white digit stays black on white.
    assert predictor.prepare(inputs[0], raw=True)[0, 0, 0] == 255
    with pytest.raises(VitMqaError, match="the image is blank"):
        predictor.prepare(np.full((50, 50), 255, np.uint8))
    recorded = predictor.predict([np.full((50, 50), 255, np.uint8), images[1]],
                                 errors="record")
    assert "no ink found" in recorded[0]["error"] and "top" in recorded[1]


def test_evaluate_folder_applies_the_procedure(trained_run, digits, tmp_path):
    from vit_mqa.evaluation.predict import Predictor

    images, labels = digits
    for i in range(8):  # black on white, larger than 28 px: how people save digits
        (tmp_path / "set" / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - images[i]).resize((70, 70)).save(
            tmp_path / "set" / str(labels[i]) / f"{i}.png")
    Image.new("L", (40, 40), 255).save(tmp_path / "set" / str(labels[0]) / "blank.png")
    predictor = Predictor(trained_run)
    after = predictor.evaluate_folder(tmp_path / "set")
    before = predictor.evaluate_folder(tmp_path / "set", raw=True)
    assert after["num_images"] == before["num_images"] == 9
    assert len(after["failed"]) == 1 and "blank.png" in after["failed"][0]
    assert after["accuracy"] >= 6 / 9 and before["accuracy"] < after["accuracy"]


def test_predict_folder_with_bad_files_through_the_cli(trained_run, digits, tmp_path):
    images, _ = digits
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(255 - images[i]).resize((90, 90)).save(folder / f"{i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("L", (64, 64), 255).save(folder / "white.png")
    os.mkfifo(folder / "b.png")
    result = run_cli("predict", str(trained_run), str(folder), timeout=120)
    assert result.returncode == 1
    out = result.stdout.strip().splitlines()
    assert sorted(Path(line.split(":")[0]).name for line in out) == ["0.png", "1.png", "2.png"]
    err = result.stderr.strip().splitlines()
    assert len(err) == 3, result.stderr
    assert all(line.startswith("vit-mqa: error: ") for line in err)
    assert any("cannot read image" in line and "corrupt.png" in line for line in err)
    assert any("b.png: not a regular file" in line for line in err)
    assert any("no ink found in" in line and "white.png" in line for line in err)
    assert "Traceback" not in result.stderr
    # --raw is the old behaviour; --json has a row per image (failed ones with "error").
    good = run_cli("predict", str(trained_run), str(folder / "0.png"), "--raw", "--json")
    assert good.returncode == 0 and json.loads(good.stdout)[0]["path"].endswith("0.png")


def test_fifo_and_bomb_through_the_cli(trained_run, tmp_path):
    os.mkfifo(tmp_path / "b.png")
    result = run_cli("predict", str(trained_run), str(tmp_path / "b.png"), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"vit-mqa: error: cannot read image {tmp_path / 'b.png'}"
                                     ": not a regular file")
    _bomb_png(tmp_path / "bomb.png")
    result = run_cli("predict", str(trained_run), str(tmp_path / "bomb.png"), timeout=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "too large to decode safely" in result.stderr


def test_image_folder_run_records_its_resize(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=16, size=(16, 24), mode="RGB")
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", str(root), "--val-size", "4", "--image-size", "16",
                     "--resize", "center-crop", "--patch-size", "8", "--dim", "16",
                     "--depth", "1", "--num-heads", "2", "--batch-size", "8", "--epochs", "1",
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    pre = json.loads((out / "config.json").read_text())["model"]["preprocess"]
    assert pre["procedure"] == "center-crop" and pre["resize"] == "center-crop"
    predicted = run_cli("predict", str(out), str(root / "left" / "0.png"), "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["top"][0]["class"] in ("left", "right")


def test_predict_flags_offer_every_procedure():
    from vit_mqa.apps.cli import build_parser
    from vit_mqa.data.preprocess import PROCEDURES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    procedure = next(a for a in sub.choices["predict"]._actions if a.dest == "procedure")
    assert tuple(procedure.choices) == PROCEDURES
    args = build_parser().parse_args(["train", "--resize", "pad"])
    assert args.resize == "pad"
