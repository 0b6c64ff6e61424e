"""Weights in and out: multi-head ViTs from Hugging Face transformers and timm,
conversion to grouped / multi-query attention, position-embedding resampling, ONNX.

Imported models have ``num_kv_heads == num_heads``: the multi-head layer is our
grouped-query layer with one query head per K/V head, so logits match the source.
``convert_kv_heads`` then mean-pools each group's K and V projection heads
(Ainslie et al. 2023) to get a GQA or MQA model to uptrain.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import describe_mismatch, read_json
from ..errors import VitMqaError
from .vit import VisionTransformer, ViTConfig

# ---------------------------------------------------------------- position embeddings


# ---------------------------------------------------------------- Hugging Face transformers


def _hf_mlp_ratio(hidden: int, intermediate: int) -> float:
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:
        raise VitMqaError(f"intermediate_size {intermediate} is not expressible as a ratio "
                          f"of hidden_size {hidden}")
    return ratio


def _hf_number(hf: dict[str, Any], key: str, default: float, integer: bool = True) -> Any:
    """A positive number from a Hugging Face config, or a one-line error naming the key."""
    value = hf.get(key, default)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)
    if ok and integer:
        ok = float(value).is_integer() and value <= 2**31
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise VitMqaError(f"config.json: {key} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _hf_classes(hf: dict[str, Any]) -> list[str]:
    """Class names from id2label, whose keys must be the indices 0 .. n-1."""
    id2label = hf.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise VitMqaError("config.json: id2label must be an object of index -> label")
    try:
        indices = sorted(int(k) for k in id2label)
    except ValueError:
        raise VitMqaError("config.json: id2label keys must be class indices "
                          f"(0, 1, ...), got {sorted(id2label)[:3]}") from None
    if indices != list(range(len(indices))):
        raise VitMqaError("config.json: id2label keys must be the indices 0 .. n-1")
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def config_from_hf(hf: dict[str, Any]) -> ViTConfig:
    """ViTConfig equivalent to a transformers ``ViTConfig`` (as a dict from config.json)."""
    if not isinstance(hf, dict):
        raise VitMqaError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "vit") != "vit":
        raise VitMqaError(f"model_type {hf.get('model_type')!r} is not a plain ViT")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise VitMqaError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'gelu')")
    num_classes = len(_hf_classes(hf)) or _hf_number(hf, "num_labels", 2)
    heads = _hf_number(hf, "num_attention_heads", 12)
    hidden = _hf_number(hf, "hidden_size", 768)
    qkv_bias = hf.get("qkv_bias", True)
    if not isinstance(qkv_bias, bool):
        raise VitMqaError(f"config.json: qkv_bias must be true or false, got {qkv_bias!r}")
    return ViTConfig(
        image_size=_hf_number(hf, "image_size", 224), patch_size=_hf_number(hf, "patch_size", 16),
        in_channels=_hf_number(hf, "num_channels", 3), num_classes=num_classes,
        dim=hidden, depth=_hf_number(hf, "num_hidden_layers", 12),
        num_heads=heads, num_kv_heads=heads,
        mlp_ratio=_hf_mlp_ratio(hidden, _hf_number(hf, "intermediate_size", 3072)),
        qkv_bias=qkv_bias, pooling="cls", pos_embed="learned",
        norm_eps=_hf_number(hf, "layer_norm_eps", 1e-12, integer=False),
    )


def state_dict_from_hf(hf_state: dict[str, torch.Tensor],
                       config: ViTConfig) -> dict[str, torch.Tensor]:
    """Map a ``ViTForImageClassification`` state dict onto vit-mqa's names."""
    s = {k.removeprefix("vit."): v for k, v in hf_state.items()}
    out = {
        "cls_token": s["embeddings.cls_token"],
        "pos_embed": s["embeddings.position_embeddings"],
        "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": s["layernorm.weight"],
        "norm.bias": s["layernorm.bias"],
        "head.weight": s["classifier.weight"],
        "head.bias": s["classifier.bias"],
    }
    for i in range(config.depth):
        p = f"encoder.layer.{i}."
        a = p + "attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [s[a + "query.weight"], s[a + "key.weight"], s[a + "value.weight"]])
        if config.qkv_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                [s[a + "query.bias"], s[a + "key.bias"], s[a + "value.bias"]])
        pairs = {"attn.proj": "attention.output.dense", "norm1": "layernorm_before",
                 "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                 "mlp.fc2": "output.dense"}
        for ours, theirs in pairs.items():
            out[f"blocks.{i}.{ours}.weight"] = s[p + theirs + ".weight"]
            out[f"blocks.{i}.{ours}.bias"] = s[p + theirs + ".bias"]
    return out


# ---------------------------------------------------------------- timm


TIMM_UNSUPPORTED = ("reg_token", "fc_norm.weight", "blocks.0.ls1.gamma", "attn_pool.latent",
                    "blocks.0.attn.norm.weight")


def config_from_timm(state: dict[str, torch.Tensor], num_heads: int | None = None,
                     num_classes: int | None = None) -> ViTConfig:
    """Infer a ViTConfig from a timm ``VisionTransformer`` state dict.

    Head count is not in the weights' shapes; by default it is dim // 64, as in every
    standard ViT (Ti/3, S/6, B/12, L/16).
    """
    bad = [k for k in TIMM_UNSUPPORTED if k in state]
    if bad:
        raise VitMqaError(f"timm checkpoint uses features vit-mqa does not have: {bad}")
    if "blocks.0.attn.qkv.weight" not in state:
        raise VitMqaError("not a timm VisionTransformer state dict (no blocks.0.attn.qkv.weight)")
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "head.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise VitMqaError(f"incomplete timm state dict: no {', '.join(absent)}")
    if state["patch_embed.proj.weight"].ndim != 4 or state["pos_embed"].ndim != 3:
        raise VitMqaError("timm state dict: patch_embed.proj.weight or pos_embed has the "
                          "wrong number of dimensions")
    dim = state["patch_embed.proj.weight"].shape[0]
    in_channels, patch = state["patch_embed.proj.weight"].shape[1:3]
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    except ValueError:
        raise VitMqaError("timm state dict: block names are not blocks.N.*") from None
    has_cls = "cls_token" in state
    tokens = state["pos_embed"].shape[1] - (1 if has_cls else 0)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise VitMqaError(f"pos_embed holds {tokens} patch positions: not a square grid")
    heads = num_heads or max(dim // 64, 1)
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    return ViTConfig(
        image_size=side * patch, patch_size=patch, in_channels=in_channels,
        num_classes=num_classes or state["head.weight"].shape[0], dim=dim, depth=depth,
        num_heads=heads, num_kv_heads=heads, mlp_ratio=mlp / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state, pooling="cls" if has_cls else "mean",
        pos_embed="learned", qk_norm="blocks.0.attn.q_norm.weight" in state, norm_eps=1e-6,
    )


def state_dict_from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's names are vit-mqa's names (fused [q; k; v] qkv, blocks.N.*, norm, head)."""
    return {k: v for k, v in state.items() if not k.startswith("head_drop")}


# ---------------------------------------------------------------- loading sources


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # several unrelated types for a bad file
        if isinstance(e, pickle.UnpicklingError):
            why = "not a tensor checkpoint (torch.save of a state dict, or safetensors)"
        else:
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        raise VitMqaError(f"cannot read weights {path}: {why}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise VitMqaError(f"{path} does not hold a state dict of named tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_external(source: str | Path, num_heads: int | None = None
                  ) -> tuple[VisionTransformer, dict[str, Any]]:
    """A Hugging Face ViT directory or a timm state-dict file -> (vit-mqa model, extras).

    extras holds "classes" when the source names them.
    """
    source = Path(source)
    extras: dict[str, Any] = {}
    if source.is_dir():
        cfg_path = source / "config.json"
        if not cfg_path.is_file():
            raise VitMqaError(f"{source} has no config.json: not a Hugging Face model directory")
        hf = read_json(cfg_path, f"cannot parse {cfg_path}")
        if not isinstance(hf, dict):
            raise VitMqaError(f"{cfg_path} must hold a JSON object, got {type(hf).__name__}")
        if "model" in hf and "vit_mqa_version" in hf:
            raise VitMqaError(f"{source} is already a vit-mqa directory")
        weights = next((source / n for n in ("model.safetensors", "pytorch_model.bin")
                        if (source / n).is_file()), None)
        if weights is None:
            raise VitMqaError(f"{source} has neither model.safetensors nor pytorch_model.bin")
        config = config_from_hf(hf)
        try:
            state = state_dict_from_hf(_read_state_file(weights), config)
        except KeyError as e:
            raise VitMqaError(f"{weights} has no tensor {e.args[0]!r}: do config.json's "
                              "num_hidden_layers and qkv_bias match the weights?") from None
        classes = _hf_classes(hf)
        if classes:
            extras["classes"] = classes
    elif source.is_file():
        raw = _read_state_file(source)
        if any(k.startswith(("vit.", "embeddings.")) for k in raw):
            raise VitMqaError(f"{source} looks like a Hugging Face state dict: pass its "
                              "directory (with config.json) instead")
        config = config_from_timm(raw, num_heads)
        state = state_dict_from_timm(raw)
    else:
        raise VitMqaError(f"no such file or directory: {source}")
    # Shapes are checked on a skeleton that holds no memory, before the model is built.
    with torch.device("meta"):
        skeleton = VisionTransformer(config)
    mismatch = describe_mismatch({k: tuple(v.shape) for k, v in state.items()},
                                 {k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
    if mismatch:
        raise VitMqaError(f"{source}: weights do not fit the config: {mismatch}")
    not_float = sorted(k for k, v in state.items() if not v.is_floating_point())
    if not_float:
        raise VitMqaError(f"{source}: {not_float[0]} is {state[not_float[0]].dtype}, "
                          "not a float tensor")
    model = VisionTransformer(config)
    model.load_state_dict(state)
    # Both Hugging Face ViT and timm's original ViT weights scale pixels to [-1, 1], which
    # is what a new model's preprocess does.
    model.classes = list(extras.get("classes", model.classes))
    return model.eval(), extras


# ---------------------------------------------------------------- GQA / MQA conversion


# ---------------------------------------------------------------- ONNX


def export_onnx(model: VisionTransformer, path: str | Path, opset: int = 18,
                verify: bool = False, tolerance: float = 1e-4, int8: bool = False
                ) -> float | None:
    """Export with a dynamic batch dimension (input "images", output "logits").

    ``int8``: the Linear layers' weights quantised to int8, activations quantised per
    batch at run time (ONNX Runtime's dynamic quantisation): about a quarter of the
    file, and faster matrix products on CPUs with int8 dot-product instructions.
    ``verify`` runs the file in onnxruntime on batches of 1 and 3 random images and
    returns the largest difference from PyTorch's logits; above ``tolerance`` (fp32
    only: int8 rounds by design, its accuracy is measured on data instead) the file is
    removed and VitMqaError raised.
    """
    from ..checkpoint import atomic_write

    c = model.config
    example = torch.randn(2, c.in_channels, *c.image_size)
    model = model.eval()
    if verify or int8:
        try:
            import onnxruntime as ort
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError:
            raise VitMqaError("checking or quantising the export needs onnxruntime: "
                              "pip install 'vit-mqa[onnx]'") from None

    def export(destination: Path) -> None:
        # The exporter narrates its passes on stdout and warns about its own internals.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            try:
                program = torch.onnx.export(
                    model, (example,), None, input_names=["images"], output_names=["logits"],
                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True,
                    opset_version=opset, verbose=False)
            except ImportError as e:
                raise VitMqaError(f"ONNX export needs onnx and onnxscript ({e.name} is "
                                  "missing): pip install 'vit-mqa[onnx]'") from None
        program.save(str(destination))

    def write(tmp: Path) -> None:
        if not int8:
            export(tmp)
            return
        fp32 = tmp.with_name(tmp.name + ".fp32.onnx")
        try:
            export(fp32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs advice
                quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            fp32.unlink(missing_ok=True)

    atomic_write(path, write)
    if not verify:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, c.in_channels, *c.image_size)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        worst = max(worst, float(abs(got - expected).max()))
    if not math.isfinite(worst) or (not int8 and worst > tolerance):
        Path(path).unlink(missing_ok=True)
        raise VitMqaError(f"ONNX output differs from PyTorch by {worst:.2e} (> {tolerance:g}); "
                          "not written")
    return worst


