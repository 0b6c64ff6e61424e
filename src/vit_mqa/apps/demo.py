"""``vit-mqa demo RUN``: a local web page to draw or upload a digit and see what the model
makes of it.

The page shows the top-k class probabilities, the normalised input the model actually
saw (after the run's preprocessing: polarity, crop, centre of mass for MNIST-style
runs), the attention rollout over that input, and the model's attention layout (how
many query heads share each key/value head, per layer).

Gradio is an optional extra (``pip install 'vit-mqa[demo]'``) and is imported only
here, only when the demo starts. Nothing on the page reaches the network: analytics,
version checks and Hugging Face telemetry are switched off, and the theme's fonts are
the ones bundled with gradio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import VitMqaError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# The overlay is drawn at this size: 28x28 is too small to read a heat map on screen.
OVERLAY_SIDE = 224
MISSING_GRADIO = "the demo needs gradio: pip install 'vit-mqa[demo]'"
BLANK_MESSAGE = ("No digit found: the canvas (or image) is blank. Draw a digit and press "
                 "Classify.")
CANNOT_CLASSIFY = "Cannot classify this image"

# Set before gradio is imported: some of these are read at import time.
_OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GRADIO_SSR_MODE": "False",  # server-side rendering would start a Node server
    "GRADIO_MCP_SERVER": "False",
}

_SELECT_BRUSH = """() => {
  const pick = (tries) => {
    const b = document.querySelector("#sketchpad button[aria-label='Brush']");
    if (b) b.click(); else if (tries > 0) setTimeout(() => pick(tries - 1), 200);
  };
  pick(25);
}"""


def import_gradio() -> Any:
    """gradio, imported with analytics and telemetry off; VitMqaError when missing."""
    for key, value in _OFFLINE_ENV.items():
        os.environ[key] = value
    try:
        import gradio
    except ImportError:
        raise VitMqaError(MISSING_GRADIO) from None
    return gradio


def _kind(num_heads: int, num_kv_heads: int) -> str:
    if num_kv_heads == 1:
        return "multi-query"
    if num_kv_heads == num_heads:
        return "multi-head"
    return "grouped-query"


def attention_layout(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per layer of a ``VisionTransformer``: query heads, K/V heads, and a sentence
    such as "4 query heads share 1 K/V head (multi-query)". Read from the attention
    modules themselves, so a converted or imported model is described as it is."""
    rows = []
    for i, block in enumerate(model.blocks):
        h, kv = block.attn.num_heads, block.attn.num_kv_heads
        kind = _kind(h, kv)
        if kv == h:
            text = f"{h} query heads, each with its own K/V head ({kind})"
        elif kv == 1:
            text = f"{h} query heads share 1 K/V head ({kind})"
        else:
            text = f"{h} query heads share {kv} K/V heads, {h // kv} per K/V head ({kind})"
        rows.append({"layer": i + 1, "query_heads": h, "kv_heads": kv, "kind": kind,
                     "text": text})
    return rows


def layout_markdown(model: torch.nn.Module) -> str:
    """The layout as a markdown table; consecutive identical layers share a row."""
    c = model.config
    groups: list[list[dict[str, Any]]] = []
    for r in attention_layout(model):
        if groups and groups[-1][-1]["text"] == r["text"]:
            groups[-1].append(r)
        else:
            groups.append([r])
    tokens = (f"patches of {c.patch_size}×{c.patch_size} px" if c.stem == "patch"
              else f"tokens from the {c.stem} stem")
    lines = [f"**Attention layout**: {c.depth} layers, dim {c.dim}, head dim "
             f"{c.dim // c.num_heads}, {c.grid_size[0]}×{c.grid_size[1]} {tokens}, "
             f"{c.pooling} pooling",
             "", "| layers | query heads | K/V heads | layout |", "|:--|--:|--:|:--|"]
    for g in groups:
        first, last = g[0]["layer"], g[-1]["layer"]
        span = str(first) if first == last else f"{first}–{last}"
        lines.append(f"| {span} | {g[0]['query_heads']} | {g[0]['kv_heads']} | "
                     f"{g[0]['text']} |")
    return "\n".join(lines)


