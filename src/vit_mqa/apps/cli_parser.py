"""The ``vit-mqa`` command's arguments: every subcommand's flags and help.

Every setting of every config section is also a flag of ``vit-mqa train``
(``--num-kv-heads 2``, ``--lr 1e-3``, ``--no-qkv-bias``), generated from the config
dataclasses so that flags, JSON config files and presets can never drift apart. Imports no
torch, so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NoReturn

from .._version import __version__

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool,
                           "int | None": int, "str | None": str, "float | None": float}


def _duration(text: str) -> float:
    from ..config.recipe import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_PARSERS: dict[str, Any] = {"time_budget": _duration}
_METAVARS = {"int": "N", "float": "X", "str": "TEXT", "dataset": "NAME_OR_FOLDER",
             "data_dir": "DIR", "device": "DEVICE", "time_budget": "DURATION"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"vit-mqa: error: {message}\n")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of every config section, documented by the setting's own
    documentation, showing the default a plain `vit-mqa train` uses (the default preset's)."""
    from ..config.checks import CHOICES
    from ..config.presets import DEFAULT_PRESET
    from ..config.recipe import DERIVED_MODEL_FIELDS, build_config, field_docs
    from ..config.sections import SECTIONS

    defaults = build_config(DEFAULT_PRESET)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(
            f"{section} settings (shown: the {DEFAULT_PRESET} preset's value; --preset, "
            "--config and these flags override it)")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if section == "model" and f.name in DERIVED_MODEL_FIELDS:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = _PARSERS.get(f.name) or _TYPES.get(str(f.type))
            if kind is None:
                raise TypeError(f"no flag type for {section}.{f.name}: {f.type}")
            default = defaults[section][f.name]
            shown = "unset" if default is None else default
            text = f"{docs[f.name]} (default: {shown})".replace("%", "%%")
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=text)
            else:
                choices = CHOICES.get(f.name)
                metavar = ("{" + ",".join(choices) + "}" if choices else
                           _METAVARS.get(f.name) or _METAVARS[kind.__name__])
                group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                   choices=choices, metavar=metavar, help=text)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), "
                        "cpu, cuda, cuda:N, mps (default: auto)")


def _add_top_k(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=5, metavar="K",
                        help="how many of the likeliest classes to show (default: 5)")


