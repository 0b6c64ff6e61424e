"""The ``vit-mqa`` command: train, eval, predict, presets.

Every setting of every config section is also a flag (``--num-kv-heads 2``,
``--lr 1e-3``, ``--no-qkv-bias``), generated from the config dataclasses so that
flags, JSON config files and presets can never drift apart. User errors print one
line and exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._version import __version__
from .errors import VitMqaError

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool,
                           "int | None": int, "str | None": str, "float | None": float}


def _duration(text: str) -> float:
    from .recipe import parse_duration

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
    from .config import SECTIONS
    from .config_checks import CHOICES
    from .presets import DEFAULT_PRESET
    from .recipe import DERIVED_MODEL_FIELDS, build_config, field_docs

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


def build_parser() -> argparse.ArgumentParser:
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
    from .presets import DEFAULT_PRESET, PRESETS

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

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("run_dir", **run_dir)
    p.add_argument("paths", metavar="IMAGE_OR_FOLDER", nargs="+",
                   help="image files, or folders searched for them")
    _add_top_k(p)
    _add_weights(p)
    _add_device(p)
    _add_json(p, "the predictions")
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


def _fresh_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VitMqaError(f"{out} already exists; choose a new destination")
    return out


def _new_run_dir(stem: str) -> str:
    """stem, or stem-2, stem-3, ...: the first that did not exist. Made here with an
    exclusive mkdir, so that two runs started in the same second get different folders."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = stem if n == 1 else f"{stem}-{n}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise VitMqaError(f"no free run directory name beside {stem}; pass --out DIR")


