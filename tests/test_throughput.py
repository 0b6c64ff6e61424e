"""The throughput benchmark: FLOP counts, equal shapes across implementations, the
reference formulations behind the levers, memory and pipeline figures, the command."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import throughput_bench as bench
from tests.conftest import REPO

CPU = bench.BenchOptions(torch.device("cpu"), repeats=1, min_time=0.01, warmup=1)
TINY = bench.Shape("tiny", 16, 4, 3, 7, 32, 2, 4, 64)


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), *args],
                          capture_output=True, text=True, timeout=600)


def forward_flops(shape: bench.Shape, kv: int, weighted_pooling: bool = False) -> int:
    """Multiply-adds x 2 of every matrix product in one image's forward pass;
    ``weighted_pooling``: the head reads the tokens averaged by a weight row (vit-mqa's
    pooling_weights, one-hot for CLS), a product the peers' indexing does not make."""
    T, D, H, M = shape.tokens, shape.dim, shape.num_heads, shape.mlp_dim
    hd = D // H
    patch = 2 * (T - 1) * shape.in_channels * shape.patch_size**2 * D
    qkv = 2 * T * D * (H + 2 * kv) * hd
    attention = 2 * 2 * H * T * T * hd  # scores and weighted values
    block = qkv + attention + 2 * T * D * D + 2 * 2 * T * D * M
    pooling = 2 * T * D if weighted_pooling else 0
    return patch + shape.depth * block + pooling + 2 * D * shape.num_classes


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_flop_counter_matches_the_formula(kv):
    torch.manual_seed(0)
    runner = bench.make_runner("k", "l", bench.build_vit_mqa(TINY, kv), "infer", TINY, 3, CPU)
    assert bench.count_flops(runner.step) == 3 * forward_flops(TINY, kv, True)
    train = bench.make_runner("k", "l", bench.build_vit_mqa(TINY, kv), "train", TINY, 3, CPU)
    ratio = bench.count_flops(train.step) / (3 * forward_flops(TINY, kv, True))
    assert 2.8 < ratio < 3.0  # backward ~ 2x forward, minus the input gradient of layer 1


def test_kv_variants():
    assert TINY.kv_variants() == {"mqa": 1, "gqa": 2, "mha": 4}
    assert bench.SHAPES["vit-ti-32"].kv_variants() == {"mqa": 1, "mha": 3}
    assert dataclasses.replace(TINY, num_heads=2).kv_variants() == {"mqa": 1, "mha": 2}
    assert dataclasses.replace(TINY, num_heads=1).kv_variants() == {"mqa": 1}


def test_mnist_fast_shape_follows_the_preset():
    from vit_mqa.config.presets import PRESETS

    model = PRESETS["mnist-fast"]["model"]
    shape = bench.SHAPES["mnist-fast"]
    assert (shape.patch_size, shape.dim, shape.depth, shape.num_heads) == (
        model["patch_size"], model["dim"], model["depth"], model["num_heads"])
    assert shape.mlp_dim == model["dim"] * model["mlp_ratio"]


def test_hf_peer_has_the_same_shape_as_multi_head_vit_mqa():
    pytest.importorskip("transformers")
    hf = bench.build_hf_vit(TINY)
    mha = bench.build_vit_mqa(TINY, TINY.num_heads)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in mha.parameters())
    x = torch.randn(2, 3, 16, 16)
    assert hf(x).shape == (2, 7)
    # Same FLOPs per image too: the peers are compared at equal work.
    hf_runner = bench.make_runner("h", "h", hf, "infer", TINY, 2, CPU)
    assert bench.count_flops(hf_runner.step) == 2 * forward_flops(TINY, TINY.num_heads)