@dataclass
class Analysis:
    """One classified image: top-k (class, probability), the normalised input the model
    saw (uint8 (H, W) or (H, W, 3)), and the attention rollout overlaid on it."""

    top: list[tuple[str, float]]
    model_input: np.ndarray
    overlay: np.ndarray
    decision: str = "answer"  # or "unsure", or "unknown": none of the classes

    @property
    def predicted(self) -> str:
        return self.top[0][0]


class DemoModel:
    """A run's predictor plus what the page needs: preparation, top-k and attention."""

    def __init__(self, run_dir: str | Path, device: str | torch.device = "cpu",
                 top_k: int = 5, procedure: str | None = None) -> None:
        from ..evaluation.predict import Predictor

        self.run_dir = Path(run_dir)
        self.predictor = Predictor(run_dir, device=device, procedure=procedure)
        self.top_k = max(1, min(top_k, len(self.predictor.classes)))

    def prepare(self, image: Any) -> torch.Tensor:
        """An image (PIL, numpy, path) -> uint8 (C, H, W) after the run's normalisation."""
        return self.predictor.prepare(image)

    def analyse(self, image: Any) -> Analysis:
        """Classify one image; VitMqaError for an image with no ink."""
        from ..evaluation.explain import model_relevance, overlay
        from ..evaluation.predict import decide

        p = self.predictor
        prepared = self.prepare(image)
        batch = prepared.unsqueeze(0)
        logits = p.logits(batch)
        decision = decide(logits, p.temperature, p.min_confidence, p.unknown_energy)[0][0]
        probs = (logits[0] / p.temperature).softmax(dim=-1)
        values, indices = probs.topk(self.top_k)
        top = [(p.classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]
        grid = model_relevance(p.model, p.preprocess(batch.to(p.device)))[0][0].cpu()
        seen = prepared.permute(1, 2, 0).numpy()
        seen = seen[:, :, 0] if seen.shape[2] == 1 else seen
        # The heat map is blended smoothly over the input shown pixel for pixel.
        return Analysis(top, seen, overlay(upscale(seen), grid, alpha=0.5), decision)


def upscale(image: np.ndarray, height: int = OVERLAY_SIDE) -> np.ndarray:
    """A small uint8 image -> ``height`` pixels high, with hard pixel edges (each input
    pixel a block), keeping the aspect ratio."""
    h, w = image.shape[:2]
    size = (max(1, round(height * w / h)), height)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST))


