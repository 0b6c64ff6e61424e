"""The vit-mqa command, run as a real subprocess: happy paths and every bad input."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, write_image_folder


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vit-mqa: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_eval_reports_accuracy_per_class_and_confusion(trained_run, data_root):
    result = run_cli("eval", str(trained_run), "--data-dir", str(data_root), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_images"] == 10000 and report["split"] == "test"
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10000
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / 10000)
    assert report["accuracy"] > 0.6  # 400 steps: well past chance
    results = json.loads((trained_run / "results.json").read_text())
    assert report["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
    text = run_cli("eval", str(trained_run), "--data-dir", str(data_root))
    assert text.returncode == 0 and "test accuracy" in text.stdout
    assert "confusion matrix" in text.stdout


def test_predict_images_of_any_size_and_mode(trained_run, mnist_test_arrays, tmp_path):
    images, labels = mnist_test_arrays
    files = []
    for i in range(10):
        img = Image.fromarray(images[i])
        if i % 3 == 1:
            img = img.convert("RGB").resize((56, 56))
        elif i % 3 == 2:
            img = img.convert("RGBA").resize((84, 60))
        path = tmp_path / "in" / f"{i}_{labels[i]}.{'jpg' if i == 4 else 'png'}"
        path.parent.mkdir(exist_ok=True)
        img.convert("RGB").save(path) if i == 4 else img.save(path)
        files.append(path)
    result = run_cli("predict", str(trained_run), str(tmp_path / "in"), "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert len(predictions) == 10
    correct = 0
    for p in predictions:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        correct += p["top"][0]["class"] == p["path"].rsplit("_", 1)[1][0]
    assert correct >= 6
    text = run_cli("predict", str(trained_run), str(files[0]))
    assert text.returncode == 0 and text.stdout.startswith(str(files[0]) + ": ")


def test_predictor_api_matches_cli(trained_run, mnist_test_arrays, tmp_path):
    from vit_mqa.evaluation.predict import Predictor

    images, _ = mnist_test_arrays
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    api = Predictor(trained_run).predict([tmp_path / "a.png"], top_k=2)
    cli = json.loads(run_cli("predict", str(trained_run), str(tmp_path / "a.png"), "--json",
                             "--top-k", "2").stdout)
    assert api[0]["top"][0]["class"] == cli[0]["top"][0]["class"]
    assert api[0]["top"][0]["probability"] == pytest.approx(cli[0]["top"][0]["probability"])


@pytest.mark.parametrize("args, fragments", [
    (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["train", "--preset", "nope"], ["invalid choice: 'nope'", "mnist-fast"]),
    (["train", "--patch-size", "5"], ["patch_size 5 does not divide image size 28x28"]),
    (["train", "--num-kv-heads", "3"], ["num_kv_heads 3 must be a divisor of num_heads 4"]),
    (["train", "--dataset", "cifar-11"], ["unknown dataset 'cifar-11'"]),
    (["train", "--epochs", "0"], ["epochs must be >= 1"]),
    (["train", "--lr", "fast"], ["invalid float value: 'fast'"]),
    (["train", "--time-budget", "3 fortnights"], ["--time-budget", "not a duration"]),
    (["train", "--time-budget", "-300"], ["time_budget must be 0 (off) to"]),
    (["train", "--stem", "conv", "--patch-size", "1"], ["halves the image 0 times"]),
    (["train", "--mixup", "-1"], ["need mixup and cutmix in [0, 100]"]),
    (["train", "--select", "first"], ["invalid choice: 'first'"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
])
def test_bad_train_input_one_line_and_nothing_written(args, fragments, tmp_path, data_root):
    out = tmp_path / "run"
    result = run_cli(*args, "--data-dir", str(data_root), "--out", str(out))
    _one_line_error(result, *fragments)
    assert not out.exists()


def test_missing_data_offline_one_line(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--out", str(out), "--data-dir", str(tmp_path / "empty"),
                     env={"VIT_MQA_DATA": str(tmp_path / "none")})
    _one_line_error(result, "mnist not found locally and the download failed",
                    "--data-dir")
    assert not out.exists()


def test_corrupt_data_one_line(tmp_path, data_root):
    import shutil

    d = tmp_path / "data" / "mnist"
    shutil.copytree(data_root / "mnist", d)
    blob = (d / "train-labels-idx1-ubyte.gz").read_bytes()
    (d / "train-labels-idx1-ubyte.gz").chmod(0o644)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(blob[:-50])
    # A valid copy later in the lookup order ($VIT_MQA_DATA) must not hide the corrupt one.
    result = run_cli("train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                     "--max-steps", "1")
    _one_line_error(result, "train-labels-idx1-ubyte.gz", "corrupt or truncated")


def test_not_a_run_directory(tmp_path):
    _one_line_error(run_cli("eval", str(tmp_path)), "is not a vit-mqa run directory")
    _one_line_error(run_cli("predict", str(tmp_path / "nope"), "x.png"), "is not a directory")
    _one_line_error(run_cli("train", "--resume", str(tmp_path)), "not a vit-mqa run directory")
    (tmp_path / "config.json").write_text("{not json")
    _one_line_error(run_cli("eval", str(tmp_path)), "cannot parse")


def test_unreadable_images_and_missing_paths(trained_run, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    _one_line_error(run_cli("predict", str(trained_run), str(tmp_path / "bad.png")),
                    "cannot read image", "bad.png")
    _one_line_error(run_cli("predict", str(trained_run), str(tmp_path / "missing.png")),
                    "no such file or folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(run_cli("predict", str(trained_run), str(tmp_path / "empty")),
                    "no image files found")


def test_mismatched_weights_one_line(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["num_kv_heads"] = 4
    (run / "config.json").write_text(json.dumps(config))
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "z.png")
    _one_line_error(run_cli("predict", str(run), str(tmp_path / "z.png")),
                    "do not match the model config")


def test_train_on_image_folder_then_predict(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=30, size=(16, 16), mode="RGB")
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", str(root), "--val-size", "6", "--patch-size", "4",
                     "--dim", "32", "--depth", "2", "--batch-size", "16", "--epochs", "3",
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    predicted = json.loads(run_cli("predict", str(out), str(root / "right" / "0.png"),
                                   "--json").stdout)
    assert predicted[0]["top"][0]["class"] in ("left", "right")


def test_presets_listed_as_a_table_and_as_json():
    from vit_mqa.config.presets import PRESETS

    result = run_cli("presets")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0].split() == ["preset", "dataset", "model",
                                                           "epochs", "batch", "lr"]
    default = next(x for x in lines if x.startswith("mnist-fast (default)"))
    assert "  patch 7, dim 64, depth 6, 4 heads / 1 K/V, cls" in default
    budget = next(x for x in lines if x.startswith("mnist-60min"))
    assert "cct stem, patch 7, dim 128, depth 6, 4 heads / 1 K/V, mean" in budget
    vgg = next(x for x in lines if x.startswith("mnist-30min"))
    assert "cct stem, 2 convs per stage, patch 7, dim 128, depth 6" in vgg
    assert all(any(x.startswith(name) for x in lines) for name in PRESETS)
    as_json = json.loads(run_cli("presets", "--json").stdout)
    assert as_json == {"default": "mnist-fast", "presets": PRESETS}


def test_bare_command_lists_the_commands():
    result = run_cli()
    assert result.returncode == 0
    for command in ("train", "eval", "predict", "demo", "report", "presets"):
        assert f"    {command}" in result.stdout


def test_image_size_flag_resizes_folder_data(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=12, size=(20, 24))
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", str(root), "--image-size", "12", "--val-size", "4",
                     "--patch-size", "4", "--dim", "16", "--depth", "1", "--batch-size", "8",
                     "--epochs", "1", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["image_size"] == [12, 12]
    assert config["model"]["image_size"] == [12, 12]


def test_bad_config_files_and_resume_flags(tmp_path, trained_run):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"lr": "fast"}}))
    _one_line_error(run_cli("train", "--config", str(tmp_path / "c.json")),
                    "train.lr must be float, got 'fast'")
    (tmp_path / "d.json").write_text("[1, 2]")
    _one_line_error(run_cli("train", "--config", str(tmp_path / "d.json")),
                    "must hold a JSON object")
    _one_line_error(run_cli("train", "--config", str(tmp_path / "missing.json")),
                    "cannot read config file")
    _one_line_error(run_cli("train", "--resume", str(trained_run), "--lr", "0.1"),
                    "--lr cannot change on --resume")
    (tmp_path / "file").write_text("x")
    _one_line_error(run_cli("train", "--out", str(tmp_path / "file")), "is a file")


def test_resume_of_a_bare_model_directory_is_refused(tmp_path):
    from vit_mqa import VisionTransformer, ViTConfig

    VisionTransformer(ViTConfig(dim=16, depth=1)).save_pretrained(tmp_path / "m")
    _one_line_error(run_cli("train", "--resume", str(tmp_path / "m")),
                    "has no data, augment, train section")


def test_bad_device_one_line(trained_run, tmp_path):
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "z.png")
    _one_line_error(run_cli("predict", str(trained_run), str(tmp_path / "z.png"), "--device",
                            "quantum"), "unknown device 'quantum'")


def test_eval_works_from_any_folder_and_when_the_data_folder_moved(tiny_folder, data_root,
                                                                     tmp_path):
    from tests.conftest import TINY_TRAIN

    work = tmp_path / "work"
    shutil.copytree(tiny_folder, work / "bars")
    run = run_cli("train", "--dataset", "bars", "--out", "run", "--epochs", "1", *TINY_TRAIN,
                  cwd=work)
    assert run.returncode == 0, run.stderr
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["data"]["dataset"] == str(work / "bars")  # recorded absolute
    elsewhere = run_cli("eval", str(work / "run"), "--json", cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert json.loads(elsewhere.stdout)["num_images"] == 8
    # An MNIST run whose --data-dir has gone: the usual lookup, with a note saying so.
    mnist = tmp_path / "mnist-run"
    shutil.copytree(work / "run", mnist)
    config["data"].update(dataset="mnist", data_dir=str(tmp_path / "gone"))
    (mnist / "config.json").write_text(json.dumps(config))
    moved = run_cli("eval", str(mnist), "--json", env={"VIT_MQA_DATA": str(data_root)})
    assert moved.stderr.startswith(f"vit-mqa: note: the run's data folder {tmp_path / 'gone'}")
    # MNIST was found through the lookup: its classes are compared with the run's.
    assert "the data's classes ['0', '1'," in moved.stderr
