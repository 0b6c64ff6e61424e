"""Knowledge distillation: the teacher's view of a batch, the blended loss, and a run
that learns from a teacher."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_one_line_error, run_cli_cases
from vit_mqa.config.recipe import build_config
from vit_mqa.config.sections import TrainConfig
from vit_mqa.data.datasets import DataConfig, Split, load_data
from vit_mqa.data.preprocess import Preprocess
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.evaluate import predict_logits
from vit_mqa.models.vit import VisionTransformer, ViTConfig
from vit_mqa.training.distill import Teacher, distillation_loss, load_teacher
from vit_mqa.training.loop import train

TINY = {"dim": 32, "depth": 2, "num_heads": 4, "num_kv_heads": 1, "batch_size": 32,
        "val_size": 200, "eval_batch_size": 500}


def _model(seed: int, mean: float, std: float) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(dim=32, depth=2, num_heads=4, num_kv_heads=1))
    model.preprocess = Preprocess((28, 28), 1, (mean,), (std,))
    return model.eval()


def test_the_teacher_sees_each_batch_in_its_own_normalisation():
    pixels = torch.rand(6, 1, 28, 28)
    a, b = _model(0, 0.13, 0.31), _model(1, 0.5, 0.5)
    student = Preprocess((28, 28), 1, (0.2,), (0.25,))
    teacher = Teacher([a, b], student)
    got = teacher(student.normalize(pixels)).exp()
    with torch.no_grad():
        want = (F.softmax(a(a.preprocess.normalize(pixels)), 1)
                + F.softmax(b(b.preprocess.normalize(pixels)), 1)) / 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not a.training  # dropout never perturbs its answers


def test_the_loss_blends_labels_and_teacher():
    torch.manual_seed(0)
    logits = torch.randn(8, 10, requires_grad=True)
    labels = torch.randint(0, 10, (8,))
    teacher = torch.randn(8, 10).log_softmax(1)
    label_loss = F.cross_entropy(logits, labels)
    cfg = TrainConfig(distill="hard", distill_weight=1.0)
    torch.testing.assert_close(distillation_loss(logits, label_loss, teacher, cfg),
                               F.cross_entropy(logits, teacher.argmax(1)))
    cfg = dataclasses.replace(cfg, distill_weight=0.0)
    torch.testing.assert_close(distillation_loss(logits, label_loss, teacher, cfg), label_loss)
    # Soft: zero where the student already answers as the teacher does, at any temperature;
    # the T^2 factor keeps the gradient's size as T changes (Hinton et al. 2015).
    for t in (1.0, 4.0):
        cfg = TrainConfig(distill="soft", distill_weight=1.0, distill_temperature=t)
        same = distillation_loss(teacher.clone(), label_loss, teacher, cfg)
        assert same.abs() < 1e-5
        loss = distillation_loss(logits, label_loss, teacher, cfg)
        assert loss > 0.01
    cfg = TrainConfig(distill="soft", distill_weight=0.25, distill_temperature=2.0)
    half = distillation_loss(logits, label_loss, teacher, cfg)
    pure = distillation_loss(logits, label_loss, teacher, dataclasses.replace(cfg,
                                                                               distill_weight=1))
    torch.testing.assert_close(half, 0.75 * label_loss + 0.25 * pure)


@pytest.fixture(scope="module")
def small_mnist(data_root):
    data = load_data(DataConfig(dataset="mnist", data_dir=str(data_root), val_size=200))
    data.train = Split(data.train.images[:2000], data.train.labels[:2000])
    data.test = Split(data.test.images[:500], data.test.labels[:500])
    return data


def test_a_student_learns_the_teachers_answers(small_mnist, tmp_path):
    """Taught only by the teacher (weight 1, hard), a student agrees with the teacher's
    answers far more than one trained as long on the labels alone agrees with them."""
    # fp32 throughout (bf16 autocast switches itself on where the CPU has bf16 units): a
    # 2-epoch model learns an arbitrary mapping more slowly in bf16, which is not the point.
    tiny = {**TINY, "cpu_speedups": False}
    teacher_cfg = build_config(overrides={**tiny, "epochs": 2, "seed": 5})
    train(teacher_cfg, tmp_path / "teacher", data=small_mnist, quiet=True)
    # A teacher that answers (label + 1) mod 10: agreeing with it is not agreeing with labels.
    teacher = VisionTransformer.from_pretrained(tmp_path / "teacher")
    with torch.no_grad():
        teacher.head.weight.copy_(teacher.head.weight.roll(1, dims=0))
        teacher.head.bias.copy_(teacher.head.bias.roll(1, dims=0))
    teacher.save_pretrained(tmp_path / "shifted")

    def agreement(run):
        student = VisionTransformer.from_pretrained(run)
        x = small_mnist.test.images
        return (predict_logits(student, x, student.preprocess, 500, "cpu").argmax(1)
                == predict_logits(teacher, x, teacher.preprocess, 500, "cpu").argmax(1)
                ).float().mean().item()

    plain = build_config(overrides={**tiny, "epochs": 2, "seed": 1})
    taught = build_config(overrides={**tiny, "epochs": 2, "seed": 1,
                                     "teacher": str(tmp_path / "shifted"), "distill": "hard",
                                     "distill_weight": 1.0})
    train(plain, tmp_path / "plain", data=small_mnist, quiet=True)
    train(taught, tmp_path / "taught", data=small_mnist, quiet=True)
    assert agreement(tmp_path / "taught") > agreement(tmp_path / "plain") + 0.4
    recorded = json.loads((tmp_path / "taught" / "config.json").read_text())["train"]
    assert recorded["teacher"] == str(tmp_path / "shifted") and recorded["distill"] == "hard"


def test_a_teacher_for_other_images_or_classes_is_refused(tiny_run, small_mnist):
    student = small_mnist.preprocess
    with pytest.raises(VitMqaError, match="teacher .* takes 1x16x16 images, but this run's are "
                                          "1x28x28"):
        load_teacher(str(tiny_run), student, small_mnist.classes, torch.device("cpu"))
    with pytest.raises(VitMqaError, match="names other classes"):
        load_teacher("vit-mqa/fashion-mnist", student, small_mnist.classes,
                     torch.device("cpu"))
    assert len(load_teacher("vit-mqa/mnist, vit-mqa/mnist", student, small_mnist.classes,
                            torch.device("cpu")).models) == 2


def test_bad_distillation_settings_are_one_line(tmp_path, data_root):
    cases = [["--teacher", str(tmp_path / "missing")],
             ["--teacher", "vit-mqa/fashion-mnist"],
             ["--teacher", "vit-mqa/mnist,,vit-mqa/mnist"],
             ["--distill", "medium"],
             ["--distill-weight", "1.5"],
             ["--distill-temperature", "0"]]
    results = run_cli_cases([["train", "--data-dir", str(data_root), "--epochs", "1",
                              "--out", str(tmp_path / f"r{i}"), *case]
                             for i, case in enumerate(cases)], tmp_path)
    for result, fragment in zip(results, ["missing", "names other classes", "empty model",
                                          "distill", "distill_weight", "distill_temperature"]):
        assert_one_line_error(result, fragment)