def cmd_import(args: argparse.Namespace) -> int:
    from .interop import load_external, resize_model
    from .model import save_model_dir

    dest = _fresh_dir(args.dest)
    model, extras = load_external(args.source, args.num_heads)
    if args.image_size:
        if len(args.image_size) > 2:
            raise VitMqaError("--image-size takes H or H W")
        size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size
        model = resize_model(model, (size[0], size[1]))
    save_model_dir(model, dest, {**extras, "imported_from": str(args.source)})
    mc = model.config
    print(f"imported {args.source} -> {dest} ({mc.depth} layers, dim {mc.dim}, "
          f"{mc.num_heads} heads, {mc.image_size[0]}x{mc.image_size[1]})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .interop import convert_kv_heads
    from .model import load_model_dir, save_model_dir

    dest = _fresh_dir(args.dest)
    model, config = load_model_dir(args.source)
    converted = convert_kv_heads(model, args.kv_heads)
    # Keep data, preprocessing and class names, so eval, predict and --init-from work.
    extra = {k: v for k, v in config.items() if k not in ("model", "vit_mqa_version")}
    save_model_dir(converted, dest, {**extra, "converted_from": str(args.source),
                                     "vit_mqa_version": __version__})
    print(f"converted {args.source} ({model.config.num_kv_heads} K/V heads) -> {dest} "
          f"({args.kv_heads} K/V heads)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .interop import export_onnx
    from .model import load_model_dir

    model, _ = load_model_dir(args.run_dir, _weights_name(args.weights))
    worst = export_onnx(model, args.output, args.opset, verify=True, int8=args.int8)
    if args.int8:
        print(f"exported {args.run_dir} -> {args.output} (int8 weights, dynamic batch; "
              f"logits within {worst:.2g} of PyTorch's on random input)")
    else:
        print(f"exported {args.run_dir} -> {args.output} (dynamic batch; onnxruntime matches "
              f"PyTorch within {worst:.1e})")
    return 0


def _weights_name(choice: str) -> str:
    from .checkpoint import LAST_WEIGHTS_NAME, WEIGHTS_NAME

    return WEIGHTS_NAME if choice == "best" else LAST_WEIGHTS_NAME


def cmd_train(args: argparse.Namespace) -> int:
    from .config import SECTIONS
    from .distributed import launched_by_torchrun
    from .recipe import build_config, field_section
    from .training import train

    own = {"command", "preset", "config", "out", "resume", "init_from", "quiet"}
    overrides = {k: v for k, v in vars(args).items() if k not in own}
    if args.resume:
        if args.preset or args.config or args.out or args.init_from:
            raise VitMqaError("--resume takes its settings from the run; it cannot be combined "
                              "with --preset, --config, --out or --init-from")
        sectioned: dict[str, Any] = {s: {} for s in SECTIONS}
        for name, value in overrides.items():
            sectioned[field_section(name)][name] = value
        train(sectioned, args.resume, resume=True, quiet=args.quiet)
        return 0
    init_model = init_dir = None
    if args.init_from:
        from .checkpoint import read_config
        from .model import resolve_model_dir

        init_dir = resolve_model_dir(args.init_from)  # a folder, or a model on the Hub
        init_model = read_config(init_dir)["model"]
    config = build_config(args.preset, args.config, overrides, init_model)
    out = args.out
    if out is None:
        # Every torchrun process must pick the same folder: name it after the run id.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") if launched_by_torchrun() else None
        out = (f"runs/{config['preset']}-{run_id}" if run_id
               else _new_run_dir(f"runs/{config['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"))
    train(config, out, init_from=init_dir, quiet=args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .distributed import pick_device
    from .evaluate import classification_report, evaluate, load_run

    device = pick_device(args.device)
    model, config, data = load_run(args.run_dir, _weights_name(args.weights), device,
                                   args.data_dir)
    split = data.test if args.split == "test" else data.val
    result = evaluate(model, split, model.preprocess, device=device, tta=args.tta)
    report = classification_report(result["predictions"], split.labels, data.classes)
    report = {"split": args.split, "run_dir": str(args.run_dir), "tta": args.tta,
              "loss": result["loss"], **report}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    views = "" if args.tta == "none" else f", test-time augmentation {args.tta}"
    print(f"{args.split} accuracy: {100 * report['accuracy']:.2f}% on {report['num_images']} "
          f"images (loss {report['loss']:.4f}{views})")
    width = max(len(c) for c in data.classes)
    print("per-class accuracy:")
    for name, stats in report["per_class"].items():
        acc = "n/a" if stats["accuracy"] is None else f"{100 * stats['accuracy']:6.2f}%"
        print(f"  {name:>{width}}  {acc}  ({stats['support']} images)")
    print("confusion matrix (rows: true class, columns: predicted):")
    cells = max(len(str(v)) for row in report["confusion_matrix"] for v in row)
    cells = max(cells, max(len(c) for c in data.classes))
    print(" " * (width + 2) + " ".join(f"{c[:cells]:>{cells}}" for c in data.classes))
    for name, row in zip(data.classes, report["confusion_matrix"]):
        print(f"  {name:>{width}}" + " ".join(f"{v:>{cells}}" for v in row))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .distributed import pick_device
    from .report import write_report

    paths = write_report(args.run_dir, _weights_name(args.weights), pick_device(args.device),
                         args.data_dir, samples=args.samples, seed=args.seed)
    print(f"wrote {len(paths) - 1} figures and {paths[-1]}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .distributed import pick_device
    from .predict import Predictor

    if args.top_k < 1:
        raise VitMqaError(f"--top-k must be >= 1, got {args.top_k}")
    predictor = Predictor(args.run_dir, device=pick_device(args.device),
                          weights=_weights_name(args.weights), procedure=args.procedure,
                          onnx=args.onnx, **({} if args.min_confidence is None else
                                             {"min_confidence": args.min_confidence}))
    # One unreadable or blank image gets its own error line; the others are still predicted.
    results = predictor.predict(args.paths, top_k=args.top_k, raw=args.raw, errors="record")
    good = [r for r in results if "error" not in r]
    if args.json:
        print(json.dumps(good, indent=2))
    else:
        for r in good:
            tops = "  ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
            flag = "  (unsure)" if r["unsure"] else ""
            print(f"{r['path']}: {tops}{flag}")
    sys.stdout.flush()
    for r in results:
        if "error" in r:
            print(f"vit-mqa: error: {r['error']}", file=sys.stderr)
    return 1 if len(good) < len(results) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import serve

    if args.top_k < 1:
        raise VitMqaError(f"--top-k must be >= 1, got {args.top_k}")
    serve(args.run_dir, host=args.host, port=args.port, device=args.device, top_k=args.top_k,
          procedure=args.procedure)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import DEFAULT_PRESET, PRESETS

    if args.json:
        print(json.dumps({"default": DEFAULT_PRESET, "presets": PRESETS}, indent=2))
        return 0
    from .recipe import build_config

    rows = [("preset", "dataset", "model", "epochs", "batch", "lr")]
    for name in PRESETS:
        config = build_config(name)  # what a run of the preset uses, defaults included
        model, train = config["model"], config["train"]
        stem = "" if model["stem"] == "patch" else f"{model['stem']} stem, "
        shape = (f"{stem}patch {model['patch_size']}, dim {model['dim']}, depth "
                 f"{model['depth']}, {model['num_heads']} heads / {model['num_kv_heads']} K/V, "
                 f"{model['pooling']}")
        rows.append((name + (" (default)" if name == DEFAULT_PRESET else ""),
                     config["data"]["dataset"], shape, str(train["epochs"]),
                     str(train["batch_size"]), f"{train['lr']:g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nvit-mqa train --preset NAME; any setting can be overridden by its flag "
          "(vit-mqa presets --json shows every setting).")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .pretrained import BUILTIN_MODELS, card_text, model_card

    if args.json:
        print(json.dumps({name: model_card(name) for name in BUILTIN_MODELS}, indent=2))
        return 0
    print("\n\n".join(card_text(name) for name in BUILTIN_MODELS))
    print("\nUse a name wherever a run directory goes: vit-mqa predict vit-mqa/mnist "
          "digit.png, vit-mqa demo vit-mqa/mnist, vit-mqa train --init-from vit-mqa/mnist; "
          "in Python, VisionTransformer.from_pretrained(\"vit-mqa/mnist\").")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `vit-mqa`: say what it can do
        parser.print_help()
        return 0
    commands = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
                "import": cmd_import, "convert": cmd_convert, "export": cmd_export,
                "presets": cmd_presets, "models": cmd_models, "demo": cmd_demo,
                "report": cmd_report}
    # SIGTERM (kill, a job scheduler, a container stop) ends a run as Ctrl-C does: temporary
    # files are removed, the last finished epoch stays resumable, and the exit is one line.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return commands[args.command](args)
    except Terminated:
        print("vit-mqa: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except VitMqaError as e:
        print(f"vit-mqa: error: {as_flags(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:  # unwritable run directory, full disk, ...: the OS says it best
        print(f"vit-mqa: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vit-mqa: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def as_flags(message: str) -> str:
    """A library message with its `setting` names as this command's flags (--setting)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + m.group(1).replace("_", "-"),
                  message)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
