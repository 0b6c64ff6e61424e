"""Pictures of none of the classes: how they are made, how a run trains on them (outlier
exposure), the thresholds fitted after training, and the third answer of predict."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, run_cli, write_image_folder
from PIL import Image

from vit_mqa.data.outliers import (
    OUTLIER_CHARS,
    _like_a_one,
    generated_outliers,
    letters_asset_path,
    load_letters,
    render_letters,
)
from vit_mqa.data.printed import TRAINING_FAMILIES, font_files
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.calibration import declining, fit_thresholds
from vit_mqa.evaluation.predict import decide, energy, none_of_these
from vit_mqa.training.steps import outlier_loss


def test_generated_outliers_are_seeded_varied_and_never_a_lone_stroke(mnist_test_arrays):
    digits = mnist_test_arrays[0][:500]
    a = generated_outliers(200, 3, digits)
    assert a.shape == (200, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, generated_outliers(200, 3, digits))
    assert not np.array_equal(a, generated_outliers(200, 4, digits))
    assert (a.reshape(200, -1).max(1) > 128).all()  # every picture has ink
    assert len({x.tobytes() for x in a}) > 190  # hardly any repeats
    # The drawn kinds (every 4th from the 2nd on is a scribble or shapes, the 3rd texture)
    # never leave a tall thin mark, which a digit model must read as a 1.
    drawn = [x for i, x in enumerate(a) if i % 4 in (1, 2)]
    assert not any(_like_a_one(x.astype(np.float32) / 255) for x in drawn)
    # The letters quarter comes from the shipped renders.
    letters = {x.tobytes() for x in load_letters()}
    assert all(a[i].tobytes() in letters for i in range(0, 200, 4))
    assert not any(a[i].tobytes() in letters for i in range(1, 200, 4))


def test_the_shipped_letters_are_the_training_fonts_renders():
    shipped = np.load(letters_asset_path())
    assert set(shipped["chars"].tolist()) == set(OUTLIER_CHARS)
    assert not set(shipped["chars"].tolist()) & set("0OoIl1ZzSsBbGgq")
    fonts = font_files(TRAINING_FAMILIES)
    if not fonts:
        pytest.skip("no DejaVu or Liberation font installed to render them again")
    fresh = render_letters(fonts[:2])
    for i, (char, font) in enumerate(zip(fresh["chars"], fresh["fonts"])):
        match = np.flatnonzero((shipped["chars"] == char) & (shipped["fonts"] == font))
        if match.size:  # this machine's copy of the font may differ from the shipping one
            assert np.abs(shipped["images"][match[0]].astype(int)
                          - fresh["images"][i].astype(int)).max() <= 2


def test_outlier_loss_is_least_for_a_uniform_prediction():
    uniform = torch.zeros(4, 10)
    peaked = torch.zeros(4, 10)
    peaked[:, 3] = 8.0
    assert outlier_loss(uniform).item() == pytest.approx(np.log(10))
    assert outlier_loss(peaked).item() > outlier_loss(uniform).item() + 2
    logits = torch.randn(6, 10, requires_grad=True)
    outlier_loss(logits).backward()  # pushes every row toward uniform: gradients sum to 0
    assert torch.allclose(logits.grad.sum(dim=1), torch.zeros(6), atol=1e-6)


def test_decisions_from_logits_and_their_counts():
    logits = torch.tensor([[9.0, 0.0, 0.0], [1.0, 0.9, 0.0], [-4.0, -4.0, -4.0]])
    e = energy(logits)
    assert e[0] < e[1] < e[2]
    decisions, _ = decide(logits, 1.0, 0.5, unknown_energy=float(e[2]) - 0.1)
    assert decisions == ["answer", "unsure", "unknown"]
    assert decide(logits, 1.0, 0.5, None)[0] == ["answer", "unsure", "unsure"]
    labels = torch.tensor([0, 1, 2])  # the second is wrong, and unsure
    d = declining(logits, labels, 1.0, {"unsure_below": 0.5,
                                        "unknown_energy": float(e[2]) - 0.1})
    assert (d["unknown"], d["unsure"], d["answered_accuracy"]) == (1, 1, 1.0)
    assert d["coverage"][0] == [1 / 3, 1.0] and d["coverage"][-1][0] == 1.0
    assert none_of_these([str(i) for i in range(10)]) == "not a digit"
    assert none_of_these(["cat", "dog"]) == "none of these"


def test_thresholds_decline_the_asked_share_of_validation_images():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (2000,))
    logits = torch.randn(2000, 10) + 6 * torch.nn.functional.one_hot(labels, 10)
    outliers = torch.randn(300, 10)  # no class stands out
    t = fit_thresholds(logits, labels, 1.0, 0.01, 0.02, outliers)
    e, top = energy(logits), logits.softmax(1).max(1).values
    assert (e > t["unknown_energy"]).double().mean() == pytest.approx(0.01, abs=0.002)
    assert (top < t["unsure_below"]).double().mean() == pytest.approx(0.02, abs=0.002)
    assert t["outliers_declined"] > 0.5 and t["outliers_checked"] == 300
    assert "unknown_energy" not in fit_thresholds(logits, labels, 1.0, 0.01, 0.02, None)


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory):
    """A tiny folder run that trains with a folder of outliers: noise pictures."""
    root = tmp_path_factory.mktemp("oe")
    data = write_image_folder(root / "bars", per_class=24, size=(16, 16))
    rng = np.random.default_rng(1)
    (root / "noise").mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(
            root / "noise" / f"{i}.png")
    out = root / "run"
    result = run_cli("train", "--dataset", str(data), "--outliers", str(root / "noise"),
                     "--out", str(out), "--epochs", "3", *TINY_TRAIN)
    assert result.returncode == 0, result.stderr
    return out, root


def test_a_run_with_outliers_fits_and_records_its_thresholds(outlier_run):
    out, root = outlier_run
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["outliers"] == str(root / "noise")
    thresholds = config["calibration"]["thresholds"]
    assert {"unknown_energy", "unsure_below", "outliers_declined"} <= set(thresholds)
    assert thresholds["outliers_checked"] == 3  # a tenth of the 30, held back
    result = run_cli("predict", str(out), str(root / "noise" / "0.png"),
                     str(root / "bars" / "left" / "0.png"), "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(r["decision"] in ("answer", "unsure", "unknown") for r in rows)
    assert all(isinstance(r["energy"], float) and "top" in r and "unsure" in r for r in rows)
    text = run_cli("predict", str(out), str(root / "noise" / "0.png"))
    row = rows[0]
    if row["decision"] == "unknown":
        assert "none of these (closest: " in text.stdout
    evaluated = run_cli("eval", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    declined = json.loads(evaluated.stdout)["declined"]
    assert declined["images"] > 0 and 0 <= declined["unknown"] <= declined["images"]


def test_an_outlier_source_that_is_neither_is_one_line(tmp_path, tiny_folder):
    result = run_cli("train", "--dataset", str(tiny_folder), "--outliers", str(tmp_path / "x"),
                     "--out", str(tmp_path / "run"), "--epochs", "1", *TINY_TRAIN)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"vit-mqa: error: --outliers: {str(tmp_path / 'x')!r} is neither \"generated\" "
        "nor a folder"]
    with pytest.raises(VitMqaError, match="empty source"):
        from vit_mqa.config.sections import DataConfig
        DataConfig(outliers="generated,")


def test_calibrate_refits_the_same_thresholds_and_takes_other_shares(outlier_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(outlier_run[0], run)
    before = json.loads((run / "config.json").read_text())["calibration"]
    result = run_cli("calibrate", str(run))
    assert result.returncode == 0, result.stderr
    again = json.loads((run / "config.json").read_text())["calibration"]
    assert again["thresholds"] == before["thresholds"]  # the same fit as at training's end
    result = run_cli("calibrate", str(run), "--decline-unsure", "0.2")
    assert result.returncode == 0 and "unsure under" in result.stdout, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["decline_unsure"] == 0.2
    assert config["calibration"]["thresholds"]["unsure_below"] > before["thresholds"][
        "unsure_below"]
    bad = run_cli("calibrate", str(run), "--decline-unsure", "0.7")
    assert bad.returncode == 1 and "decline_unsure" in bad.stderr.replace("-", "_")