def test_vit_pytorch_peer_builds_without_torchvision():
    if importlib.util.find_spec("vit_pytorch") is None:
        with pytest.raises(bench.PeerUnavailable, match="vit-pytorch is not installed"):
            bench.build_vit_pytorch(TINY)
        return
    model = bench.build_vit_pytorch(TINY)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    runner = bench.make_runner("v", "v", model, "infer", TINY, 2, CPU)
    # vit-pytorch has no qkv bias and LayerNorms around its patch projection: same matmuls.
    assert bench.count_flops(runner.step) == 2 * forward_flops(TINY, TINY.num_heads)


@pytest.mark.parametrize("wrapper", [bench.ExpandedKV, bench.SeparateQKV])
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_lever_reference_formulations_compute_the_same_model(wrapper, kv):
    torch.manual_seed(0)
    model = bench.build_vit_mqa(TINY, kv).eval()
    x = torch.randn(3, 3, 16, 16)
    expected = model(x)
    changed = bench.swap_attention(model, wrapper)
    torch.testing.assert_close(changed(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_sdpa_lever_sets_every_layer_of_that_model_only(sdpa_calls):
    calls = sdpa_calls
    torch.manual_seed(0)
    model = bench.build_vit_mqa(TINY, 1).eval()
    other = bench.build_vit_mqa(TINY, 1).eval()
    x = torch.randn(3, 3, 16, 16)
    expected = model(x)
    assert calls == []  # a few tokens on a CPU: the explicit products by default
    bench.fused_attention_everywhere(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == TINY.depth
    other(x)
    assert len(calls) == TINY.depth  # another model keeps its default


def test_conv_patch_lever_computes_the_same_embedding():
    torch.manual_seed(0)
    model = bench.build_vit_mqa(TINY, 1).eval()
    x = torch.randn(3, 3, 16, 16)
    expected = model(x)
    model.patch_embed = bench.ConvPatchEmbed(model.patch_embed.proj)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_memory_meter_sees_a_step_allocation():
    meter = bench.MemoryMeter(torch.device("cpu"))

    def step():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(t.sum())

    used = meter.measure(step)
    if used is None:
        pytest.skip("no /proc/self/clear_refs or glibc here")
    assert 60 <= used < 200


def test_matmul_peak_and_pipeline_share():
    assert bench.matmul_peak(torch.device("cpu"), torch.float32, seconds=0.05, max_n=512) > 0.1
    share = bench.pipeline_share(TINY, 8, CPU)
    assert 0 < share["share"] < 1 and share["batch_ms"] > 0
    assert share["step_ms"] > share["batch_ms"]


def test_training_step_of_the_bench_is_the_trainers(monkeypatch):
    # The bench times steps.training_step, so a change there shows in its figures.
    calls = []
    module = bench.meters  # where make_runner finds it
    real = module.training_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "training_step", counting)
    runner = bench.make_runner("k", "l", bench.build_vit_mqa(TINY, 1), "train", TINY, 2, CPU)
    before = [p.detach().clone() for p in runner.model.parameters()]
    runner.step()
    assert calls == [1]
    assert any(not torch.equal(a, b) for a, b in zip(before, runner.model.parameters()))


def test_bench_command_writes_tables_and_json(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = run_bench("--shapes", "mnist-fast", "--impls",
                       "vit-mqa-mqa,vit-mqa-mha,hf-vit", "--repeats", "2", "--min-time", "0.05",
                       "--batch-size", "16", "--infer-batch-size", "32",
                       "--json-out", str(out), "--markdown-out", str(md))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {(r["impl"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(i, m) for i in ("vit-mqa-mqa", "vit-mqa-mha", "hf-vit")
                         for m in ("train", "infer")}
    for row in rows.values():
        assert row["images_per_s"] > 0 and len(row["images_per_s_windows"]) == 2
        assert row["flops_per_image"] > 0 and row["gflops_per_s"] > 0
    assert rows[("hf-vit", "train")]["vs_fastest_peer"] == pytest.approx(1.0)
    assert rows[("vit-mqa-mqa", "infer")]["batch_size"] == 32
    # MQA does less work than MHA at the same width: fewer K/V projection FLOPs.
    assert rows[("vit-mqa-mqa", "infer")]["flops_per_image"] < \
        rows[("vit-mqa-mha", "infer")]["flops_per_image"]
    assert report["matmul_peak_gflops"]["fp32"] > 0
    assert 0 < report["pipeline"][0]["share"] < 1
    assert "| mnist-fast (17) | train | 16 | vit-mqa MQA (kv=1) |" in md.read_text()
    assert "vs fastest peer" in result.stdout


def test_bench_shape_without_gqa_divisor_is_reported_as_skipped(tmp_path):
    shape = dataclasses.replace(TINY, num_heads=1, name="one-head")
    results, skipped = bench.bench_shape(shape, ["vit-mqa-mqa", "vit-mqa-gqa"], ["infer"],
                                         {"infer": 4}, CPU, {"fp32": 1.0}, lambda m: None)
    assert [r["impl"] for r in results] == ["vit-mqa-mqa"]
    assert skipped and "GQA" in skipped[0]["reason"]


@pytest.mark.parametrize("args, message", [
    (["--shapes", "vit-xl"], "unknown shape 'vit-xl'"),
    (["--impls", "timm"], "unknown implementation 'timm'"),
    (["--modes", "eval"], "unknown mode 'eval'"),
    (["--levers", "warp-drive"], "unknown lever 'warp-drive'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--min-time", "0"], "--min-time must be > 0"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bench_bad_options_are_one_line_errors(args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_bench(*args)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_levers_table_compares_against_the_default_path():
    rows = bench.levers(TINY, ["train", "infer"], {"train": 4, "infer": 8}, CPU,
                        lambda m: None,
                        names=["expanded-kv", "adamw-foreach", "no-grad", "one-thread",
                               "conv-patch"])
    got = {(r["lever"], r["mode"]) for r in rows}
    assert got == {("expanded-kv", "train"), ("expanded-kv", "infer"),
                   ("conv-patch", "train"), ("conv-patch", "infer"),
                   ("adamw-foreach", "train"), ("no-grad", "infer"),
                   ("one-thread", "train"), ("one-thread", "infer")}
    for r in rows:
        assert r["default_images_per_s"] > 0 and r["changed_images_per_s"] > 0


def test_native_gqa_lever_runs_where_the_fused_kernel_does(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    long = dataclasses.replace(TINY, image_size=32)  # 65 tokens: past the explicit products
    rows = bench.levers(long, ["infer"], {"infer": 2}, CPU, lambda m: None,
                        names=["native-gqa"])
    assert [(r["lever"], r["mode"]) for r in rows] == [("native-gqa", "infer")]
    assert rows[0]["description"].startswith("SDPA's enable_gqa")
    assert True in calls and False in calls  # the lever's runner and the default one
    # At 17 tokens a CPU never reaches the fused kernel: nothing to compare.
    assert bench.levers(TINY, ["infer"], {"infer": 2}, CPU, lambda m: None,
                        names=["native-gqa"]) == []


def test_kv_scaling_compares_mqa_gqa_and_mha_at_each_point():
    rows = bench.kv_scaling(TINY, [16, 32], [2], ["infer"], CPU, lambda m: None)
    assert [(r["attention"], r["kv_heads"], r["tokens"]) for r in rows] == [
        ("MQA", 1, 17), ("GQA", 2, 17), ("MHA", 4, 17),
        ("MQA", 1, 65), ("GQA", 2, 65), ("MHA", 4, 65)]
    for r in rows:
        assert r["images_per_s"] > 0 and r["flops_per_image"] > 0
        # K and V, every layer and token, head_dim 8, fp32.
        assert r["kv_bytes_per_image"] == 2 * TINY.depth * r["tokens"] * r["kv_heads"] * 8 * 4
    assert rows[2]["vs_mha"] == 1.0
    # One K/V head: fewer projection FLOPs than four, at the same token count.
    assert rows[0]["flops_per_image"] < rows[2]["flops_per_image"]
