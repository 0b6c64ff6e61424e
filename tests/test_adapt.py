"""Copies of a model for other settings keep what the model is: its class names and its
preprocessing live in its config, so conversion, resizing, create_model and a save/load
round trip all carry them (the shipped models are the real cases)."""

import pytest
import torch
from conftest import run_cli

import vit_mqa
from vit_mqa.data.datasets import DATASETS, load_idx_dataset
from vit_mqa.evaluation.predict import Predictor
from vit_mqa.models.adapt import resize_model

CLOTHES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]
SHIPPED = {"vit-mqa/mnist": ("mnist", [str(i) for i in range(10)], (0.1307,), (0.3081,)),
           "vit-mqa/fashion-mnist": ("fashion-mnist", CLOTHES, (0.286,), (0.353,))}


def identity(model):
    p = model.preprocess
    return model.classes, p.mean, p.std, p.procedure


@pytest.fixture(scope="module")
def test_images(data_root):
    out = {}
    for dataset in ("mnist", "fashion-mnist"):
        arrays, _ = load_idx_dataset(DATASETS[dataset], str(data_root), download=False)
        out[dataset] = torch.from_numpy(arrays["test-images"][:300].copy()).unsqueeze(1)
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_conversion_keeps_names_normalisation_and_answers(name, test_images, tmp_path):
    dataset, classes, mean, std = SHIPPED[name]
    model = vit_mqa.VisionTransformer.from_pretrained(name)
    assert identity(model) == (classes, mean, std, dataset)
    converted = vit_mqa.convert_kv_heads(model, 1)
    assert identity(converted) == (classes, mean, std, dataset)
    x = test_images[dataset]
    with torch.no_grad():  # one K/V head already: pooling one head is the identity
        assert torch.equal(converted(converted.preprocess(x)).argmax(1),
                           model(model.preprocess(x)).argmax(1))
    converted.save_pretrained(tmp_path / "converted")
    loaded = vit_mqa.VisionTransformer.from_pretrained(tmp_path / "converted")
    assert identity(loaded) == (classes, mean, std, dataset)


@pytest.mark.parametrize("name", SHIPPED)
def test_resizing_and_create_model_keep_names_and_normalisation(name, test_images):
    dataset, classes, mean, std = SHIPPED[name]
    model = vit_mqa.VisionTransformer.from_pretrained(name)
    resized = resize_model(model, 49)  # patch 7, CCT's tokenizer: a 7x7 grid
    assert identity(resized) == (classes, mean, std, dataset)
    assert resized.preprocess.image_size == (49, 49)
    same = resize_model(model, 28)  # the same grid: the same weights, the same answers
    x = test_images[dataset]
    with torch.no_grad():
        assert torch.equal(same(same.preprocess(x)), model(model.preprocess(x)))
    made = vit_mqa.create_model(pretrained=name)
    assert identity(made) == (classes, mean, std, dataset)
    fine_tune = vit_mqa.create_model(pretrained=name, num_classes=3)
    assert fine_tune.classes == ["0", "1", "2"]  # a new head names its outputs anew
    assert (fine_tune.preprocess.mean, fine_tune.preprocess.procedure) == (mean, dataset)


def test_the_convert_command_keeps_the_clothing_names(tmp_path, data_root):
    """`vit-mqa convert` then `predict`: the converted folder answers in clothing names."""
    out = tmp_path / "fashion-mqa"
    result = run_cli("convert", "vit-mqa/fashion-mnist", str(out), "--num-kv-heads", "1")
    assert result.returncode == 0, result.stderr
    arrays, _ = load_idx_dataset(DATASETS["fashion-mnist"], str(data_root), download=False)
    images = torch.from_numpy(arrays["test-images"][:64].copy()).unsqueeze(1)
    labels = arrays["test-labels"][:64]
    predictor = Predictor(out)
    probs = predictor.probabilities(images)
    names = [predictor.classes[i] for i in probs.argmax(1).tolist()]
    assert predictor.classes == CLOTHES and predictor.preprocess.procedure == "fashion-mnist"
    right = sum(n == CLOTHES[y] for n, y in zip(names, labels.tolist()))
    assert right >= 0.85 * len(names), right


def test_a_config_that_names_too_few_classes_is_one_clear_error():
    with pytest.raises(vit_mqa.VitMqaError, match="lists 2 classes but the model has 10"):
        vit_mqa.ViTConfig(classes=["a", "b"])
    with pytest.raises(vit_mqa.VitMqaError, match="preprocess.std must be > 0"):
        vit_mqa.ViTConfig(preprocess={"mean": [0.1], "std": [0.0]})
