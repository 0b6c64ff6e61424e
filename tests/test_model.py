import json

import pytest
import torch

from vit_mqa import VisionTransformer, ViTConfig, VitMqaError
from vit_mqa.checkpoint import load_model_dir
from vit_mqa.model import count_parameters

CONFIGS = [
    dict(),
    dict(num_kv_heads=4),
    dict(num_kv_heads=2, qk_norm=True, qkv_bias=False),
    dict(pooling="mean", pos_embed="sincos2d"),
    dict(image_size=(32, 48), patch_size=8, in_channels=3, num_classes=7, dim=48,
         num_heads=6, num_kv_heads=3, mlp_ratio=2.5),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_parameter_count_matches_formula(kw):
    config = ViTConfig(**kw)
    assert count_parameters(VisionTransformer(config)) == config.num_parameters()


def test_mqa_has_fewer_parameters_than_mha():
    mqa = ViTConfig(dim=64, num_heads=8, num_kv_heads=1).num_parameters()
    mha = ViTConfig(dim=64, num_heads=8, num_kv_heads=8).num_parameters()
    depth, head_dim = 6, 8
    assert mha - mqa == depth * 2 * 7 * head_dim * (64 + 1)


@pytest.mark.parametrize("kw", CONFIGS)
def test_gradients_reach_every_parameter(kw):
    torch.manual_seed(0)
    config = ViTConfig(**kw)
    model = VisionTransformer(config)
    x = torch.randn(3, config.in_channels, *config.image_size)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_json_round_trip():
    config = ViTConfig(image_size=(28, 56), patch_size=7, num_kv_heads=2, qk_norm=True,
                       pooling="mean", pos_embed="sincos2d", drop_path=0.1)
    text = json.dumps(config.to_dict())
    again = ViTConfig.from_dict(json.loads(text))
    assert again == config
    assert again.image_size == (28, 56)


def test_unknown_config_key_is_an_error():
    with pytest.raises(VitMqaError, match="unknown model config keys: heads"):
        ViTConfig.from_dict({"heads": 3})


@pytest.mark.parametrize("kw, message", [
    (dict(image_size=28, patch_size=5), "patch_size 5 does not divide image size 28x28"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads 3 must be a divisor of num_heads 4"),
    (dict(num_heads=4, num_kv_heads=8), "num_kv_heads 8 must be a divisor"),
    (dict(dim=30, num_heads=4), "dim 30 is not divisible by num_heads 4"),
    (dict(pooling="max"), "pooling must be"),
    (dict(pos_embed="rope"), "pos_embed must be"),
])
def test_bad_configs_are_clear_errors(kw, message):
    with pytest.raises(VitMqaError, match=message):
        ViTConfig(**kw)


def test_non_square_images_and_channels():
    config = ViTConfig(image_size=(16, 40), patch_size=8, in_channels=5, num_classes=3, dim=32)
    model = VisionTransformer(config).eval()
    tokens, maps = model.forward_features(torch.randn(2, 5, 16, 40))
    assert tokens.shape == (2, 1 + 2 * 5, 32) and maps == []
    assert model.forward_head(tokens).shape == (2, 3)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    with pytest.raises(VitMqaError, match=r"expected images of shape \(B, 5, 16, 40\)"):
        model(torch.randn(2, 5, 40, 16))


def test_attention_maps_do_not_change_the_output():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(depth=3, num_heads=4, num_kv_heads=2)).eval()
    x = torch.randn(2, 1, 28, 28)
    tokens, maps = model.forward_features(x, return_attention=True)
    assert len(maps) == 3
    assert maps[0].shape == (2, 4, 50, 50)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 50))
    torch.testing.assert_close(model.forward_head(tokens), model(x), rtol=1e-5, atol=1e-5)


def test_sincos_position_embedding_is_fixed_and_not_saved():
    model = VisionTransformer(ViTConfig(pos_embed="sincos2d"))
    assert "pos_embed" not in model.state_dict()
    assert model.pos_embed[0, 0].abs().sum() == 0  # the CLS token gets no position
    assert model.pos_embed[0, 1:].std() > 0.3


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(num_kv_heads=2, dim=32, depth=2)).eval()
    model.save_pretrained(tmp_path / "m", extra_config={"classes": list("abcdefghij")})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    again = VisionTransformer.from_pretrained(tmp_path / "m")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    _, config = load_model_dir(tmp_path / "m")
    assert config["classes"] == list("abcdefghij")


def test_loading_mismatched_weights_names_the_problem(tmp_path):
    VisionTransformer(ViTConfig(num_kv_heads=1, dim=32, depth=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["num_kv_heads"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(VitMqaError, match=r"blocks.0.attn.qkv.weight has shape \(48, 32\), "
                                          r"model wants \(64, 32\)"):
        VisionTransformer.from_pretrained(tmp_path)


def test_patch_embedding_matches_the_strided_convolution():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=(12, 16), patch_size=4, in_channels=3))
    x = torch.randn(2, 3, 12, 16)
    conv = model.patch_embed.proj
    expected = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.patch_embed(x), expected, atol=1e-5, rtol=1e-5)
