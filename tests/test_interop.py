"""Import from Hugging Face transformers and timm, GQA/MQA conversion, ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_cli
from vit_mqa import VisionTransformer, ViTConfig, VitMqaError
from vit_mqa.models.adapt import convert_kv_heads, resample_pos_embed, transfer_weights
from vit_mqa.models.interop import export_onnx, load_external
from vit_mqa.models.vit import load_model_dir, save_model_dir


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (norms and biases too), so a swapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * 0.1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=96, image_size=32, patch_size=8,
                                 num_channels=3, num_labels=5,
                                 id2label={i: f"class{i}" for i in range(5)},
                                 label2id={f"class{i}": i for i in range(5)},
                                 attn_implementation="sdpa")
    model = transformers.ViTForImageClassification(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    _randomise(model)
    path = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(path)
    return path, model


def test_hugging_face_import_matches_logits(hf_dir):
    path, hf = hf_dir
    ours, extras = load_external(path)
    assert ours.config.num_kv_heads == ours.config.num_heads == 4
    assert extras["classes"] == [f"class{i}" for i in range(5)]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        got = ours(x)
    assert expected.abs().max() > 0.5  # not a degenerate comparison
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_import_cli_then_predict_and_resample(hf_dir, tmp_path):
    path, hf = hf_dir
    result = run_cli("import", str(path), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model"]["classes"][0] == "class0" and config["model"]["num_kv_heads"] == 4
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "x.png")
    out = run_cli("predict", str(tmp_path / "ours"), str(tmp_path / "x.png"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["top"][0]["class"].startswith("class")
    big = run_cli("import", str(path), str(tmp_path / "big"), "--image-size", "48")
    assert big.returncode == 0, big.stderr
    model, _ = load_model_dir(tmp_path / "big")
    assert model.pos_embed.shape == (1, 1 + 36, 48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    again = run_cli("import", str(path), str(tmp_path / "big"))
    assert again.returncode != 0 and "already exists" in again.stderr


def _timm_state_dict(dim=48, depth=2, heads=4, patch=8, grid=4, classes=7, chans=3, mlp=96):
    """A state dict with timm VisionTransformer's documented names and shapes."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    s = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
         "patch_embed.proj.weight": r(dim, chans, patch, patch), "patch_embed.proj.bias": r(dim),
         "norm.weight": 1 + r(dim), "norm.bias": r(dim),
         "head.weight": r(classes, dim), "head.bias": r(classes)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                  b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                  b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                  b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                  b + "mlp.fc1.weight": r(mlp, dim), b + "mlp.fc1.bias": r(mlp),
                  b + "mlp.fc2.weight": r(dim, mlp), b + "mlp.fc2.bias": r(dim)})
    return s


def _timm_forward(s, x, depth, heads):
    """timm's VisionTransformer.forward, written out from its documented structure."""
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"],
                 stride=s["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], 1) + s["pos_embed"]
    B, N, D = x.shape
    ln = lambda t, n: F.layer_norm(t, (D,), s[n + ".weight"], s[n + ".bias"], 1e-6)  # noqa: E731
    for i in range(depth):
        b = f"blocks.{i}."
        qkv = F.linear(ln(x, b + "norm1"), s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + F.linear(a, s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
    return F.linear(ln(x, "norm")[:, 0], s["head.weight"], s["head.bias"])


def test_timm_state_dict_import_matches_logits(tmp_path):
    from safetensors.torch import save_file

    state = _timm_state_dict()
    save_file(state, str(tmp_path / "timm.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "timm.pth")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = _timm_forward(state, x, depth=2, heads=4)
    for name in ("timm.safetensors", "timm.pth"):
        ours, _ = load_external(tmp_path / name, num_heads=4)
        assert ours.config.image_size == (32, 32) and ours.config.patch_size == 8
        with torch.no_grad():
            # Logits of about 2 from two different fp32 computations (a strided convolution
            # against a matrix product; another attention kernel): a relative part in the
            # tolerance, since on a CPU with AMX they differed by 1.8e-5 (7.6e-6 relative).
            # A misplaced tensor changes them by tenths.
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    # Default head count is dim // 64 (here 0 -> 1): a different, still valid model.
    assert load_external(tmp_path / "timm.safetensors")[0].config.num_heads == 1
    bad = dict(state, **{"blocks.0.ls1.gamma": torch.ones(48)})
    save_file(bad, str(tmp_path / "ls.safetensors"))
    with pytest.raises(VitMqaError, match="features vit-mqa does not have"):
        load_external(tmp_path / "ls.safetensors")


def test_resample_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos, (4, 4), (4, 4), 1) is pos
    out = resample_pos_embed(pos, (4, 4), (8, 6), 1)
    assert out.shape == (1, 1 + 48, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    const = torch.ones(1, 16, 8) * 3
    torch.testing.assert_close(resample_pos_embed(const, (4, 4), (7, 7), 0),
                               torch.ones(1, 49, 8) * 3)


def test_init_from_resamples_to_another_image_size(tmp_path):
    small = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=1))
    big = VisionTransformer(ViTConfig(image_size=56, patch_size=7, dim=32, depth=1))
    notices = transfer_weights(big, small, "small")
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(big.head.weight, small.head.weight)
    assert big.pos_embed.shape == (1, 65, 32)
    assert notices == ["position embeddings resampled from a 4x4 to a 8x8 grid"]
    wrong = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=48, depth=1))
    with pytest.raises(VitMqaError, match="weights in small do not fit"):
        transfer_weights(wrong, small, "small")


def test_transfer_to_other_classes_keeps_the_backbone_and_makes_a_new_head():
    torch.manual_seed(0)
    source = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2))
    torch.manual_seed(1)
    target = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2,
                                         num_classes=3))
    head_before = target.head.weight.clone()
    notices = transfer_weights(target, source, "src")
    assert notices == ["the classification head was re-initialised for 3 classes (the source "
                       "has 10)"]
    torch.testing.assert_close(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(target.head.weight, head_before)  # left as initialised
    rgb = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2,
                                      in_channels=3))
    with pytest.raises(VitMqaError, match="1-channel images .* `in_channels` 1"):
        transfer_weights(rgb, source, "src")


