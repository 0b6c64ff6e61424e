"""The README's Python examples run as written, in a folder laid out as the README
assumes: the quick start's run in runs/default, a folder of the reader's own images in
my-letters/, a Hugging Face ViT in hf-vit-dir/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall((REPO / "README.md").read_text())


def _letters(root: Path) -> None:
    """Three classes of 40x40 RGB pictures: a bar at the top, middle or bottom."""
    rng = np.random.default_rng(0)
    for label, name in enumerate("abc"):
        (root / name).mkdir(parents=True)
        for i in range(40):
            a = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
            a[5 + 12 * label:15 + 12 * label] = (230, 200, 90)
            Image.fromarray(a, "RGB").save(root / name / f"{i}.png")


def test_readme_python_examples_run(tmp_path, monkeypatch):
    import transformers

    import vit_mqa

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    vit_mqa.create_model("mnist-fast").save_pretrained("runs/default")
    _letters(tmp_path / "my-letters")
    hf = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, image_size=32, patch_size=8,
                                num_channels=3, num_labels=4)
    transformers.ViTForImageClassification(hf).save_pretrained(tmp_path / "hf-vit-dir")

    blocks = readme_python_blocks()
    assert len(blocks) == 3
    names: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), names)

    # The shapes the comments state.
    assert names["logits"].shape == (8, 10)
    assert names["tokens"].shape == (8, 17, 64) and names["pooled"].shape == (8, 64)
    assert len(names["maps"]) == 6 and names["maps"][0].shape == (8, 4, 17, 17)
    assert [b.shape for b in names["blocks"]] == [(8, 16, 64)] * 2
    assert {p.name for p in Path("my-model").iterdir()} == {
        "README.md", "config.json", "model.safetensors"}
    # The fine-tuned run: the new classes, the source's normalisation, read at 28x28 gray.
    config = json.loads(Path("runs/letters/config.json").read_text())
    assert config["model"]["classes"] == ["a", "b", "c"]
    assert config["model"]["preprocess"]["mean"] == [0.5]
    assert config["model"]["image_size"] == [28, 28]
    assert names["probe"].head.out_features == 3
    assert Path("mqa.onnx").stat().st_size > 0
    assert names["mqa"].config.num_kv_heads == 1
    assert names["mqa"].classes == names["mha"].classes  # the identity survives conversion
