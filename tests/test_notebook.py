"""example.ipynb runs top to bottom (with a small step budget) and shows its results."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def test_example_notebook_executes(tmp_path, data_root):
    nb = nbformat.read(REPO / "example.ipynb", as_version=4)
    # The committed notebook holds the outputs of a real, full run.
    committed = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" for o in committed)
    env = {"VIT_MQA_NOTEBOOK_STEPS": "40", "VIT_MQA_NOTEBOOK_RUN": str(tmp_path / "run"),
           "VIT_MQA_DATA": str(data_root)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # samples, curves, predictions, confusion, attention
    text = "".join(o.get("text", "") for o in outputs)
    assert "test accuracy" in text
    assert (tmp_path / "run" / "model.safetensors").is_file()
