"""Bad input through the real command line: one line on stderr naming the problem, a
non-zero exit, no traceback, and nothing half-written.

Most cases run in one process through ``tests/cli_harness.py`` (the real ``vit-mqa`` entry
point, under a memory limit); what needs a process of its own (signals, two runs at once,
a full disk) runs as one.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_TRAIN, assert_one_line_error, run_cli, run_cli_cases

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def folder(tiny_folder) -> Path:
    return tiny_folder


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- train flags and configs


def test_bad_train_settings_are_one_line_each(folder, tmp_path):
    binary = tmp_path / "config.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    train = ["train", "--dataset", str(folder), *TINY, "--epochs", "1"]
    cases = {
        "train.lr must be a finite number": ["--lr", "nan"],
        "train.lr must be a finite number, got inf": ["--lr", "inf"],
        "beta2 must be in [0, 1)": ["--beta2", "2"],
        "train.warmup_epochs must be a finite number": ["--warmup-epochs", "nan"],
        "warmup_epochs must be <= 100000": ["--warmup-epochs", "1e9"],
        "train.weight_decay must be a finite number": ["--weight-decay", "nan"],
        "augment.rotate must be a finite number": ["--rotate", "nan"],
        "model.mlp_ratio must be a finite number": ["--mlp-ratio", "inf"],
        "mlp_ratio must be in (0, 64]": ["--mlp-ratio", "0.001"],
        "norm_eps must be in (0, 1)": ["--norm-eps", "0"],
        "seed must be in [0, 2**63)": ["--seed", str(2**70)],
        "image_size must be 1 to 4096": ["--image-size", "-5"],
        "unknown device 'meta'": ["--device", "meta"],
        "unknown device 'xla'": ["--device", "xla"],
        "cannot read config file": ["--config", str(binary)],
        "depth must be <= 256": ["--depth", "1000000000"],
    }
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        cases["MPS is not available"] = ["--device", "mps"]
    runs = tmp_path / "runs"
    argvs = [[*train, *extra, "--out", str(runs / f"r{i}")]
             for i, extra in enumerate(cases.values())]
    for result, fragment in zip(run_cli_cases(argvs, tmp_path), cases):
        assert_one_line_error(result, fragment)
    assert not runs.exists() or not any(runs.iterdir()), "a refused run left a folder behind"


def test_empty_class_folder_is_refused(folder, tmp_path):
    data = shutil.copytree(folder, tmp_path / "data")
    (data / "empty").mkdir()
    result = run_cli("train", "--dataset", str(data), *TINY, "--out", str(tmp_path / "r"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"vit-mqa: error: class folder {data / 'empty'} holds no images; add some, or "
        "remove the folder"]


def test_data_dir_missing_one_file_says_which_and_leaves_no_cache_folder(data_root, tmp_path):
    partial = tmp_path / "partial" / "mnist"
    partial.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz"):
        (partial / name).symlink_to(data_root / "mnist" / name)
    cache = tmp_path / "cache"
    result = run_cli("train", "--data-dir", str(partial.parent), "--out", str(tmp_path / "r"),
                     "--quiet", env={"XDG_CACHE_HOME": str(cache), "VIT_MQA_DATA": ""})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing: t10k-labels-idx1-ubyte" in lines[0], lines
    assert not cache.exists() or not any(cache.rglob("*")), "an empty cache folder was left"


# ---------------------------------------------------------------- divergence


def test_diverged_training_stops_and_keeps_the_last_good_epoch(folder, tmp_path):
    """A NaN from epoch 2 on: the run stops with one line, and the checkpoints on disk are
    epoch 1's, finite, as they were."""
    from vit_mqa.config.recipe import build_config
    from vit_mqa.errors import VitMqaError
    from vit_mqa.training.loop import train

    def poison_after_first_epoch(record, model):
        # From epoch 2 on, training outputs are NaN (the weights saved after epoch 1 are not
        # touched: the hook runs before they are written).
        if record["epoch"] == 1:
            model.head.register_forward_hook(
                lambda module, args, out: out * math.nan if module.training else out)

    # Eager steps: the NaN comes from a forward hook, which a compiled step (switched on by
    # the CPU speed-ups on AMX CPUs) does not run.
    config = build_config(overrides={"dataset": str(folder), "dim": 16, "depth": 1,
                                     "num_heads": 2, "patch_size": 4, "batch_size": 8,
                                     "val_size": 8, "epochs": 3, "cpu_speedups": False})
    run = tmp_path / "run"
    with pytest.raises(VitMqaError, match=r"training diverged: the loss is NaN or infinite "
                       r"in epoch 2 .* keeps the weights and state of epoch 1"):
        train(config, run, quiet=True, on_epoch_end=poison_after_first_epoch)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]
    for name in ("model.safetensors", "last.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(run / name)).values())
    assert torch.load(run / "training_state.pt", weights_only=True)["epoch"] == 1


def test_diverging_learning_rate_is_one_line_and_saves_no_nan_model(folder, tmp_path):
    out = tmp_path / "r"
    result = run_cli("train", "--dataset", str(folder), *TINY, "--epochs", "2", "--lr", "10",
                     "--grad-clip", "0", "--warmup-epochs", "0", "--beta2", "0",
                     "--label-smoothing", "0", "--out", str(out))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, lines)
    assert len(lines) == 1 and "training diverged" in lines[0], lines
    for weights in out.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values())


