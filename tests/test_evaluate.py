"""Evaluation with test-time augmentation: the views, and the averaging of their
probabilities."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from vit_mqa import VisionTransformer, ViTConfig, VitMqaError
from vit_mqa.data.datasets import Split
from vit_mqa.data.preprocess import Preprocess
from vit_mqa.evaluation.evaluate import (
    confusion_matrix,
    evaluate,
    predict_logits,
    report_from_confusion,
    tta_views,
)


def test_views_flip_and_shift_with_the_background_filling_in():
    image = torch.arange(1, 17, dtype=torch.uint8).reshape(1, 1, 4, 4)
    assert len(tta_views(image, "none")) == 1
    flip, = tta_views(image, "flip")[1:]
    assert torch.equal(flip, image.flip(-1))
    shifted = tta_views(image, "shift")
    assert len(shifted) == 5 and len(tta_views(image, "flip+shift")) == 10
    down = shifted[1][0, 0]  # rolled one row down: the top row is background
    assert down[0].tolist() == [0, 0, 0, 0] and torch.equal(down[1:], image[0, 0, :3])
    up = shifted[2][0, 0]
    assert up[-1].tolist() == [0, 0, 0, 0] and torch.equal(up[:3], image[0, 0, 1:])
    assert shifted[3][0, 0, :, 0].tolist() == [0, 0, 0, 0]
    assert shifted[4][0, 0, :, -1].tolist() == [0, 0, 0, 0]
    assert torch.equal(image, torch.arange(1, 17, dtype=torch.uint8).reshape(1, 1, 4, 4))
    with pytest.raises(VitMqaError, match="unknown `tta` 'rotate'"):
        tta_views(image, "rotate")


def test_tta_averages_the_probabilities_of_the_views():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, dim=16, depth=1,
                                        num_heads=2)).eval()
    pre = Preprocess((8, 8), 1, (0.2,), (0.3,))
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    plain = predict_logits(model, images, pre, batch_size=2)
    with torch.inference_mode():
        torch.testing.assert_close(plain, model(pre(images)))
        both = [model(pre(images)).softmax(-1), model(pre(images.flip(-1))).softmax(-1)]
    expected = torch.stack(both).mean(0).log()
    torch.testing.assert_close(predict_logits(model, images, pre, batch_size=2, tta="flip"),
                               expected)


def test_eval_command_reports_its_test_time_augmentation(tiny_run):
    result = run_cli("eval", str(tiny_run), "--tta", "flip+shift", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tta"] == "flip+shift" and 0 <= report["accuracy"] <= 1
    bad = run_cli("eval", str(tiny_run), "--tta", "rotate")
    assert bad.returncode == 2 and "invalid choice: 'rotate'" in bad.stderr


class _ReadsTheClassFromThePixel(torch.nn.Module):
    """Logits that put each image in the class its first pixel names (after Preprocess
    with mean 0 and std 1/255, the pixel value itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 10).float()


def test_accuracy_is_exact_at_a_threshold():
    # 9,970 right of 10,000: exactly 99.70 %, which a float32 mean makes 0.99699998.
    labels = torch.arange(10_000) % 10
    answers = labels.clone()
    answers[:30] = (answers[:30] + 1) % 10
    images = answers.to(torch.uint8)[:, None, None, None].expand(-1, 1, 2, 2).contiguous()
    split = Split(images, labels)
    result = evaluate(_ReadsTheClassFromThePixel(), split, Preprocess((2, 2), 1, (0.0,),
                                                                      (1 / 255,)))
    assert result["accuracy"] >= 0.997 and result["accuracy"] == 9_970 / 10_000
    report = report_from_confusion(confusion_matrix(result["predictions"], labels, 10),
                                   [str(i) for i in range(10)])
    assert report["accuracy"] == 9_970 / 10_000 and report["num_images"] == 10_000
    assert report["per_class"]["0"]["accuracy"] == 997 / 1000
