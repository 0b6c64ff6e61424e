"""create_model: presets, overrides, and pretrained weights adapted to a new task."""

from __future__ import annotations

import importlib

import pytest
import torch

import vit_mqa
from vit_mqa import VisionTransformer, ViTConfig, VitMqaError, create_model
from vit_mqa.config.presets import PRESETS


def test_a_preset_gives_its_architecture():
    model = create_model("mnist-fast")
    assert isinstance(model, VisionTransformer) and model.training
    c = model.config
    for key, value in PRESETS["mnist-fast"]["model"].items():
        assert getattr(c, key) == value, key
    assert (c.image_size, c.in_channels, c.num_classes) == ((28, 28), 1, 10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert create_model().config == c  # the default preset


def test_overrides_num_classes_and_image_size():
    model = create_model("vit-ti", num_classes=100, image_size=32, in_channels=3, depth=2,
                         num_kv_heads=3)
    c = model.config
    assert (c.dim, c.num_heads, c.depth, c.num_kv_heads) == (192, 3, 2, 3)
    assert (c.image_size, c.in_channels, c.num_classes) == ((32, 32), 3, 100)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("call, message", [
    (lambda: create_model("vit-huge"), "unknown model name 'vit-huge'; choose from mnist-fast"),
    (lambda: create_model("mnist-fast", heads=3), "unknown model config setting\\(s\\): heads"),
    (lambda: create_model("mnist-fast", num_kv_heads=3), "num_kv_heads 3 must be a divisor"),
])
def test_bad_requests_are_clear_errors(call, message):
    with pytest.raises(VitMqaError, match=message):
        call()


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    model = create_model("mnist-fast", depth=2, norm_eps=1e-5)
    model.save_pretrained(tmp_path / "m")
    return model.eval(), tmp_path / "m"


def test_pretrained_with_the_same_task_is_the_same_model(pretrained):
    source, path = pretrained
    model = create_model("mnist-fast", pretrained=path, depth=2)
    assert not model.training
    assert model.config == source.config  # norm_eps comes from the directory
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    # Without a preset, the directory's architecture as it is.
    assert create_model(pretrained=path).config == source.config


def test_pretrained_with_other_classes_gets_a_new_head(pretrained):
    source, path = pretrained
    model = create_model("mnist-fast", pretrained=path, depth=2, num_classes=3)
    assert model.config.num_classes == 3 and model.head.weight.shape == (3, 64)
    assert model.head.bias.abs().max() == 0
    theirs, ours = source.state_dict(), model.state_dict()
    for name, value in ours.items():
        if not name.startswith("head."):
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_pretrained_at_another_image_size_resamples_position_embeddings(pretrained):
    from vit_mqa.models.adapt import resample_pos_embed

    source, path = pretrained
    model = create_model("mnist-fast", pretrained=path, depth=2, image_size=(56, 42))
    assert model.config.grid_size == (8, 6)
    expected = resample_pos_embed(source.pos_embed.detach(), (4, 4), (8, 6), 1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert model.pos_embed.shape == (1, 1 + 48, 64)
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)
    assert model(torch.randn(2, 1, 56, 42)).shape == (2, 10)


def test_pretrained_that_does_not_fit_the_preset_is_a_clear_error(pretrained):
    _, path = pretrained
    with pytest.raises(VitMqaError, match=r"do not fit this model \(missing blocks\.2"):
        create_model("mnist-fast", pretrained=path, depth=3)
    with pytest.raises(VitMqaError, match=r"blocks.0.attn.qkv.weight has shape \(96, 64\), "
                                          r"model wants \(128, 64\)"):
        create_model("mnist-fast", pretrained=path, depth=2, num_kv_heads=2)
    with pytest.raises(VitMqaError, match="is not a directory"):
        create_model("mnist-fast", pretrained=path / "missing")
    with pytest.raises(VitMqaError, match="takes 1-channel images and this model 3"):
        create_model("mnist-fast", pretrained=path, in_channels=3)


def test_the_package_exports_the_public_api():
    for name in ("create_model", "VisionTransformer", "ViTConfig", "GroupedQueryAttention",
                 "VitMqaError", "Predictor", "train", "build_config", "load_external",
                 "convert_kv_heads", "export_onnx", "attention_rollout"):
        assert name in vit_mqa.__all__ and getattr(vit_mqa, name) is not None, name
    importlib.import_module("vit_mqa.training.loop")
    assert callable(vit_mqa.train) and vit_mqa.train.__name__ == "train"
    assert isinstance(vit_mqa.ViTConfig(), ViTConfig)
