"""Evaluation with test-time augmentation: the views, and the averaging of their
probabilities."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from vit_mqa import VisionTransformer, ViTConfig, VitMqaError
from vit_mqa.evaluate import predict_logits, tta_views
from vit_mqa.preprocess import Preprocess


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
