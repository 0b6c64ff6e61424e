"""The benchmark scripts run end to end on real data (tiny settings)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from vit_mqa.config.recipe import build_config
from vit_mqa.config.sections import ViTConfig


def run_tta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"),
                           *args], capture_output=True, text=True, timeout=600)


def test_time_to_accuracy_records_every_epoch_and_summarizes_seeds(data_root, tmp_path):
    # Each seed in its own run, then merged, as the README's long presets were.
    tiny = ["--preset", "mnist-fast", "--data-dir", str(data_root), "--set", "epochs=2",
            "--set", "dim=32", "--set", "depth=1", "--set", "warmup_epochs=0.01", "--quiet"]
    for seed in (0, 1):
        result = run_tta(*tiny, "--seeds", str(seed), "--out", str(tmp_path / f"s{seed}"))
        assert result.returncode == 0, result.stderr
        assert "1 seeds" in result.stdout
    out = tmp_path / "tta"
    result = run_tta("--combine", str(tmp_path / "s1"), str(tmp_path / "s0" /
                     "time_to_accuracy.json"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "time_to_accuracy.json").read_text())
    singles = [json.loads((tmp_path / f"s{s}" / "time_to_accuracy.json").read_text())
               for s in (0, 1)]
    assert report["runs"] == [singles[0]["runs"][0], singles[1]["runs"][0]]
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    for run in report["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert 0.0 <= e["test_accuracy"] <= 1.0 and e["elapsed_s"] > 0
            assert e["images_per_s"] > 0
        assert run["config"]["train"]["seed"] == run["seed"]
        # The record names the machine its times come from.
        assert run["machine"]["cpu"] and run["machine"]["threads"] >= 1
        assert run["machine"]["torch"] == torch.__version__
        # Two epochs of a 1-block model do not reach 99 %: reported as not reached.
        assert run["reached"]["99"] is None
    # Different seeds train differently; the summary holds their mean and spread.
    accs = [r["final_test_accuracy"] for r in report["runs"]]
    assert accs[0] != accs[1]
    assert abs(report["summary"]["test_accuracy"][0] - sum(accs) / 2) < 1e-9
    assert report["summary"]["seeds"] == [0, 1]
    assert "2 seeds" in result.stdout and "not reached" in result.stdout

    # Merging refuses a repeated seed and a run trained with other settings.
    result = run_tta("--combine", str(tmp_path / "s0"), str(out), "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and not (tmp_path / "x").exists()
    assert result.stderr.strip() == ("time_to_accuracy: error: a seed appears in more than "
                                     "one report: [0, 0, 1]")
    singles[1]["runs"][0]["config"]["model"]["depth"] = 2
    (tmp_path / "other.json").write_text(json.dumps(singles[1]))
    result = run_tta("--combine", str(tmp_path / "s0"), str(tmp_path / "other.json"),
                     "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and not (tmp_path / "x").exists()
    assert result.stderr.strip() == (f"time_to_accuracy: error: seed 1 in {tmp_path / 'other.json'}"
                                     " was trained with other settings")
    (tmp_path / "bad.json").write_text("{}")
    result = run_tta("--combine", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x"))
    assert result.stderr.strip() == (f"time_to_accuracy: error: {tmp_path / 'bad.json'} is not "
                                     "a time_to_accuracy report")
    assert result.returncode != 0 and not (tmp_path / "x").exists()


def test_time_to_accuracy_bad_setting_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--seeds", "0",
         "--out", str(tmp_path / "x"), "--set", "depht=3"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == "time_to_accuracy: error: unknown setting 'depht'"
    assert not (tmp_path / "x").exists()


def test_fit_and_tta_scores_every_split_of_a_run(data_root, tmp_path):
    tiny = ["--preset", "mnist-fast", "--data-dir", str(data_root), "--set", "epochs=1",
            "--set", "dim=32", "--set", "depth=1", "--set", "val_size=500", "--quiet",
            "--seeds", "0", "--out", str(tmp_path / "t")]
    assert run_tta(*tiny).returncode == 0
    run = tmp_path / "t" / "seed0"
    script = str(REPO / "benchmarks" / "fit_and_tta.py")
    out = tmp_path / "fit.json"
    result = subprocess.run([sys.executable, script, str(run), "--tta", "shift",
                             "--json-out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    results = json.loads((run / "results.json").read_text())
    # The same weights and data as the run's own final test: the same accuracy.
    assert abs(report["test"] - results["test_accuracy"]) < 1e-6
    for key in ("train", "val", "test", "val_tta_shift", "test_tta_shift"):
        assert 0.5 < report[key] <= 1.0
    bad = subprocess.run([sys.executable, script, str(run), "--tta", "rotate"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown test-time augmentation 'rotate'" in bad.stderr
    missing = subprocess.run([sys.executable, script, str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert missing.stderr.startswith("fit_and_tta: error:")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_ensemble_check_scores_runs_and_their_average(data_root, tmp_path):
    tiny = ["--preset", "mnist-fast", "--data-dir", str(data_root), "--set", "epochs=1",
            "--set", "dim=32", "--set", "depth=1", "--set", "val_size=500", "--quiet",
            "--seeds", "0", "1", "--out", str(tmp_path / "t")]
    assert run_tta(*tiny).returncode == 0
    runs = [str(tmp_path / "t" / "seed0"), str(tmp_path / "t" / "seed1") + ":last.safetensors"]
    script = str(REPO / "benchmarks" / "ensemble_check.py")
    out = tmp_path / "ensemble.json"
    result = subprocess.run([sys.executable, script, *runs, "--json-out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    # The selected weights score what the run's own final test scored.
    own = json.loads((tmp_path / "t" / "seed0" / "results.json").read_text())
    assert abs(report["runs"][runs[0]] - own["test_accuracy"]) < 1e-6
    # Each run's errors are counted once per run that makes them.
    errors = sum(round((1 - acc) * 10000) for acc in report["runs"].values())
    missed = report["missed_by_k_runs"]
    assert int(missed["1"]) + 2 * int(missed["2"]) == errors
    pair = report["ensembles"]["2"]
    assert pair["subsets"] == 1 and pair["best_subset"] == runs
    # The average is right wherever both runs are, and wrong wherever both are wrong.
    assert 1 - (missed["1"] + missed["2"]) / 10000 - 1e-6 <= pair["max"]
    assert pair["max"] <= 1 - missed["2"] / 10000 + 1e-6
    one = subprocess.run([sys.executable, script, runs[0]], capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 2 and "give 2 to 12 runs, not 1" in one.stderr
    missing = subprocess.run([sys.executable, script, runs[0], str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and missing.stderr.startswith("ensemble_check: error:")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_step_speed_times_each_mode_of_a_preset_model(tmp_path):
    script = str(REPO / "benchmarks" / "step_speed.py")
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, script, "--preset", "mnist-3min", "--set", "dim=32", "--set",
         "depth=1", "--set", "batch_size=8", "--modes", "eager,bf16", "--warmup-steps", "1",
         "--steps", "2", "--rounds", "2", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["modes"]) == ["eager", "bf16"] and report["batch_size"] == 8
    # The preset's own model (CCT's tokenizer), with the overrides applied.
    assert report["parameters"] == ViTConfig.from_dict(
        {**build_config("mnist-3min", overrides={"dim": 32, "depth": 1})["model"],
         "image_size": 28, "in_channels": 1}).num_parameters()
    for mode in report["modes"].values():
        assert len(mode["rounds_s"]) == 2 and all(t > 0 for t in mode["rounds_s"])
        assert mode["images_per_s"] == pytest.approx(8 * 2 / statistics.median(mode["rounds_s"]))
    modes = report["modes"]
    assert modes["bf16"]["vs_eager"] == pytest.approx(
        modes["bf16"]["images_per_s"] / modes["eager"]["images_per_s"])
    assert report["machine"]["torch"] == torch.__version__
    assert "| bf16 |" in result.stdout
    for args, message in ((["--modes", "eager,fp8"], "unknown mode 'fp8'"),
                          (["--set", "depht=2"], "unknown setting 'depht'"),
                          (["--rounds", "0"], "--rounds must be >= 1"),
                          (["--set", "dataset=photos"], "give its image size with --set "
                                                         "image_size=N")):
        result = subprocess.run([sys.executable, script, *args], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.startswith("step_speed: error: ")
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
