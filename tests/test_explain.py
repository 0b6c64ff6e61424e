"""Attention rollout, per-layer attention, overlays; attention maps on both attention paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.explain import (
    attention_rollout,
    colormap,
    layer_attention,
    model_relevance,
    overlay,
    readout,
)
from vit_mqa.models import attention
from vit_mqa.models.vit import VisionTransformer, ViTConfig


def tiny_model(pooling: str, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = dict(image_size=12, patch_size=4, dim=16, depth=3, num_heads=4, num_kv_heads=2,
               pooling=pooling)
    model = VisionTransformer(ViTConfig(**{**cfg, **kw})).eval()
    # Larger position embeddings and CLS token than the init's: the attention is far from
    # uniform, so a wrong rollout (order, rows, normalisation) shows.
    with torch.no_grad():
        model.pos_embed.normal_(0, 1.0)
        if model.cls_token is not None:
            model.cls_token.normal_(0, 1.0)
    return model


def rollout_by_hand(maps: list[torch.Tensor], prefix: int, pooling) -> list[list[float]]:
    """The rollout with plain Python loops: one image at a time, matrices as lists;
    ``pooling`` "cls", "mean" or the tokens' pooling weights (B, N)."""
    out = []
    batch, heads, n, _ = maps[0].shape
    for b in range(batch):
        rollout = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
        for attn in maps:
            a = attn[b].tolist()
            layer = []
            for i in range(n):
                row = [sum(a[h][i][j] for h in range(heads)) / heads for j in range(n)]
                row[i] += 1.0  # residual
                total = sum(row)
                layer.append([v / total for v in row])
            # rollout <- layer @ rollout
            rollout = [[sum(layer[i][k] * rollout[k][j] for k in range(n)) for j in range(n)]
                       for i in range(n)]
        if isinstance(pooling, torch.Tensor):
            w = pooling[b].tolist()
            pooled = [sum(w[i] * rollout[i][j] for i in range(n)) for j in range(n)]
        elif pooling == "cls":
            pooled = rollout[0]
        else:
            pooled = [sum(rollout[i][j] for i in range(n)) / n for j in range(n)]
        out.append(pooled[prefix:])
    return out