def _add_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=("best", "last"), default="best",
                        help="the run's selected weights (the best epoch by validation "
                        "accuracy, or the last with --select last), or the last epoch's "
                        "(default: best)")


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def _add_train_flags(t: argparse.ArgumentParser) -> None:
    """`vit-mqa train`'s own flags, then one per setting."""
    from ..config.presets import DEFAULT_PRESET, PRESETS

    t.add_argument("--preset", choices=tuple(PRESETS), metavar="NAME",
                   help=f"named recipe: {', '.join(PRESETS)} (`vit-mqa presets` shows them; "
                   f"default: {DEFAULT_PRESET})")
    t.add_argument("--config", metavar="FILE", help="JSON file with model/data/augment/train "
                   "sections, layered over the preset")
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/PRESET-TIME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last epoch")
    t.add_argument("--init-from", metavar="RUN_DIR", help="fine-tune: start from a run's or "
                   "model directory's weights (or a Hugging Face Hub model id); another number "
                   "of classes gets a new head, another image size resampled position "
                   "embeddings")
    t.add_argument("--quiet", action="store_true", help="no progress or epoch lines")
    _add_setting_flags(t)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the ``command`` about to run, the other commands'
    settings are left out (a plain `vit-mqa predict` then loads no presets or recipes)."""
    parser = _Parser(prog="vit-mqa", description="Vision Transformers with multi-query / "
                     "grouped-query attention: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"vit-mqa {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, title="commands",
                                metavar="COMMAND")
    run_dir = {"metavar": "RUN_DIR", "help": "a training run's folder, a model folder "
               "(config.json + model.safetensors), a built-in model (vit-mqa/mnist, "
               "vit-mqa/fashion-mnist: `vit-mqa models`), or a Hugging Face Hub model id"}
    procedures = ("stretch", "pad", "center-crop", "mnist", "fashion-mnist")

    t = sub.add_parser("train", help="train a model; writes a run directory")
    if command in (None, "train"):
        _add_train_flags(t)

    e = sub.add_parser("eval", help="test accuracy, per-class accuracy, confusion matrix")
    e.add_argument("run_dir", **run_dir)
    e.add_argument("--split", choices=("test", "val"), default="test",
                   help="which split to score (default: test)")
    _add_weights(e)
    e.add_argument("--data-dir", help="where the dataset files are (default: the run's, then "
                   "the lookup order)")
    e.add_argument("--tta", choices=("none", "flip", "shift", "flip+shift"), default="none",
                   help="test-time augmentation: average the probabilities of a horizontal "
                   "flip and/or 1-pixel shifts (default: none)")
    _add_device(e)
    _add_json(e, "the report")

    r = sub.add_parser("report", help="figures of a run (curves, confusion matrix, mistakes, "
                       "attention) and an index.html, in RUN_DIR/report")
    r.add_argument("run_dir", **run_dir)
    _add_weights(r)
    r.add_argument("--data-dir", help="where the dataset files are (default: the run's, then "
                   "the lookup order)")
    _add_device(r)
    r.add_argument("--samples", type=int, default=10, help="test images in the attention "
                   "figures (default: 10)")
    r.add_argument("--seed", type=int, default=0, help="chooses the sample images (default: 0)")

    k = sub.add_parser("calibrate", help="fit a run's temperature and its thresholds for "
                       "unsure and none of these again, on its validation images")
    k.add_argument("run_dir", metavar="RUN_DIR", help="a training run's folder")
    for flag, share in (("--decline-unknown", "none of these"), ("--decline-unsure", "unsure")):
        k.add_argument(flag, type=float, metavar="SHARE", help=f"share of the validation "
                       f"images to decline as {share} (default: the run's setting)")
    k.add_argument("--data-dir", help="where the dataset files are (default: the run's, then "
                   "the lookup order)")
    _add_device(k)

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("run_dir", **run_dir)
    p.add_argument("paths", metavar="IMAGE_OR_FOLDER", nargs="+",
                   help="image files, or folders searched for them")
    _add_top_k(p)
    _add_weights(p)
    _add_device(p)
    _add_json(p, "the predictions (an image that failed: its path and \"error\")")
    p.add_argument("--raw", action="store_true", help="images already in the dataset's "
                   "format: only stretch them to the model's size, skip the run's procedure")
    p.add_argument("--procedure", choices=procedures,
                   help="override the run's recorded preprocessing (runs saved before it "
                   "was recorded use stretch)")
    p.add_argument("--min-confidence", type=float, metavar="P", help="flag a prediction "
                   "whose top probability (calibrated by the run's fitted temperature) is "
                   "under P as unsure (default: 0.5, more likely wrong than right)")
    p.add_argument("--onnx", metavar="FILE", help="run the network from this ONNX file in "
                   "onnxruntime, e.g. an int8 one from `vit-mqa export --int8` (the run still "
                   "gives the classes and preprocessing)")

    i = sub.add_parser("import", help="a Hugging Face ViT directory or a timm state dict "
                       "-> a vit-mqa model directory (multi-head)")
    i.add_argument("source", metavar="SRC", help="HF directory (config.json + weights) or a "
                   "timm .safetensors/.pth file")
    i.add_argument("dest", metavar="DST", help="the model directory to write (new or empty)")
    i.add_argument("--num-heads", type=int, help="timm only: heads (default: dim // 64)")
    i.add_argument("--image-size", type=int, nargs="+", metavar="N",
                   help="target image size (H [W]); position embeddings are resampled")

    c = sub.add_parser("convert", help="mean-pool K/V heads: multi-head -> grouped/multi-query")
    c.add_argument("source", metavar="SRC", help="run or model directory")
    c.add_argument("dest", metavar="DST", help="the model directory to write (new or empty)")
    c.add_argument("--num-kv-heads", "--kv-heads", dest="kv_heads", type=int, required=True,
                   help="K/V heads after conversion (1: multi-query)")

    x = sub.add_parser("export", help="ONNX export with a dynamic batch, checked with "
                       "onnxruntime (needs vit-mqa[onnx])")
    x.add_argument("run_dir", **run_dir)
    x.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    _add_weights(x)
    x.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    x.add_argument("--int8", action="store_true", help="quantise the Linear layers' weights "
                   "to int8 (activations per batch at run time): a smaller file, faster on "
                   "CPUs with int8 dot products")

    d = sub.add_parser("demo", help="a local web page: draw or upload a digit, see the "
                       "prediction and its attention (needs vit-mqa[demo])")
    d.add_argument("run_dir", **run_dir)
    d.add_argument("--host", default="127.0.0.1", help="interface to bind (default: "
                   "127.0.0.1, this machine only)")
    d.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    _add_device(d)
    _add_top_k(d)
    d.add_argument("--procedure", choices=procedures,
                   help="override the run's recorded preprocessing")

    r = sub.add_parser("presets", help="list the named presets")
    _add_json(r, "every preset's settings")

    m = sub.add_parser("models", help="the models built into the package, with their cards")
    _add_json(m, "the model cards")
    return parser