def test_transfer_refuses_another_stem_and_keeps_a_conv_stem():
    torch.manual_seed(0)
    conv = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2,
                                       stem="conv"))
    patch = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2))
    with pytest.raises(VitMqaError, match="src has a conv stem and this model a patch stem"):
        transfer_weights(patch, conv, "src")
    cct = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2, stem="cct"))
    with pytest.raises(VitMqaError, match="src has a conv stem and this model a cct stem"):
        transfer_weights(cct, conv, "src")
    vgg = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2, stem="cct",
                                      stem_convs=2))
    with pytest.raises(VitMqaError, match=r"src has 1 convolution\(s\) per tokenizer stage "
                                          "and this model 2.*`stem_convs` 1"):
        transfer_weights(vgg, cct, "src")
    seq = VisionTransformer(ViTConfig(image_size=28, patch_size=7, dim=32, depth=2, stem="conv",
                                      pooling="seq"))
    with pytest.raises(VitMqaError, match="src pools its tokens with 'cls' and this model with "
                                          "'seq'.*`pooling` cls"):
        transfer_weights(seq, conv, "src")
    # Fine-tuning at 42 px: the stem's weights carry over, the grid grows to 6x6.
    bigger = VisionTransformer(ViTConfig(image_size=42, patch_size=7, dim=32, depth=2,
                                         stem="conv", num_classes=3))
    transfer_weights(bigger, conv, "src")
    torch.testing.assert_close(bigger.patch_embed.layers[0].weight,
                               conv.patch_embed.layers[0].weight)
    assert bigger.pos_embed.shape[1] == 1 + 6 * 6


@pytest.mark.parametrize("stem, pooling", [("conv", "cls"), ("cct", "seq")])
def test_onnx_export_and_kv_conversion_of_convolutional_stems(tmp_path, stem, pooling):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=28, patch_size=4, dim=32, depth=2,
                                        num_kv_heads=2, stem=stem, pooling=pooling))
    model.train()
    model(torch.randn(16, 1, 28, 28))  # BatchNorm statistics that are not the defaults
    model.eval()
    worst = export_onnx(model, tmp_path / "m.onnx", verify=True)
    assert worst is not None and worst < 1e-4
    x = torch.randn(2, 1, 28, 28)
    mqa = convert_kv_heads(model, 1)
    assert (mqa.config.stem, mqa.config.pooling) == (stem, pooling)
    torch.testing.assert_close(mqa.patch_embed(x), model.patch_embed(x), rtol=0, atol=0)
    if pooling == "seq":  # the pooling scores carry over unchanged
        torch.testing.assert_close(mqa.pool_score.weight, model.pool_score.weight)


def test_convert_to_the_same_head_count_changes_nothing():
    torch.manual_seed(0)
    mha = VisionTransformer(ViTConfig(dim=48, depth=2, num_heads=4, num_kv_heads=4)).eval()
    same = convert_kv_heads(mha, 4)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(same(x), mha(x), rtol=0, atol=0)


def test_convert_is_exact_when_kv_heads_are_shared():
    torch.manual_seed(0)
    D, H, hd = 48, 4, 12
    mha = VisionTransformer(ViTConfig(dim=D, depth=2, num_heads=H, num_kv_heads=H)).eval()
    _randomise(mha, 3)
    with torch.no_grad():
        for block in mha.blocks:  # make all 4 K heads equal, and all 4 V heads equal
            for t in (block.attn.qkv.weight, block.attn.qkv.bias):
                k = t[D:D + hd].clone()
                v = t[D + H * hd:D + H * hd + hd].clone()
                for h in range(H):
                    t[D + h * hd:D + (h + 1) * hd] = k
                    t[D + H * hd + h * hd:D + H * hd + (h + 1) * hd] = v
    x = torch.randn(2, 1, 28, 28)
    for kv in (1, 2):
        converted = convert_kv_heads(mha, kv)
        assert converted.config.num_kv_heads == kv
        torch.testing.assert_close(converted(x), mha(x), rtol=1e-5, atol=1e-5)
    # Unequal heads: conversion changes the function (it is a real approximation).
    _randomise(mha, 4)
    assert (convert_kv_heads(mha, 1)(x) - mha(x)).abs().max() > 1e-3
    with pytest.raises(VitMqaError, match="must divide"):
        convert_kv_heads(mha, 3)