@pytest.mark.parametrize("pooling", ["cls", "mean", "seq"])
def test_rollout_matches_hand_computation(pooling):
    model = tiny_model(pooling)
    x = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    maps = model.attention_maps(x)
    prefix = model.config.num_prefix_tokens
    assert len(maps) == 3 and maps[0].shape == (3, 4, 9 + prefix, 9 + prefix)
    read = readout(model, x)
    if pooling == "seq":  # the weights the model pools this image's tokens with
        with torch.no_grad():
            scores = model.forward_features(x) @ model.pool_score.weight[0]
            torch.testing.assert_close(read, (scores + model.pool_score.bias).softmax(dim=1))
    else:
        assert read == pooling
    got = attention_rollout(maps, prefix, read)
    expected = torch.tensor(rollout_by_hand(maps, prefix, read))
    assert got.shape == (3, 9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Not trivially uniform: the test would not notice a wrong order otherwise.
    assert (got.max(dim=1).values - got.min(dim=1).values).min() > 1e-3
    if pooling != "cls":  # every token's flow ends on patches: rows of a stochastic matrix
        torch.testing.assert_close(got.sum(dim=1), torch.ones(3))
    else:  # part of the CLS row stays on the CLS token itself
        assert (got.sum(dim=1) < 1).all()

    rolled, layers = model_relevance(model, x)
    torch.testing.assert_close(rolled.reshape(3, 9), got)
    assert layers.shape == (3, 3, 3, 3)


def test_rollout_order_matters():
    # Two different layers: the product in the other order gives another answer, so the
    # hand check above really pins the order down.
    model = tiny_model("cls")
    maps = model.attention_maps(torch.randn(2, 1, 12, 12))
    forward = attention_rollout(maps, 1, "cls")
    backward = attention_rollout(maps[::-1], 1, "cls")
    assert not torch.allclose(forward, backward, atol=1e-4)


def test_rollout_of_known_attention():
    n, prefix = 5, 1
    eye = torch.eye(n).expand(2, 3, n, n)
    # Each token only attends to itself: no flow from CLS to any patch.
    assert attention_rollout([eye, eye], prefix, "cls").abs().max() == 0
    # Mean pooling over self-attention only: each patch keeps its own 1/n.
    torch.testing.assert_close(attention_rollout([eye], 0, "mean"), torch.full((2, n), 1 / n))
    # Uniform attention everywhere: every patch equally relevant.
    uniform = torch.full((1, 2, n, n), 1 / n)
    r = attention_rollout([uniform] * 4, prefix, "cls")
    torch.testing.assert_close(r, r[:, :1].expand_as(r))


@pytest.mark.parametrize("pooling", ["cls", "mean", "seq"])
def test_layer_attention_reads_the_pooled_row(pooling):
    model = tiny_model(pooling)
    x = torch.randn(2, 1, 12, 12)
    maps = model.attention_maps(x)
    read = readout(model, x)
    layers = layer_attention(maps, model.config.num_prefix_tokens, read)
    assert layers.shape == (3, 2, 9)
    for layer, attn in zip(layers, maps):
        avg = attn.mean(dim=1)
        if pooling == "seq":
            row = torch.einsum("bn,bnm->bm", read, avg)
        else:
            row = avg[:, 0, 1:] if pooling == "cls" else avg.mean(dim=1)
        torch.testing.assert_close(layer, row)


def test_bad_rollout_input():
    maps = [torch.rand(1, 2, 5, 5)]
    with pytest.raises(VitMqaError, match="pooling"):
        attention_rollout(maps, 1, "max")
    with pytest.raises(VitMqaError, match="no attention maps"):
        attention_rollout([], 1, "cls")
    with pytest.raises(VitMqaError, match="CLS"):
        attention_rollout(maps, 0, "cls")
    with pytest.raises(VitMqaError, match="B, heads, N, N"):
        attention_rollout([torch.rand(2, 5, 5)], 1, "cls")
    with pytest.raises(VitMqaError, match="sequence pooling"):
        attention_rollout(maps, 0, "seq")  # needs the weights, not the name
    with pytest.raises(VitMqaError, match=r"pooling weights must be \(B, N\) = \(1, 5\)"):
        attention_rollout(maps, 0, torch.full((1, 4), 0.25))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_maps_and_logits_agree_across_attention_paths(pooling):
    # Off CUDA, short sequences take the explicit product and longer ones the fused SDPA
    # kernel; the maps must describe the computation that produced the logits either way.
    model = tiny_model(pooling, num_kv_heads=2)
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, threshold in (("sdpa", 0), ("explicit", 10**6)):
        for block in model.blocks:
            block.attn.explicit_max_tokens = threshold
        with torch.no_grad():
            logits = model(x)
        maps = model.attention_maps(x)
        assert len(maps) == 3
        # Each layer's map, applied to that layer's values, gives the layer's output on
        # the path that produced the logits.
        with torch.no_grad():
            tokens = model._embed(x)
            for block, weights in zip(model.blocks, maps):
                h = block.norm1(tokens)
                torch.testing.assert_close(apply_weights(block.attn, h, weights),
                                           block.attn(h), rtol=1e-5, atol=1e-5)
                tokens = block(tokens)
            torch.testing.assert_close(model.forward_head(model.norm(tokens)), logits)
        results[name] = (logits, maps)
    torch.testing.assert_close(results["sdpa"][0], results["explicit"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["sdpa"][1], results["explicit"][1]):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a.sum(dim=-1), torch.ones(a.shape[:-1]))


def apply_weights(layer: attention.GroupedQueryAttention, x: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """The layer's output computed from given probabilities (B, H, N, N): query head h
    reads K/V head h // group."""
    B, N, D = x.shape
    H, KV, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
    v = layer.qkv(x)[..., (H + KV) * hd:].view(B, N, KV, hd).transpose(1, 2)  # (B, KV, N, hd)
    v = v.repeat_interleave(H // KV, dim=1)  # per query head
    return layer.proj((weights @ v).transpose(1, 2).reshape(B, N, D))


def test_attention_weights_reproduce_the_fused_output():
    # The probabilities computed for a layer, applied to its values (query head h reading
    # K/V head h // group), give what the fused kernel computes.
    torch.manual_seed(0)
    layer = attention.GroupedQueryAttention(dim=32, num_heads=4, num_kv_heads=2,
                                            explicit_max_tokens=0).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        fused = layer(x)
        weights = layer.attention_weights(x)
        assert weights.shape == (2, 4, 7, 7)
        torch.testing.assert_close(apply_weights(layer, x, weights), fused,
                                   rtol=1e-5, atol=1e-5)


def test_overlay_marks_the_relevant_patch():
    image = np.full((28, 28), 128, dtype=np.uint8)
    grid = np.zeros((4, 4))
    grid[1, 2] = 5.0  # rows 7..13, columns 14..20
    for smooth in (True, False):
        out = overlay(image, grid, smooth=smooth)
        assert out.shape == (28, 28, 3) and out.dtype == np.uint8
        brightness = out.astype(float).sum(axis=2)
        y, x = np.unravel_index(brightness.argmax(), brightness.shape)
        assert 7 <= y < 14 and 14 <= x < 21
        assert brightness[0, 0] < brightness[y, x] - 200
    rgb = overlay(np.zeros((8, 12, 3), np.uint8), torch.rand(2, 3), alpha=1.0)
    assert rgb.shape == (8, 12, 3)
    # alpha 0: the image unchanged, as RGB
    same = overlay(image, grid, alpha=0.0)
    assert (same == 128).all()
    with pytest.raises(VitMqaError, match="relevance grid"):
        overlay(image, np.zeros(16))
    with pytest.raises(VitMqaError, match="image must be"):
        overlay(np.zeros((2, 3, 4), np.uint8), grid)


def test_colormap_is_ordered_dark_to_bright():
    rgb = colormap(np.linspace(0, 1, 50)).astype(float)
    luminance = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(luminance) > 0).all()
    assert colormap(np.array([-1.0, 2.0, np.nan])).shape == (3, 3)
