"""Real torchrun processes (gloo on CPU, loopback rendezvous)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, write_image_folder
from vit_mqa.models.vit import VisionTransformer, ViTConfig

NO_AUGMENT = ["--rotate", "0", "--translate", "0", "--scale-min", "1", "--scale-max", "1"]


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "vit_mqa", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_one_step_equals_single_process_step(tmp_path, data_root):
    # Adam's first step moves each weight by lr * g / (|g| + eps): about lr wherever the
    # gradient is not ~0. Where it is ~0 (the key bias's gradient is exactly 0 in exact
    # arithmetic: softmax ignores a constant added to all of a query's scores), rounding
    # noise in g, which differs with the reduction order, becomes an update of up to lr.
    # So the key bias is checked against lr, every other weight against 1e-6 (lr 1e-4).
    # fp32: bf16 autocast (switched on by itself on CPUs with bf16 units) rounds each
    # process's gradients differently.
    common = ["train", "--data-dir", str(data_root), "--batch-size", "64", "--max-steps", "1",
              "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-4", "--val-size", "500",
              "--quiet", "--no-cpu-speedups", *NO_AUGMENT]
    one = run_cli(*common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    a = load_file(str(tmp_path / "one" / "last.safetensors"))
    b = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert set(a) == set(b)
    model_cfg = ViTConfig.from_dict(
        json.loads((tmp_path / "one" / "config.json").read_text())["model"])
    hd = model_cfg.dim // model_cfg.num_heads
    k_bias = slice(model_cfg.num_heads * hd, (model_cfg.num_heads + model_cfg.num_kv_heads) * hd)
    for k in a:
        if k.endswith("attn.qkv.bias"):
            # The key bias's exact gradient is 0, so its whole first Adam step is rounding
            # noise normalised by Adam: bounded by lr, not by 1e-6. Checked apart.
            assert (b[k][k_bias] - a[k][k_bias]).abs().max() <= 1e-4
            a[k][k_bias] = 0
            b[k][k_bias] = 0
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    # The step really moved the weights: this is not a comparison of two untouched inits.
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    torch.manual_seed(0)
    init = VisionTransformer(ViTConfig.from_dict(config["model"])).state_dict()
    assert max((init[k] - a[k]).abs().max().item() for k in a) > 5e-5
    metrics = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    assert metrics["processes"] == 2
    assert json.loads((tmp_path / "two" / "results.json").read_text())["processes"] == 2


def test_two_processes_reach_the_accuracy_of_one(tmp_path, data_root):
    common = ["train", "--data-dir", str(data_root), "--batch-size", "64", "--max-steps", "600",
              "--epochs", "1", "--warmup-epochs", "0.05", "--quiet"]
    one = run_cli(*common, "--out", str(tmp_path / "one"))
    two = torchrun(2, *common, "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    acc = [json.loads((tmp_path / d / "metrics.jsonl").read_text())["val_accuracy"]
           for d in ("one", "two")]
    assert acc[0] > 0.8
    assert abs(acc[0] - acc[1]) < 0.03, acc  # only augmentation streams and sum order differ


def test_resume_with_a_different_number_of_processes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=40, size=(16, 16))
    out = tmp_path / "run"
    first = torchrun(2, "train", "--dataset", str(root), "--val-size", "8", "--patch-size", "4",
                     "--dim", "32", "--depth", "2", "--batch-size", "16", "--epochs", "1",
                     "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    again = run_cli("train", "--resume", str(out), "--epochs", "3", "--quiet")
    assert again.returncode == 0, again.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["processes"]) for r in lines] == [(1, 2), (2, 1), (3, 1)]
    back = torchrun(2, "train", "--resume", str(out), "--epochs", "4", "--quiet")
    assert back.returncode == 0, back.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_error_in_ranks_is_shown_and_exits_non_zero(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10, size=(16, 16))
    result = torchrun(2, "train", "--dataset", str(root), "--val-size", "4", "--patch-size", "4",
                      "--batch-size", "15", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "batch_size 15 is not divisible by the 2 processes" in result.stderr
    assert not (tmp_path / "run").exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
def test_killing_one_rank_ends_the_run(tmp_path, data_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "vit_mqa", "train", "--data-dir", str(data_root), "--epochs", "50",
           "--out", str(tmp_path / "run"), "--quiet"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while (time.monotonic() < deadline and
               not (tmp_path / "run" / "config.json").exists()):  # training has begun
            time.sleep(0.5)
        assert (tmp_path / "run" / "config.json").exists()
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        start = time.monotonic()
        agent.wait(timeout=90)
        assert agent.returncode != 0
        assert time.monotonic() - start < 90
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.communicate()
