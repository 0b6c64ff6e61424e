import dataclasses
import json

import pytest
import torch

from vit_mqa import VisionTransformer, ViTConfig, VitMqaError
from vit_mqa.models.vit import count_parameters, load_model_dir

CONFIGS = [
    dict(),
    dict(num_kv_heads=4),
    dict(num_kv_heads=2, qk_norm=True, qkv_bias=False),
    dict(pooling="mean", pos_embed="sincos2d"),
    dict(image_size=(32, 48), patch_size=8, in_channels=3, num_classes=7, dim=48,
         num_heads=6, num_kv_heads=3, mlp_ratio=2.5),
    dict(stem="conv", patch_size=7, pooling="mean"),
    dict(stem="conv", image_size=(32, 48), patch_size=8, in_channels=3, dim=48, num_heads=6),
    dict(stem="cct", patch_size=7, pooling="seq"),
    dict(stem="cct", patch_size=7, stem_convs=2, pooling="mean"),
    dict(stem="cct", image_size=(32, 48), patch_size=8, in_channels=3, dim=48, num_heads=6),
    dict(pooling="seq", pos_embed="sincos2d"),
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
    with pytest.raises(VitMqaError, match="unknown model config setting\\(s\\): heads"):
        ViTConfig.from_dict({"heads": 3})


@pytest.mark.parametrize("kw, message", [
    (dict(image_size=28, patch_size=5), "patch_size 5 does not divide image size 28x28"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads 3 must be a divisor of num_heads 4"),
    (dict(num_heads=4, num_kv_heads=8), "num_kv_heads 8 must be a divisor"),
    (dict(dim=30, num_heads=4), "dim 30 is not divisible by num_heads 4"),
    (dict(pooling="max"), "pooling must be"),
    (dict(pos_embed="rope"), "pos_embed must be"),
    (dict(stem="resnet"), "model.stem must be one of patch, conv, cct"),
    (dict(pooling="attention"), "model.pooling must be one of cls, mean, seq"),
    (dict(stem="conv", image_size=224, patch_size=14),
     "halves the image 4 times, which makes a 14x14 grid from 224x224, not the 16x16"),
    (dict(stem="conv", patch_size=1), "halves the image 0 times"),
    (dict(stem="cct", image_size=224, patch_size=14),
     "stem 'cct' halves the image 4 times, which makes a 14x14 grid from 224x224, not the 16x16"),
    (dict(stem="cct", patch_size=7, stem_convs=0), "stem_convs must be 1 to 8, got 0"),
    (dict(stem="conv", patch_size=7, stem_convs=2),
     "stem_convs applies to the \"cct\" stem only; this model's stem is 'conv'"),
])
def test_bad_configs_are_clear_errors(kw, message):
    with pytest.raises(VitMqaError, match=message):
        ViTConfig(**kw)


def test_non_square_images_and_channels():
    config = ViTConfig(image_size=(16, 40), patch_size=8, in_channels=5, num_classes=3, dim=32)
    model = VisionTransformer(config).eval()
    tokens = model.forward_features(torch.randn(2, 5, 16, 40))
    assert isinstance(tokens, torch.Tensor) and tokens.shape == (2, 1 + 2 * 5, 32)
    assert model.forward_head(tokens).shape == (2, 3)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    with pytest.raises(VitMqaError, match=r"expected images of shape \(B, 5, 16, 40\)"):
        model(torch.randn(2, 5, 40, 16))


def test_forward_features_are_the_normalised_output_of_the_last_block():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(depth=3, num_heads=4, num_kv_heads=2)).eval()
    x = torch.randn(2, 1, 28, 28)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 49, 64)
    # LayerNorm with its initial affine: every token has mean 0 and variance 1.
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 50), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.forward_head(tokens), model(x))


