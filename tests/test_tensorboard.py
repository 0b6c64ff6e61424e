"""``train --tensorboard``: scalars written to RUN/tensorboard and read back."""

from __future__ import annotations

import json
import sys

import pytest

from vit_mqa.apps import cli
from vit_mqa.config.recipe import build_config
from vit_mqa.data.datasets import DataConfig, Split, load_data
from vit_mqa.training.loop import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

TINY = {"dim": 32, "depth": 2, "num_heads": 4, "num_kv_heads": 1, "batch_size": 50,
        "val_size": 200, "eval_batch_size": 500, "warmup_epochs": 0.5, "tensorboard": True}
EPOCH_TAGS = {"loss/train": "train_loss", "loss/val": "val_loss",
              "accuracy/train": "train_accuracy", "accuracy/val": "val_accuracy", "lr": "lr"}


@pytest.fixture(scope="module")
def small_mnist(data_root):
    data = load_data(DataConfig(dataset="mnist", data_dir=str(data_root), val_size=200))
    data.train = Split(data.train.images[:500], data.train.labels[:500])  # 10 steps/epoch
    data.test = Split(data.test.images[:200], data.test.labels[:200])
    return data


def read_scalars(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_match_the_metrics(small_mnist, tmp_path):
    run = tmp_path / "run"
    train(build_config(overrides={**TINY, "epochs": 2}), run, data=small_mnist, quiet=True)
    scalars = read_scalars(run)
    assert set(scalars) == {*EPOCH_TAGS, "loss/train_step"}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for tag, key in EPOCH_TAGS.items():
        assert [s for s, _ in scalars[tag]] == [10, 20], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in records],
                                                             rel=1e-6), tag
    steps = scalars["loss/train_step"]
    assert [s for s, _ in steps] == list(range(1, 21))
    # Equal batches: the epoch's loss is the mean of its steps' losses.
    for epoch, record in enumerate(records):
        values = [v for _, v in steps[10 * epoch:10 * (epoch + 1)]]
        assert sum(values) / 10 == pytest.approx(record["train_loss"], rel=1e-5)
    assert steps[-1][1] < steps[0][1]  # it learned something


def test_tensorboard_continues_on_resume(small_mnist, tmp_path):
    run = tmp_path / "run"
    train(build_config(overrides={**TINY, "epochs": 2, "max_steps": 10}), run,
          data=small_mnist, quiet=True)
    assert [s for s, _ in read_scalars(run)["loss/val"]] == [10]
    train({"train": {"max_steps": 0}}, run, resume=True, data=small_mnist, quiet=True)
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["loss/val"]] == [10, 20]
    assert [s for s, _ in scalars["loss/train_step"]] == list(range(1, 21))


def test_missing_tensorboard_is_one_line(data_root, tmp_path, monkeypatch, capsys):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tmp_path / "run"
    code = cli.main(["train", "--data-dir", str(data_root), "--out", str(run), "--epochs", "1",
                     "--dim", "32", "--depth", "1", "--tensorboard", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("vit-mqa: error: --tensorboard needs")
    assert "pip install 'vit-mqa[tensorboard]'" in err
    assert not run.exists()  # failed before writing anything