# ---------------------------------------------------------------- untrusted run directories


def test_hostile_run_directories_are_refused_before_allocating(tiny_run, tmp_path):
    cases: dict[str, Path] = {}

    def variant(name: str, edit=None, weights=None) -> None:
        run = _copy_run(tiny_run, tmp_path / name)
        if edit is not None:
            _edit_json(run / "config.json", edit)
        if weights is not None:
            state = load_file(str(run / "model.safetensors"))
            weights(state)
            save_file(state, str(run / "model.safetensors"))
        cases[name] = run

    variant("depth 1e9", lambda c: c["model"].update(depth=10**9))
    variant("dim mismatch", lambda c: c["model"].update(dim=1024, depth=24))
    variant("mlp nan", lambda c: c["model"].update(mlp_ratio=math.nan))
    variant("mlp string", lambda c: c["model"].update(mlp_ratio="abc"))
    variant("image 1e6", lambda c: c["model"].update(image_size=[10**6, 10**6]))
    variant("nan weights", weights=lambda s: s["head.weight"].fill_(math.nan))
    variant("int64 head", weights=lambda s: s.update({"head.weight": s["head.weight"].long()}))
    expected = {
        "depth 1e9": "depth must be <= 256",
        "dim mismatch": "do not match the model config",
        "mlp nan": "model.mlp_ratio must be a finite number",
        "mlp string": "model.mlp_ratio must be float",
        "image 1e6": "image_size must be 1 to 4096",
        "nan weights": "hold NaN or infinite values (in head.weight)",
        "int64 head": "head.weight is I64, not a float tensor",
    }
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    argvs = [["predict", str(cases[name]), str(image), "--raw"] for name in expected]
    for result, fragment in zip(run_cli_cases(argvs, tmp_path), expected.values()):
        assert_one_line_error(result, fragment)


# ---------------------------------------------------------------- resume


