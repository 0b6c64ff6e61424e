"""Prediction on people's images, with the preprocessing saved in the run's config.

The run's ``preprocess.procedure`` says how an arbitrary picture is made to look like
the training data: "mnist" and "fashion-mnist" redo those datasets' normalisation
(polarity, background, crop, scale, centring), image-folder runs fit the picture as
they did in training ("stretch", "pad", "center-crop"). See :mod:`vit_mqa.data.preprocess`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoint import WEIGHTS_NAME
from ..data.images import list_images
from ..data.preprocess import ImageInput, Preprocess, check_procedure, prepare
from ..errors import VitMqaError
from ..models.hub import run_temperature, run_thresholds
from ..models.vit import load_model_dir

_SINGLE = (str, Path, Image.Image, np.ndarray, torch.Tensor)


# A calibrated top probability under this is more likely wrong than right: "unsure".
# A calibrated top probability under one half: the model is more likely wrong than right.
DEFAULT_MIN_CONFIDENCE = 0.5


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-T * logsumexp(logits / T) per row (Liu et al. 2020): low for inputs like the
    training classes, high for what is none of them."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def none_of_these(classes: Sequence[str]) -> str:
    """How a declined picture is named: "not a digit" for a digit model, else "none of
    these"."""
    return "not a digit" if list(classes) == [str(i) for i in range(10)] else "none of these"


def decide(logits: torch.Tensor, temperature: float, min_confidence: float,
           unknown_energy: float | None) -> tuple[list[str], torch.Tensor]:
    """Each row's decision, "answer", "unsure" or "unknown" (none of the classes), and
    its energy (higher: less like the classes), from logits (N, classes): "unknown" above
    ``unknown_energy``, else "unsure" under a calibrated top probability of
    ``min_confidence``."""
    e = energy(logits, temperature)
    top = (logits.float() / temperature).softmax(dim=-1).max(dim=-1).values
    decisions = ["unknown" if unknown_energy is not None and v > unknown_energy
                 else "unsure" if p < min_confidence else "answer"
                 for v, p in zip(e.tolist(), top.tolist())]
    return decisions, e