def _drawing(value: Any) -> np.ndarray | None:
    """The sketchpad's value -> its composite image, or None when nothing was drawn."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("composite")
    if value is None:
        return None
    return np.asarray(value)


def build_app(model: DemoModel) -> Any:
    """The gradio Blocks page for a loaded run."""
    from ..evaluation.predict import none_of_these

    gr = import_gradio()

    def classify(image: Any) -> tuple[Any, ...]:
        if image is None:
            return f"### {BLANK_MESSAGE}", None, None, None
        try:
            a = model.analyse(image)
        except VitMqaError as e:
            # A blank canvas must say so, not show a confident digit.
            text = BLANK_MESSAGE if "no ink" in str(e) or "blank" in str(e) else str(e)
            return f"### {text}", None, None, None
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as e:
            # One odd upload must not end in gradio's bare "Error" toast: say what failed,
            # in a line, and the page goes on serving the next image.
            return f"### {CANNOT_CLASSIFY}: {type(e).__name__}: {' '.join(str(e).split())}", \
                None, None, None
        if a.decision == "unknown":  # shown plainly instead of a digit
            verdict = f"### {none_of_these(model.predictor.classes).capitalize()}"
        else:
            verdict = (f"### Prediction: {a.predicted} ({100 * a.top[0][1]:.1f}%)"
                       + (" (unsure)" if a.decision == "unsure" else ""))
        return verdict, dict(a.top), upscale(a.model_input), a.overlay

    def classify_drawing(value: Any) -> tuple[Any, ...]:
        return classify(_drawing(value))

    title = f"vit-mqa demo: {model.run_dir.name or model.run_dir}"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nDraw a digit (or upload an image) and press Classify. "
                    "The model sees the normalised input (the run's own preprocessing); "
                    "the heat map is the attention rollout for this prediction.")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Draw"):
                    pad = gr.Sketchpad(
                        type="numpy", image_mode="RGBA", canvas_size=(280, 280),
                        fixed_canvas=True, layers=False, transforms=(), height=340,
                        brush=gr.Brush(default_size=18, colors=["#000000"],
                                       color_mode="fixed"),
                        label="Draw a digit", elem_id="sketchpad")
                    draw_btn = gr.Button("Classify drawing", variant="primary",
                                         elem_id="classify-drawing")
                with gr.Tab("Upload"):
                    upload = gr.Image(type="pil", sources=["upload"], label="Image file",
                                      height=340, elem_id="upload")
                    upload_btn = gr.Button("Classify upload", variant="primary",
                                           elem_id="classify-upload")
                gr.Markdown(layout_markdown(model.predictor.model), elem_id="layout")
            with gr.Column(scale=1):
                verdict = gr.Markdown("### Draw a digit and press Classify.",
                                      elem_id="prediction")
                label = gr.Label(num_top_classes=model.top_k, label="Top classes",
                                 elem_id="probabilities")
                with gr.Row():
                    # No share button: it would upload the image to a public service.
                    seen = gr.Image(label="Model input (normalised)", interactive=False,
                                    buttons=["download", "fullscreen"], elem_id="model-input")
                    heat = gr.Image(label="Attention rollout", interactive=False,
                                    buttons=["download", "fullscreen"], elem_id="attention")
        outputs = [verdict, label, seen, heat]
        draw_btn.click(classify_drawing, pad, outputs)
        upload_btn.click(classify, upload, outputs)
        upload.upload(classify, upload, outputs)
        # Start with the brush selected, so the first stroke draws.
        app.load(None, js=_SELECT_BRUSH)
    return app


MAX_UPLOAD = "20mb"


def _check_address(host: str, port: int) -> None:
    """One clear line for a busy port or an address this machine does not have (gradio's
    own message talks about its launch() arguments)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            s.bind(infos[0][4])
    except OSError as e:
        raise VitMqaError(f"cannot serve on {host}:{port}: {e.strerror or e}; choose "
                          "another `port` or `host`") from None


def serve(run_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          device: str = "cpu", top_k: int = 5, procedure: str | None = None) -> None:
    """Start the demo and block until interrupted; prints the URL once it is up."""
    from ..device import pick_device

    if not 0 < port < 65536:
        raise VitMqaError(f"`port` must be in 1..65535, got {port}")
    import_gradio()  # the missing-extra message before loading anything else
    _check_address(host, port)
    dev = pick_device(device)
    if dev.type == "cpu":
        # One image per request: intra-op threads only add synchronisation, and on a busy
        # machine they made a 28x28 forward pass 100x slower (0.6 s instead of 5 ms).
        torch.set_num_threads(1)
    model = DemoModel(run_dir, device=dev, top_k=top_k, procedure=procedure)
    app = build_app(model)
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, quiet=True,
                           prevent_thread_lock=True, ssr_mode=False, mcp_server=False,
                           inbrowser=False, show_error=True,
                           # A photo is a few MB; far larger is refused at once with a
                           # message, rather than read into memory first.
                           max_file_size=MAX_UPLOAD)
    print(f"vit-mqa demo: {run_dir} served at {url} (Ctrl+C to stop)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