def test_bad_training_states_and_metrics_are_one_line(tiny_run, tmp_path):
    def with_state(name: str, state) -> Path:
        run = _copy_run(tiny_run, tmp_path / name)
        torch.save(state, run / "training_state.pt")
        return run

    good = torch.load(tiny_run / "training_state.pt", weights_only=True)
    no_epoch = {k: v for k, v in good.items() if k != "epoch"}
    wrong_shape = dict(good, model=dict(good["model"],
                                        **{"head.weight": torch.zeros(3, 16)}))
    garbage = _copy_run(tiny_run, tmp_path / "garbage")
    with open(garbage / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    cases = {
        "holds a list, not a training state": with_state("list", [1, 2, 3]),
        "has no epoch": with_state("no-epoch", no_epoch),
        "head.weight has shape (3, 16), model wants (2, 16)": with_state("shape", wrong_shape),
        "line 2 of": garbage,
    }
    argvs = [["train", "--resume", str(run), "--epochs", "2", "--quiet"]
             for run in cases.values()]
    for result, fragment in zip(run_cli_cases(argvs, tmp_path), cases):
        assert_one_line_error(result, fragment)


def test_resume_removes_stale_temporaries_and_keeps_cumulative_time(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    stale = run / ".model.safetensors.x1y2.tmp"
    stale.write_bytes(b"half a file")
    result = run_cli("train", "--resume", str(run), "--epochs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    total = json.loads((run / "results.json").read_text())["train_time_s"]
    assert [m["epoch"] for m in metrics] == [1, 2]
    # Times run on from where the first part stopped.
    assert metrics[1]["elapsed_s"] >= metrics[0]["elapsed_s"] + 0.9 * metrics[1]["epoch_time_s"]
    assert total >= metrics[1]["elapsed_s"]


# ---------------------------------------------------------------- processes


def _popen_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vit_mqa", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_into_one_directory_one_is_refused(folder, tmp_path):
    out = tmp_path / "shared-out"
    runs = [_popen_train(["--dataset", str(folder), *TINY, "--epochs", "2", "--seed", str(s),
                          "--out", str(out)]) for s in (1, 2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1).strip().splitlines()
    assert len(refused) == 1 and ("in use by another training process" in refused[0]
                                  or "already exists and is not empty" in refused[0]), refused
    winner = 1 if results[0][0] == 0 else 2
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == winner
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


def test_resume_of_a_running_run_is_refused_and_sigterm_is_one_line(folder, tmp_path):
    out = tmp_path / "run"
    running = _popen_train(["--dataset", str(folder), *TINY, "--epochs", "400", "--out",
                            str(out)])
    deadline = time.monotonic() + 300
    while not (out / "training_state.pt").exists():
        assert running.poll() is None, running.stderr.read()
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.2)
    second = run_cli("train", "--resume", str(out), "--quiet")
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"vit-mqa: error: {out} is in use by another training process (pid {running.pid}); "
        "wait for it to end, or choose another run directory"]
    running.send_signal(signal.SIGTERM)
    code = running.wait(timeout=120)
    assert code == 128 + signal.SIGTERM
    assert running.stderr.read().strip().splitlines() == ["vit-mqa: terminated"]
    assert not list(out.glob(".*.tmp"))
    resumed = run_cli("train", "--resume", str(out), "--epochs", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "results.json").read_text())["steps"] > 0


def test_default_run_names_are_unique(folder, tmp_path):
    runs = [subprocess.Popen([sys.executable, "-m", "vit_mqa", "train", "--dataset",
                              str(folder), *TINY, "--epochs", "1"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for p in runs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    made = sorted((tmp_path / "runs").iterdir())
    assert len(made) == 2 and all((d / "results.json").is_file() for d in made)


def test_full_disk_is_one_line_naming_the_file(folder, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        # Wide enough that the weights cannot fit in 400 KB.
        result = run_cli("train", "--dataset", str(folder), *TINY, "--dim", "128",
                         "--epochs", "1", "--out", str(mount / "run"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, lines
        assert len(lines) == 1 and lines[0].startswith("vit-mqa: error: cannot write "), lines
        assert lines[0].endswith(": no space left on device"), lines
        assert not list((mount / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---------------------------------------------------------------- import


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory) -> Path:
    import transformers

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=16, patch_size=8,
                                 num_channels=1, num_labels=3)
    path = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(path)
    return path


def test_mutated_imports_are_one_line_each(hf_model_dir, tmp_path):
    def variant(name: str, edit=None, raw: bytes | None = None) -> Path:
        path = shutil.copytree(hf_model_dir, tmp_path / name)
        if raw is not None:
            (path / "config.json").write_bytes(raw)
        else:
            _edit_json(path / "config.json", edit)
        return path

    cases = {
        "id2label keys must be class indices": variant(
            "labels", lambda c: c.update(id2label={"a": "x", "b": "y", "c": "z"})),
        "hidden_size must be a positive integer, got 0": variant(
            "zero", lambda c: c.update(hidden_size=0)),
        "hidden_size must be a positive integer, got '32'": variant(
            "string", lambda c: c.update(hidden_size="32")),
        "layer_norm_eps must be a positive number, got 'x'": variant(
            "eps", lambda c: c.update(layer_norm_eps="x")),
        "has no tensor 'encoder.layer.2.": variant(
            "layers", lambda c: c.update(num_hidden_layers=3)),
        "patch_embed.proj.weight has shape (32, 1, 8, 8), model wants (32, 1, 4, 4)": variant(
            "patch", lambda c: c.update(patch_size=4)),
        "cannot parse": variant("binary", raw=bytes(range(256))),
        "must hold a JSON object, got list": variant("list", raw=b"[1, 2, 3]"),
        "hidden_size must be a positive integer, got 1000000000000.0": variant(
            "huge", lambda c: c.update(hidden_size=1e12)),
    }
    timm = tmp_path / "timm.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)},
              str(timm))
    cases["incomplete timm state dict: no patch_embed.proj.weight"] = timm
    argvs = [["import", str(src), str(tmp_path / "out" / f"{i}")]
             for i, src in enumerate(cases.values())]
    for result, fragment in zip(run_cli_cases(argvs, tmp_path), cases):
        assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists(), "a refused import left a folder behind"


def test_edited_run_configs_are_one_line_for_predict_and_eval(tiny_run, tmp_path):
    def variant(name: str, edit) -> Path:
        run = _copy_run(tiny_run, tmp_path / name)
        _edit_json(run / "config.json", edit)
        return run

    from PIL import Image

    image = tmp_path / "digit.png"
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(image)
    predict_cases = {
        "preprocess.mean must be 1 finite number(s), got 'abc'": variant(
            "mean", lambda c: c["model"]["preprocess"].update(mean="abc")),
        "preprocess.std must be > 0, got [0]": variant(
            "std", lambda c: c["model"]["preprocess"].update(std=[0])),
        "\"classes\" must be a list of names": variant(
            "classes", lambda c: c["model"].update(classes=5)),
        "\"preprocess\" has no mean": variant(
            "no-mean", lambda c: c["model"]["preprocess"].pop("mean")),
    }
    eval_cases = {
        "unknown \"data\" setting(s): colour": variant(
            "data-key", lambda c: c["data"].update(colour="red")),
        "\"data\" must be a JSON object, got str": variant(
            "data-str", lambda c: c.update(data="mnist")),
    }
    argvs = ([["predict", str(run), str(image), "--raw"] for run in predict_cases.values()]
             + [["eval", str(run), "--device", "cpu"] for run in eval_cases.values()])
    results = run_cli_cases(argvs, tmp_path)
    for result, fragment in zip(results, [*predict_cases, *eval_cases]):
        assert_one_line_error(result, fragment)