class Predictor:
    """Top-k classification of images of any size, mode and kind.

    >>> predictor = Predictor("runs/mnist-fast")            # doctest: +SKIP
    >>> predictor.predict(["digit.png"], top_k=3)           # doctest: +SKIP
    [{'path': 'digit.png', 'top': [{'class': '7', 'index': 7, 'probability': 0.98}, ...]}]
    >>> predictor.prepare(pil_image).shape                  # doctest: +SKIP
    torch.Size([1, 28, 28])

    ``procedure`` overrides the run's recorded one (runs saved before it was recorded get
    their dataset's procedure when trained on MNIST or Fashion-MNIST, else "stretch").
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device = "cpu",
                 weights: str = WEIGHTS_NAME, batch_size: int = 256,
                 procedure: str | None = None, onnx: str | Path | None = None,
                 min_confidence: float | None = None) -> None:
        if min_confidence is not None and not 0 <= min_confidence <= 1:
            raise VitMqaError(f"min_confidence must be in [0, 1], got {min_confidence}")
        self.device = torch.device(device)
        self.model, config = load_model_dir(run_dir, weights, self.device)
        where = Path(str(run_dir)) / "config.json"
        # Logits are divided by the run's fitted temperature (1 for runs without one), so
        # that probabilities are calibrated; the thresholds fitted with it decide "unsure"
        # and "none of these" (runs without them: unsure under 50 %, never "unknown").
        self.temperature = run_temperature(config, where)
        thresholds = run_thresholds(config, where)
        self.unknown_energy: float | None = thresholds.get("unknown_energy")
        self.min_confidence = (min_confidence if min_confidence is not None
                               else thresholds.get("unsure_below", DEFAULT_MIN_CONFIDENCE))
        # ``onnx``: the network runs from this file in onnxruntime (an `export --int8`
        # file, say); the run still gives the classes and the preprocessing.
        self.session = _onnx_session(onnx, self.model) if onnx is not None else None
        self.preprocess = self.model.preprocess
        if procedure is not None:
            self.preprocess.procedure = procedure
        check_procedure(self.preprocess.procedure)
        self.classes: list[str] = self.model.classes
        self.batch_size = batch_size

    @property
    def procedure(self) -> str:
        return self.preprocess.procedure

    def prepare(self, image: ImageInput, raw: bool = False) -> torch.Tensor:
        """One image (path, PIL image, numpy (H, W[, C]) or tensor ([C,] H, W)) -> uint8
        (C, H, W) at the model's size after the run's procedure.

        raw=True only stretches to the size (for inputs already in the dataset's format).
        Raises VitMqaError for an unreadable file or, with the MNIST-family procedures,
        "no ink found in ...: the image is blank".
        """
        p = self.preprocess
        return prepare(image, tuple(p.image_size), p.in_channels, p.procedure, raw)

    def load(self, paths: Sequence[str | Path], raw: bool = False
             ) -> tuple[list[Path], torch.Tensor]:
        """Image files (folders searched recursively) -> uint8 batch (N, C, H, W)."""
        files = list_images(paths)
        if not files:
            raise VitMqaError("no image files found in " + ", ".join(map(str, paths)))
        return files, torch.stack([self.prepare(f, raw) for f in files])

    @torch.inference_mode()
    def logits(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) at the model's size -> float32 logits (N, classes)."""
        self.model.eval()
        out = []
        for start in range(0, images_uint8.shape[0], self.batch_size):
            chunk = images_uint8[start:start + self.batch_size]
            if self.session is not None:
                out.append(onnx_logits(self.session, chunk, self.preprocess))
            else:
                out.append(self.model(self.preprocess(chunk.to(self.device))).float().cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def probabilities(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) at the model's size -> calibrated class probabilities
        (N, classes)."""
        return (self.logits(images_uint8) / self.temperature).softmax(dim=-1)

    def evaluate_folder(self, root: str | Path, raw: bool = False) -> dict[str, Any]:
        """Accuracy on a folder of images laid out root/<class name>/..., after the run's
        procedure (or raw). Unreadable or blank images count as wrong and are listed."""
        return folder_accuracy(self, root, raw)

    def predict(self, inputs: ImageInput | Sequence[ImageInput], top_k: int = 5,
                raw: bool = False, errors: str = "raise") -> list[dict[str, Any]]:
        """Top-k classes of each input, best first.

        inputs: one image or a list of them; paths may be folders (searched recursively).
        Each result is {"path": ..., "top": [{"class", "index", "probability"}, ...],
        "unsure": bool, "decision": ..., "energy": float} for files, {"input": position,
        ...} for in-memory images; "unsure" is a top probability (calibrated by the run's
        temperature) under ``min_confidence``; "decision" is "unknown" (none of the
        classes: an energy above the run's fitted threshold), else "unsure", else
        "answer". A declined picture is an answer, not an error. errors="record"
        turns an image that cannot be prepared (unreadable, blank, or any failure of its
        own) into {"path"/"input": ..., "error": message} instead of raising, so that the
        other images are still predicted.
        """
        if errors not in ("raise", "record"):
            raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
        results, tensors = prepare_inputs(inputs, lambda item: self.prepare(item, raw), errors)
        ok = [r for r in results if "error" not in r]
        if tensors:
            logits = self.logits(torch.stack(tensors))
            add_top_k(ok, (logits / self.temperature).softmax(dim=-1), self.classes, top_k,
                      self.min_confidence)
            decisions, energies = decide(logits, self.temperature, self.min_confidence,
                                         self.unknown_energy)
            for r, decision, e in zip(ok, decisions, energies.tolist()):
                r["decision"], r["energy"] = decision, e
        return results


def folder_accuracy(predictor: Predictor, root: str | Path, raw: bool) -> dict[str, Any]:
    """``Predictor.evaluate_folder``."""
    root = check_class_folders(root, predictor.classes)
    correct, total, failed = 0, 0, []
    for index, name in enumerate(predictor.classes):
        if not (root / name).is_dir() or not list_images([root / name]):
            continue
        results = predictor.predict([root / name], top_k=1, raw=raw, errors="record")
        total += len(results)
        failed += [r["error"] for r in results if "error" in r]
        correct += sum(r["top"][0]["index"] == index for r in results if "top" in r)
    if total == 0:
        raise VitMqaError(f"no images found under {root}/<class>/")
    return {"accuracy": correct / total, "correct": correct, "num_images": total,
            "failed": failed}


def prepare_inputs(inputs: ImageInput | Sequence[ImageInput],
                   prepare_one: Callable[[ImageInput], torch.Tensor], errors: str
                   ) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """(the start of each image's result, the prepared images) for ``inputs``, one image
    or a list of them; paths may be folders (searched recursively). A result starts as
    {"path": file} for files, {"input": position} for in-memory images; with
    errors="record", an image that ``prepare_one`` cannot prepare, for whatever reason
    but lack of memory, gets "error": a one-line message naming it, and no tensor,
    instead of raising."""
    items = [inputs] if isinstance(inputs, _SINGLE) else list(inputs)
    keyed: list[tuple[dict[str, Any], ImageInput]] = []
    for n, item in enumerate(items):
        if isinstance(item, (str, Path)):
            found = list_images([item])
            if not found and Path(item).is_dir():
                raise VitMqaError(f"no image files found in {item}")
            keyed.extend(({"path": str(f)}, f) for f in found)
        else:
            keyed.append(({"input": n}, item))
    if not keyed:
        raise VitMqaError("no images given")
    results: list[dict[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for key, item in keyed:
        try:
            tensors.append(prepare_one(item))
            results.append(dict(key))
        except MemoryError:
            raise
        except Exception as e:
            # Any failure stays this image's own (prepare() turns surprises into
            # VitMqaError already; a caller's prepare_one may not), named by its path.
            if errors == "raise":
                raise
            results.append({**key, "error": _naming(key, e)})
    return results, tensors


def _naming(key: dict[str, Any], error: Exception) -> str:
    """``error`` as one line that names the image: "<path>: <reason>" unless the message
    names it already."""
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, VitMqaError):
        text = f"{type(error).__name__}: {text}"
    name = key["path"] if "path" in key else f"input {key['input']}"
    return text if name in text else f"{name}: {text}"


def add_top_k(results: list[dict[str, Any]], probabilities: torch.Tensor, classes: list[str],
              top_k: int, min_confidence: float) -> None:
    """Fill each result's "top" (the ``top_k`` likeliest classes, best first) and "unsure"
    (a top probability under ``min_confidence``) from its row of ``probabilities``."""
    k = max(1, min(top_k, len(classes)))
    values, indices = probabilities.topk(k, dim=-1)
    for r, vs, ix in zip(results, values.tolist(), indices.tolist()):
        r["top"] = [{"class": classes[i], "index": int(i), "probability": float(v)}
                    for v, i in zip(vs, ix)]
        r["unsure"] = vs[0] < min_confidence


def check_class_folders(root: str | Path, classes: list[str]) -> Path:
    """``root`` as a Path, checked to be a folder whose sub-folders are all class names."""
    root = Path(root)
    if not root.is_dir():
        raise VitMqaError(f"image folder {root} does not exist")
    unknown = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise VitMqaError(f"{root}: folders {unknown} are not classes of the run "
                          f"({', '.join(classes)})")
    return root


def _onnx_session(path: str | Path, model: torch.nn.Module) -> Any:
    """An onnxruntime session for an exported model, checked to take this run's input."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise VitMqaError("running an ONNX file needs onnxruntime: "
                          "pip install 'vit-mqa[onnx]'") from None
    if not Path(path).is_file():
        raise VitMqaError(f"ONNX file {path} does not exist")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for a file it cannot load
        raise VitMqaError(f"cannot load ONNX file {path}: "
                          f"{str(e).strip().splitlines()[0][:200]}") from None
    inputs, c = session.get_inputs(), model.config
    expected = [c.in_channels, *c.image_size]
    if [i.name for i in inputs] != ["images"] or list(inputs[0].shape[1:]) != expected:
        raise VitMqaError(f"ONNX file {path} does not take this run's input "
                          f"(images of shape [batch, {', '.join(map(str, expected))}])")
    if session.get_outputs()[0].shape[-1] != c.num_classes:
        raise VitMqaError(f"ONNX file {path} has {session.get_outputs()[0].shape[-1]} "
                          f"outputs; the run has {c.num_classes} classes")
    return session


def onnx_logits(session: Any, images_uint8: torch.Tensor, preprocess: Preprocess
                ) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 logits (N, classes), the network run by an
    onnxruntime ``session``."""
    # All in numpy: a torch operation between onnxruntime calls leaves torch's threads
    # spinning while onnxruntime works, which halved its throughput on 2 cores.
    p = preprocess
    mean = np.asarray(p.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(p.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = (images_uint8.numpy().astype(np.float32) / 255 - mean) / std
    return torch.from_numpy(session.run(None, {"images": x})[0].astype(np.float32))
