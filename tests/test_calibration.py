"""Temperature scaling and reliability: fitted on validation images, used by predict."""

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli, run_cli_cases

from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.calibration import calibration_record, fit_temperature, reliability
from vit_mqa.evaluation.predict import DEFAULT_MIN_CONFIDENCE, Predictor
from vit_mqa.models.hub import run_temperature


def _calibrated_sample(n=20000, classes=10, seed=0):
    """Logits whose softmax is the true probability of each label (labels drawn from it)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 3
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [0.4, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_was_applied(scale):
    logits, labels = _calibrated_sample()
    assert fit_temperature(logits * scale, labels) == pytest.approx(scale, rel=0.05)


def test_reliability_tells_calibrated_from_overconfident():
    logits, labels = _calibrated_sample()
    good = reliability(logits.softmax(dim=1), labels)
    bad = reliability((logits * 3).softmax(dim=1), labels)
    assert good["ece"] < 0.02 < 0.1 < bad["ece"]
    assert sum(b["count"] for b in good["bins"]) == len(labels) and len(good["bins"]) == 10
    assert bad["mean_confidence"] > bad["accuracy"]


def test_record_lowers_the_nll_and_the_calibration_error():
    logits, labels = _calibrated_sample()
    record = calibration_record(logits * 2, labels, "a test")
    assert record["temperature"] == pytest.approx(2, rel=0.05)
    assert record["nll_after"] < record["nll_before"]
    assert record["ece_after"] < record["ece_before"]
    assert record["images"] == len(labels) and record["fitted_on"] == "a test"


@pytest.mark.parametrize("entry", [{"temperature": 0}, {"temperature": -1},
                                   {"temperature": float("nan")}, {"temperature": "1"},
                                   {"temperature": True}, {"temperature": 1e9}, [], "x"])
def test_a_bad_stored_temperature_is_one_clear_error(entry):
    with pytest.raises(VitMqaError, match="calibration.temperature"):
        run_temperature({"calibration": entry}, "config.json")


def test_runs_without_a_temperature_keep_their_probabilities():
    assert run_temperature({}, "config.json") == 1.0


def test_training_fits_a_temperature_on_validation_images(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    results = json.loads((trained_run / "results.json").read_text())
    entry = config["calibration"]
    assert entry == results["calibration"]
    assert 0.01 <= entry["temperature"] <= 100 and entry["images"] >= 5000
    assert entry["nll_after"] <= entry["nll_before"] + 1e-9
    assert "validation" in entry["fitted_on"]


def test_predictor_divides_logits_by_the_temperature(trained_run, mnist_test_arrays):
    images, _ = mnist_test_arrays
    batch = torch.from_numpy(images[:16].copy()).unsqueeze(1)
    p = Predictor(trained_run)
    t = json.loads((trained_run / "config.json").read_text())["calibration"]["temperature"]
    assert p.temperature == pytest.approx(t)
    with torch.no_grad():
        logits = p.model(p.preprocess(batch))
    assert torch.allclose(p.probabilities(batch), (logits / t).softmax(dim=1), atol=1e-5)


def test_predict_flags_low_confidence_as_unsure(trained_run, mnist_test_arrays):
    images, _ = mnist_test_arrays
    digits = [images[i] for i in range(8)]
    sure = Predictor(trained_run, min_confidence=0.0).predict(digits)
    assert not any(r["unsure"] for r in sure)
    unsure = Predictor(trained_run, min_confidence=1.0).predict(digits)
    assert all(r["unsure"] for r in unsure)
    default = Predictor(trained_run).predict(digits)
    assert all(r["unsure"] == (r["top"][0]["probability"] < DEFAULT_MIN_CONFIDENCE)
               for r in default)
    # A featureless smudge is not a digit: whatever is read, it is not read with confidence.
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = (255 * torch.exp(-((yy - 14) ** 2 + (xx - 14) ** 2) / 60)).to(torch.uint8).numpy()
    top = Predictor(trained_run).predict([blob])[0]["top"][0]["probability"]
    assert top < max(r["top"][0]["probability"] for r in default)


def test_cli_predict_marks_unsure_and_checks_the_threshold(trained_run, mnist_test_arrays,
                                                           tmp_path):
    from PIL import Image

    images, _ = mnist_test_arrays
    path = tmp_path / "digit.png"
    Image.fromarray(images[0]).save(path)
    result = run_cli("predict", str(trained_run), str(path), "--min-confidence", "1.0")
    assert result.returncode == 0, result.stderr
    assert "(unsure)" in result.stdout
    result = run_cli("predict", str(trained_run), str(path), "--min-confidence", "0",
                     "--json")
    assert result.returncode == 0 and json.loads(result.stdout)[0]["unsure"] is False
    cases = [["predict", str(trained_run), str(path), "--min-confidence", bad]
             for bad in ("1.5", "nan", "-0.1")]
    for outcome in run_cli_cases(cases, tmp_path):
        assert_one_line_error(outcome, "min_confidence")
