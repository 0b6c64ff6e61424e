"""``vit-mqa report``: figures and index.html for a real training run."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli, write_image_folder
from vit_mqa.apps import cli
from vit_mqa.apps.report import confident_mistakes, sample_indices, write_report
from vit_mqa.config.recipe import build_config
from vit_mqa.training.loop import train

pytest.importorskip("matplotlib")

FIGURES = {"curves.png", "confusion.png", "per_class.png", "reliability.png", "coverage.png",
           "mistakes.png", "attention_rollout.png", "attention_layers.png"}


def check_report(report_dir, expected=FIGURES):
    pngs = {p.name for p in report_dir.glob("*.png")}
    assert pngs == expected
    for name in pngs:
        with Image.open(report_dir / name) as im:
            assert im.format == "PNG"
            width, height = im.size
            assert 300 <= width <= 3000 and 200 <= height <= 3000, (name, im.size)
            pixels = np.asarray(im.convert("L"), dtype=float)
            assert pixels.std() > 5, f"{name} is blank"
        with Image.open(report_dir / name) as im:
            im.verify()  # checksums of every chunk
    page = (report_dir / "index.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == expected
    assert not [p for p in report_dir.iterdir() if p.name.startswith(".")]  # no temp files
    return page


def test_report_of_a_trained_run(trained_run, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("report"))
    result = run_cli("report", str(run), "--data-dir", str(data_root), "--device", "cpu",
                     "--samples", "4", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote 8 figures" in result.stdout
    page = check_report(run / "report")
    results = json.loads((run / "results.json").read_text())
    # The same test accuracy as the run's own final evaluation.
    assert f"{100 * results['test_accuracy']:.2f}% on 10000 images" in page
    assert "CLS token" in page


@pytest.mark.parametrize("stem, pooling, phrase", [
    ("patch", "mean", "mean-pooled output"),
    ("cct", "seq", "sequence-pooled output"),
])
def test_report_of_a_pooled_rgb_run(tmp_path, stem, pooling, phrase):
    # A real (tiny) run on RGB images with mean or sequence pooling: the attention figures
    # follow the pooling and the colour images are shown in colour.
    root = write_image_folder(tmp_path / "imgs", per_class=24, size=(16, 16), mode="RGB")
    config = build_config(overrides={"dataset": str(root), "val_size": 8, "patch_size": 4,
                                     "dim": 16, "depth": 2, "batch_size": 8, "epochs": 2,
                                     "pooling": pooling, "stem": stem})
    run = tmp_path / "run"
    train(config, run, quiet=True)
    paths = write_report(run, samples=3, mistakes=5, progress=False)
    assert paths[-1] == run / "report" / "index.html" and len(paths) == 9
    page = check_report(run / "report")
    assert phrase in page and "CLS token" not in page and f"{stem} stem" in page
    with Image.open(run / "report" / "attention_rollout.png") as im:
        rgb = np.asarray(im.convert("RGB"), dtype=float)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 50  # colour, not greyscale


def test_sample_choice_is_seeded_and_spans_classes():
    labels = torch.arange(10).repeat(30)
    a = sample_indices(labels, 10, seed=0)
    assert a == sample_indices(labels, 10, seed=0) != sample_indices(labels, 10, seed=1)
    assert sorted(int(labels[i]) for i in a) == list(range(10))
    more = sample_indices(labels, 14, seed=0)
    assert len(set(more)) == 14 and set(a) <= set(more)
    assert len(sample_indices(labels[:3], 10)) == 3


def test_reliability_figure_shows_both_calibrations():
    from matplotlib.figure import Figure

    from vit_mqa.apps.report import plot_reliability

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=g) * 4
    labels = torch.multinomial((logits / 2).softmax(dim=1), 1, generator=g).squeeze(1)
    fig = plot_reliability(Figure, logits, labels, 2.0)
    top, bottom = fig.axes
    texts = [t.get_text() for t in top.get_legend().get_texts()]
    assert texts[0].startswith("as trained: ECE") and texts[1].startswith("temperature 2.00")
    ece = [float(t.split("ECE ")[1].rstrip(" %")) for t in texts]
    assert ece[1] < ece[0]  # dividing by the true temperature calibrates
    assert sum(bottom.lines[0].get_ydata()) >= 2000 - 10


def test_confident_mistakes_order():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.05, 0.95]])
    labels = torch.tensor([0, 0, 0, 1, 1])  # wrong: 1 (0.8), 2 (0.7), 3 (0.6)
    assert confident_mistakes(probs, labels, 2).tolist() == [1, 2]
    assert confident_mistakes(probs, labels, 10).tolist() == [1, 2, 3]


def test_report_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a vit-mqa run directory" in err
    assert cli.main(["report", str(tmp_path), "--samples", "0"]) == 1
    assert "samples" in capsys.readouterr().err
    # None in sys.modules makes the import fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "vit-mqa: error: report needs matplotlib: pip install 'vit-mqa[report]'\n"
