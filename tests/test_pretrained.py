"""The models built into the package: checked against their cards, and usable by name
wherever a run directory is accepted, offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_one_line_error, run_cli, run_cli_cases, write_image_folder
from vit_mqa import VisionTransformer, create_model
from vit_mqa.checkpoint import file_sha256
from vit_mqa.data.datasets import DATASETS, load_idx_dataset
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.predict import Predictor
from vit_mqa.models.builtin import BUILTIN_MODELS, builtin_dir, model_card

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "pretrained.md"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DATASET = {"vit-mqa/mnist": "mnist", "vit-mqa/fashion-mnist": "fashion-mnist"}
# The least accuracy on the first 1,000 test images that the card's full-test figure allows.
SAMPLE_BAR = {"vit-mqa/mnist": 0.99, "vit-mqa/fashion-mnist": 0.92}


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_shipped_weights_match_their_card_and_the_docs(name):
    card = model_card(name)
    weights = builtin_dir(name) / "model.safetensors"
    assert file_sha256(weights) == card["sha256"]
    assert weights.stat().st_size == card["size_bytes"] < 4_000_000
    docs = DOCS.read_text()
    assert card["sha256"] in docs, f"docs/pretrained.md does not give {name}'s SHA-256"
    section = docs.split(f"`{name}`", 1)[1]
    test = card["figures"][0]
    assert f"{100 * test['accuracy']:.2f} %" in section.split("\n## ", 1)[0]
    config = json.loads((builtin_dir(name) / "config.json").read_text())
    assert config["preset"] == card["preset"] == BUILTIN_MODELS[name]
    assert config["data"]["data_dir"] is None and "calibration" in config


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_shipped_model_reads_real_test_images(name, data_root):
    arrays, _ = load_idx_dataset(DATASETS[DATASET[name]], str(data_root), download=False)
    images, labels = arrays["test-images"][:1000], arrays["test-labels"][:1000]
    predictor = Predictor(name)
    # Through the model's own preprocessing, as `vit-mqa predict` reads a saved image.
    results = predictor.predict(list(images), top_k=1)
    predicted = [r["top"][0]["index"] for r in results]
    accuracy = float(np.mean(np.asarray(predicted) == labels))
    assert accuracy >= SAMPLE_BAR[name], f"{name}: {accuracy:.3f} on 1,000 test images"


def test_predict_by_name_offline_from_any_folder(tmp_path, mnist_test_arrays):
    images, labels = mnist_test_arrays
    for i in range(5):
        Image.fromarray(images[i]).save(tmp_path / f"{i}_{labels[i]}.png")
    result = run_cli("predict", "vit-mqa/mnist", str(tmp_path), "--json", "--top-k", "1",
                     env=OFFLINE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    read = json.loads(result.stdout)
    assert [r["top"][0]["class"] for r in read] == [Path(r["path"]).stem.split("_")[1]
                                                    for r in read]


def test_a_local_folder_of_the_same_name_wins(tmp_path, tiny_run):
    local = tmp_path / "vit-mqa" / "mnist"
    shutil.copytree(tiny_run, local)
    Image.new("L", (20, 24), 128).save(tmp_path / "x.png")
    result = run_cli("predict", "vit-mqa/mnist", "x.png", "--json", env=OFFLINE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tiny_classes = json.loads((tiny_run / "config.json").read_text())["model"]["classes"]
    assert json.loads(result.stdout)[0]["top"][0]["class"] in tiny_classes
    assert tiny_classes != [str(d) for d in range(10)]


def test_unknown_built_in_name_lists_the_built_in_ones(tmp_path):
    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    cases = [["predict", "vit-mqa/cifar", str(tmp_path / "x.png")],
             ["eval", "vit-mqa/mnist-large"]]
    for outcome in run_cli_cases(cases, tmp_path):
        assert_one_line_error(outcome, "the built-in models are vit-mqa/mnist, "
                                       "vit-mqa/fashion-mnist")


def test_library_loads_by_name_and_create_model_takes_pretrained_true():
    model = VisionTransformer.from_pretrained("vit-mqa/mnist")
    assert model.classes == [str(d) for d in range(10)] and not model.training
    by_preset = create_model("mnist-pretrained", pretrained=True)
    by_name = create_model("vit-mqa/fashion-mnist", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 by_preset.state_dict().values()))
    assert by_name.classes[0] == "T-shirt/top"
    fresh = create_model("mnist-pretrained")  # without weights: a new model, as timm
    assert fresh.training
    with pytest.raises(VitMqaError, match="has no built-in weights"):
        create_model("mnist-fast", pretrained=True)
    # Fine-tuning on other classes: the backbone comes along, the head is new.
    five = create_model("mnist-pretrained", pretrained=True, num_classes=5)
    assert five.head.out_features == 5
    assert torch.equal(five.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_eval_and_fine_tune_by_name(tmp_path, data_root):
    result = run_cli("eval", "vit-mqa/mnist", "--data-dir", str(data_root), "--json",
                     env=OFFLINE, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    accuracy = json.loads(result.stdout)["accuracy"]
    assert f"{100 * accuracy:.2f} %" in DOCS.read_text()  # the card's full-test figure
    folder = write_image_folder(tmp_path / "letters", per_class=8, size=(28, 28))
    tuned = run_cli("train", "--dataset", str(folder), "--init-from", "vit-mqa/mnist",
                    "--epochs", "1", "--batch-size", "8", "--quiet", "--out",
                    str(tmp_path / "tuned"), env=OFFLINE, cwd=tmp_path, timeout=600)
    assert tuned.returncode == 0, tuned.stderr
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["model"]["stem"] == "cct" and config["model"]["num_kv_heads"] == 1


def test_models_command_prints_the_cards():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    for name in BUILTIN_MODELS:
        card = model_card(name)
        assert f"{name}: " in result.stdout and card["sha256"] in result.stdout
        assert f"{100 * card['figures'][0]['accuracy']:.2f} %" in result.stdout
    cards = json.loads(run_cli("models", "--json").stdout)
    assert set(cards) == set(BUILTIN_MODELS)


def test_demo_starts_with_a_built_in_model(tmp_path):
    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **OFFLINE, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "vit_mqa", "demo", "vit-mqa/mnist",
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        while line and "served at" not in line:
            line = proc.stdout.readline()
        assert re.search(rf"served at http://127\.0\.0\.1:{port}/", line), line
    finally:
        proc.terminate()
        proc.wait(timeout=20)
