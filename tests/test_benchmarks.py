"""The benchmark scripts run end to end on real data (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_time_to_accuracy_records_every_epoch_and_summarizes_seeds(data_root, tmp_path):
    out = tmp_path / "tta"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--preset",
         "mnist-fast", "--seeds", "0", "1", "--data-dir", str(data_root), "--out", str(out),
         "--set", "epochs=2", "--set", "dim=32", "--set", "depth=1",
         "--set", "warmup_epochs=0.01", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "time_to_accuracy.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    for run in report["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert 0.0 <= e["test_accuracy"] <= 1.0 and e["elapsed_s"] > 0
            assert e["images_per_s"] > 0
        assert run["config"]["train"]["seed"] == run["seed"]
        # Two epochs of a 1-block model do not reach 99 %: reported as not reached.
        assert run["reached"]["99"] is None
    # Different seeds train differently; the summary holds their mean and spread.
    accs = [r["final_test_accuracy"] for r in report["runs"]]
    assert accs[0] != accs[1]
    assert abs(report["summary"]["test_accuracy"][0] - sum(accs) / 2) < 1e-9
    assert "2 seeds" in result.stdout and "not reached" in result.stdout


def test_time_to_accuracy_bad_setting_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--seeds", "0",
         "--out", str(tmp_path / "x"), "--set", "depht=3"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == "time_to_accuracy: error: unknown setting 'depht'"
    assert not (tmp_path / "x").exists()