def test_convert_cli_keeps_run_settings(trained_run, tmp_path, data_root):
    # The trained run is multi-query already; convert an MHA copy of it instead.
    mha_dir = tmp_path / "mha"
    model, config = load_model_dir(trained_run)
    mha = VisionTransformer(ViTConfig.from_dict({**config["model"], "num_kv_heads": 4}))
    save_model_dir(mha, mha_dir, {k: v for k, v in config.items() if k != "model"})
    result = run_cli("convert", str(mha_dir), str(tmp_path / "gqa"), "--kv-heads", "2")
    assert result.returncode == 0, result.stderr
    converted = json.loads((tmp_path / "gqa" / "config.json").read_text())
    assert converted["model"]["num_kv_heads"] == 2
    for kept in ("classes", "preprocess"):
        assert converted["model"][kept] == config["model"][kept]
    assert converted["data"] == config["data"]
    ev = run_cli("eval", str(tmp_path / "gqa"), "--data-dir", str(data_root), "--json")
    assert ev.returncode == 0, ev.stderr
    bad = run_cli("convert", str(mha_dir), str(tmp_path / "x"), "--num-kv-heads", "3")
    assert bad.returncode == 1
    assert "vit-mqa: error: --num-kv-heads 3 must divide the model's 4 K/V heads" in bad.stderr


def test_onnx_export_matches_on_the_whole_mnist_test_set(trained_run, tmp_path,
                                                        mnist_test_arrays):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    result = run_cli("export", str(trained_run), str(out))
    assert result.returncode == 0, result.stderr
    assert "onnxruntime matches PyTorch" in result.stdout
    model, config = load_model_dir(trained_run)
    pre = model.preprocess
    images = torch.from_numpy(mnist_test_arrays[0].copy()).unsqueeze(1)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    agree, worst = 0, 0.0
    for start in range(0, len(images), 1000):  # the batch dimension is dynamic
        x = pre(images[start:start + 1000])
        with torch.inference_mode():
            ref = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
    assert agree == 10000 and worst < 1e-4


def test_int8_export_keeps_mnist_accuracy_and_predict_runs_it(trained_run, tmp_path,
                                                              mnist_test_arrays):
    from PIL import Image

    from vit_mqa.evaluation.predict import Predictor

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    # The shipped model (99.35 %): a briefly trained one has so many near-ties that int8
    # rounding flips a few percent of them on some CPUs' kernels.
    source = "vit-mqa/mnist"
    assert run_cli("export", source, str(fp32)).returncode == 0
    result = run_cli("export", source, str(int8), "--int8")
    assert result.returncode == 0, result.stderr
    assert "int8 weights" in result.stdout
    assert int8.stat().st_size < 0.6 * fp32.stat().st_size
    images, labels = mnist_test_arrays
    batch = torch.from_numpy(images.copy()).unsqueeze(1)
    torch_probs = Predictor(source).probabilities(batch)
    int8_probs = Predictor(source, onnx=int8).probabilities(batch)
    truth = torch.from_numpy(labels.astype(np.int64))
    torch_acc = (torch_probs.argmax(1) == truth).float().mean().item()
    int8_acc = (int8_probs.argmax(1) == truth).float().mean().item()
    agree = (torch_probs.argmax(1) == int8_probs.argmax(1)).float().mean().item()
    assert agree > 0.99 and abs(int8_acc - torch_acc) < 0.005, (agree, torch_acc, int8_acc)

    Image.fromarray(255 - images[0]).save(tmp_path / "digit.png")
    predicted = run_cli("predict", str(trained_run), str(tmp_path / "digit.png"), "--onnx",
                        str(int8), "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["top"][0]["class"] == str(labels[0])
    wrong = tmp_path / "wrong.onnx"
    export_onnx(VisionTransformer(ViTConfig(image_size=32, dim=32, depth=1)), wrong)
    bad = run_cli("predict", str(trained_run), str(tmp_path / "digit.png"), "--onnx", str(wrong))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"vit-mqa: error: ONNX file {wrong} does not take this run's input (images of shape "
        "[batch, 1, 28, 28])"]


def test_import_of_a_file_that_is_no_state_dict_is_one_line(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    result = run_cli("import", str(tmp_path / "junk.pth"), str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot read weights" in result.stderr
    assert not (tmp_path / "out").exists()