def explicit_attention_maps(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities written out from the weights, layer by layer."""
    c = model.config
    H, KV, hd = c.num_heads, c.num_kv_heads, c.dim // c.num_heads
    tokens = model.patch_embed(x)
    if model.cls_token is not None:
        tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    tokens = tokens + model.pos_embed
    maps = []
    for block in model.blocks:
        h = block.norm1(tokens)
        B, N, _ = h.shape
        q, k, _ = block.attn.qkv(h).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, N, H, hd).transpose(1, 2)
        k = k.view(B, N, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1))
        tokens = block(tokens)
    return maps


@pytest.mark.parametrize("threshold", [0, 10**6])  # fused SDPA / explicit products
def test_attention_maps_equal_the_explicit_computation_on_either_path(threshold):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(depth=3, num_heads=4, num_kv_heads=2, dropout=0.1,
                                        attn_dropout=0.1)).double()
    for block in model.blocks:
        block.attn.explicit_max_tokens = threshold
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    maps = model.attention_maps(x)  # in train mode: computed without dropout all the same
    assert model.training
    assert len(maps) == 3 and maps[0].shape == (2, 4, 50, 50)
    assert not maps[0].requires_grad
    with torch.no_grad():
        expected = explicit_attention_maps(model.eval(), x)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 50, dtype=torch.float64))


def test_the_explicit_threshold_switches_the_path_not_the_values(sdpa_calls):
    calls = sdpa_calls
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(patch_size=7, depth=2, num_kv_heads=2)).eval()
    x = torch.randn(2, 1, 28, 28)
    assert all(b.attn.explicit_max_tokens == 32 for b in model.blocks)
    explicit = model(x)  # 17 tokens <= 32 on a CPU: the explicit products
    assert calls == []
    for block in model.blocks:
        block.attn.explicit_max_tokens = 0
    fused = model(x)
    assert len(calls) == 2  # one fused call per layer
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_get_intermediate_layers_follows_timm(pooling):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(depth=4, pooling=pooling)).eval()
    x = torch.randn(2, 1, 28, 28)
    prefix = model.config.num_prefix_tokens
    with torch.no_grad():
        outputs, tokens = [], model._embed(x)
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        last_two = model.get_intermediate_layers(x, n=2)
        assert isinstance(last_two, tuple) and len(last_two) == 2
        for got, want in zip(last_two, outputs[2:]):
            torch.testing.assert_close(got, want[:, prefix:])  # patch tokens only
        picked = model.get_intermediate_layers(x, n=[0, -1], norm=True, reshape=True,
                                               return_prefix_tokens=True)
        for (spatial, prefix_tokens), want in zip(picked, [outputs[0], outputs[3]]):
            want = model.norm(want)
            assert spatial.shape == (2, 64, 7, 7)
            torch.testing.assert_close(spatial.flatten(2).transpose(1, 2), want[:, prefix:])
            torch.testing.assert_close(prefix_tokens, want[:, :prefix])
        # The last block, normalised, is what forward_features returns.
        torch.testing.assert_close(model.get_intermediate_layers(x, norm=True)[0],
                                   model.forward_features(x)[:, prefix:])
    for bad in (0, 5, [4], [-5], []):
        with pytest.raises(VitMqaError, match="n must be|block indices"):
            model.get_intermediate_layers(x, n=bad)


def test_reset_classifier_replaces_the_head():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(depth=2, dim=32))
    model.reset_classifier(1000)
    # Initialised as reset_parameters does it: trunc-normal(0.02) weights, zero bias
    # (nn.Linear's own init would give a std of about 0.1 here).
    assert 0.019 < model.head.weight.std() < 0.021
    assert model.head.bias.abs().max() == 0
    old = model.head
    model.reset_classifier(3)
    assert model.head is not old and model.config.num_classes == 3
    assert model.head.weight.shape == (3, 32) and model.head.bias.shape == (3,)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert count_parameters(model) == model.config.num_parameters()
    for bad, message in ((0, "num_classes must be >= 1"), (2.0, "num_classes must be int"),
                         (10**9, "parameters, more than the limit")):
        with pytest.raises(VitMqaError, match=message):
            model.reset_classifier(bad)
    assert model.config.num_classes == 3 and model.head.out_features == 3  # unchanged


@pytest.mark.parametrize("kw, expected", [
    (dict(), {"pos_embed", "cls_token"}),
    (dict(pooling="mean"), {"pos_embed"}),
    (dict(pooling="mean", pos_embed="sincos2d"), set()),  # a fixed buffer, not a parameter
])
def test_no_weight_decay_names_parameters_that_exist(kw, expected):
    model = VisionTransformer(ViTConfig(depth=1, **kw))
    assert model.no_weight_decay() == expected
    assert expected <= dict(model.named_parameters()).keys()


def test_sincos_position_embedding_is_fixed_and_not_saved():
    model = VisionTransformer(ViTConfig(pos_embed="sincos2d"))
    assert "pos_embed" not in model.state_dict()
    assert model.pos_embed[0, 0].abs().sum() == 0  # the CLS token gets no position
    assert model.pos_embed[0, 1:].std() > 0.3


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(num_kv_heads=2, dim=32, depth=2)).eval()
    model.classes = list("abcdefghij")
    model.preprocess = dataclasses.replace(model.preprocess, mean=(0.2,), std=(0.4,))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "library_name: vit-mqa" in card and "multi-query-attention" in card
    again = VisionTransformer.from_pretrained(tmp_path / "m")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.classes == list("abcdefghij")
    assert (again.preprocess.mean, again.preprocess.std) == ((0.2,), (0.4,))
    _, config = load_model_dir(tmp_path / "m")
    assert config["model"]["classes"] == list("abcdefghij")


def _hub_cache(tmp_path, model, repo="someone/digits", commit="a" * 40):
    """The Hugging Face Hub cache layout, as huggingface_hub leaves it after a download."""
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    model.save_pretrained(root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_from_pretrained_reads_a_hub_model_from_the_offline_cache(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(dim=32, depth=2)).eval()
    cache = _hub_cache(tmp_path, model)
    again = VisionTransformer.from_pretrained("someone/digits", cache_dir=cache,
                                              local_files_only=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    with pytest.raises(VitMqaError, match="someone/other is not a local directory, and the "
                                          "Hugging Face Hub model"):
        VisionTransformer.from_pretrained("someone/other", cache_dir=cache,
                                          local_files_only=True)


def test_preprocess_travels_with_a_loaded_model(tiny_run):
    """Images in [0, 1], uint8 batches and picture files all reach the model normalised
    as in training: the same logits as the run's own evaluation path."""
    model = VisionTransformer.from_pretrained(tiny_run)
    pre = model.preprocess
    assert pre.mean != (0.5,) * len(pre.mean)  # the run's statistics, not a default
    g = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (3, pre.in_channels, *pre.image_size), generator=g,
                          dtype=torch.uint8)
    expected = (uint8.float() / 255 - torch.tensor(pre.mean).view(1, -1, 1, 1)) / torch.tensor(
        pre.std).view(1, -1, 1, 1)
    torch.testing.assert_close(pre(uint8), expected)
    torch.testing.assert_close(pre(uint8.float() / 255), expected)
    with pytest.raises(VitMqaError, match="expected images of shape"):
        pre(torch.zeros(1, pre.in_channels, 5, 5))


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


@pytest.mark.parametrize("image_size, patch_size, grid, widths", [
    (28, 7, (4, 4), [16, 32, 64]), (28, 4, (7, 7), [32, 64]), (224, 16, (14, 14), [8, 16, 32, 64]),
    ((32, 48), 8, (4, 6), [16, 32, 64]), (28, 2, (14, 14), [64]),
])
def test_conv_stem_makes_the_patch_grid_with_overlapping_fields(image_size, patch_size, grid,
                                                                widths):
    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=patch_size, stem="conv", dim=64)
    model = VisionTransformer(config).eval()
    assert config.stem_widths == widths and config.grid_size == grid
    x = torch.randn(2, 1, *config.image_size)
    assert model.patch_embed(x).shape == (2, grid[0] * grid[1], 64)
    assert model(x).shape == (2, 10)
    # Unlike a patch's, a token's view reaches past its patch: changing the last pixel of
    # the first patch changes the second token too.
    y = x.clone()
    y[0, 0, 0, patch_size - 1] += 1.0
    second = model.patch_embed(x)[0, 1] - model.patch_embed(y)[0, 1]
    assert second.abs().max() > 0


def test_conv_stem_round_trips_with_its_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(stem="conv", patch_size=7, dim=32, depth=1))
    model.train()
    model(torch.randn(8, 1, 28, 28) * 3 + 1)  # moves the running statistics
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = VisionTransformer.from_pretrained(tmp_path / "m")
    assert loaded.config.stem == "conv"
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("image_size, patch_size, grid, convs_per_stage", [
    (28, 7, (4, 4), 1), (28, 4, (7, 7), 1), ((32, 48), 8, (4, 6), 1), (28, 2, (14, 14), 1),
    (28, 7, (4, 4), 2), ((32, 48), 8, (4, 6), 3),
])
def test_cct_tokenizer_is_convolutions_and_max_pooling_to_the_patch_grid(
        image_size, patch_size, grid, convs_per_stage):
    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=patch_size, stem="cct", dim=64,
                       stem_convs=convs_per_stage)
    model = VisionTransformer(config).eval()
    assert config.grid_size == grid
    x = torch.randn(2, 1, *config.image_size)
    # The same computation written out: per halving, `convs_per_stage` 3x3 stride-1
    # convolutions with ReLU, then a 3x3 stride-2 max-pooling; the last stage's to dim.
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    widths = [*config.stem_widths[:-1], 64]
    assert [c.out_channels for c in convs] == [w for w in widths for _ in range(convs_per_stage)]
    y = x
    for stage in range(len(widths)):
        for conv in convs[stage * convs_per_stage:(stage + 1) * convs_per_stage]:
            y = torch.nn.functional.conv2d(y, conv.weight, padding=1).relu()
        y = torch.nn.functional.max_pool2d(y, 3, stride=2, padding=1)
    expected = y.flatten(2).transpose(1, 2)
    assert expected.shape == (2, grid[0] * grid[1], 64)
    torch.testing.assert_close(model.patch_embed(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "seq"])
def test_pooled_output_is_the_tokens_weighted_by_the_pooling_weights(pooling):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(pooling=pooling, dim=32, depth=2)).eval()
    tokens = model.forward_features(torch.randn(3, 1, 28, 28))
    weights = model.pooling_weights(tokens)
    assert weights.shape == tokens.shape[:2]
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    by_hand = (weights[:, :, None] * tokens).sum(dim=1)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), by_hand)
    if pooling == "seq":
        # A softmax over the tokens of one learned score each.
        scores = tokens @ model.pool_score.weight[0] + model.pool_score.bias
        torch.testing.assert_close(weights, scores.softmax(dim=1))
        # Learned, per image: the weights are neither uniform nor the same for every image.
        assert weights.std(dim=1).min() > 1e-4
        assert (weights[0] - weights[1]).abs().max() > 1e-4
        assert "pool_score.weight" in model.state_dict()
