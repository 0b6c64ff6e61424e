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
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import VitMqaError

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool,
                           "int | None": int, "str | None": str, "float | None": float}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"vit-mqa: error: {message}\n")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    from .train import DERIVED_MODEL_FIELDS, SECTIONS

    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings (override the preset)")
        for f in dataclasses.fields(cls):
            if section == "model" and f.name in DERIVED_MODEL_FIELDS:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = _TYPES.get(str(f.type))
            if kind is None:
                raise TypeError(f"no flag type for {section}.{f.name}: {f.type}")
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f"(default {f.default})")
            else:
                group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=f"(default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vit-mqa", description="Vision Transformers with multi-query / "
                     "grouped-query attention: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"vit-mqa {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, title="commands",
                                metavar="COMMAND")

    t = sub.add_parser("train", help="train a model; writes a run directory")
    t.add_argument("--preset", help="named recipe (see `vit-mqa presets`); default mnist-fast")
    t.add_argument("--config", metavar="FILE", help="JSON file with model/data/augment/train "
                   "sections, layered over the preset")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/PRESET-TIME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last epoch")
    t.add_argument("--init-from", metavar="RUN_DIR", help="fine-tune: start from a run's or "
                   "model directory's weights (or a Hugging Face Hub model id); another number "
                   "of classes gets a new head, another image size resampled position "
                   "embeddings")
    t.add_argument("--quiet", action="store_true", help="no progress or epoch lines")
    _add_setting_flags(t)

    e = sub.add_parser("eval", help="test accuracy, per-class accuracy, confusion matrix")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--weights", choices=("best", "last"), default="best")
    e.add_argument("--data-dir", help="where the dataset files are (default: lookup order)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    r = sub.add_parser("report", help="figures of a run (curves, confusion matrix, mistakes, "
                       "attention) and an index.html, in RUN_DIR/report")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--weights", choices=("best", "last"), default="best")
    r.add_argument("--data-dir", help="where the dataset files are (default: lookup order)")
    r.add_argument("--device", default="auto")
    r.add_argument("--samples", type=int, default=10, help="test images in the attention "
                   "figures (default 10)")
    r.add_argument("--seed", type=int, default=0, help="chooses the sample images")

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("paths", metavar="IMAGE_OR_FOLDER", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--weights", choices=("best", "last"), default="best")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--raw", action="store_true", help="images already in the dataset's "
                   "format: only stretch them to the model's size, skip the run's procedure")
    p.add_argument("--procedure", choices=("stretch", "pad", "center-crop", "mnist",
                                           "fashion-mnist"),
                   help="override the run's recorded preprocessing (runs saved before it "
                   "was recorded use stretch)")

    i = sub.add_parser("import", help="a Hugging Face ViT directory or a timm state dict "
                       "-> a vit-mqa model directory (multi-head)")
    i.add_argument("source", metavar="SRC", help="HF directory (config.json + weights) or a "
                   "timm .safetensors/.pth file")
    i.add_argument("dest", metavar="DST")
    i.add_argument("--num-heads", type=int, help="timm only: heads (default dim // 64)")
    i.add_argument("--image-size", type=int, nargs="+", metavar="N",
                   help="target image size (H [W]); position embeddings are resampled")

    c = sub.add_parser("convert", help="mean-pool K/V heads: multi-head -> grouped/multi-query")
    c.add_argument("source", metavar="SRC", help="run or model directory")
    c.add_argument("dest", metavar="DST")
    c.add_argument("--kv-heads", type=int, required=True, help="K/V heads after conversion")

    x = sub.add_parser("export", help="ONNX export with a dynamic batch, checked with "
                       "onnxruntime")
    x.add_argument("run_dir", metavar="RUN_DIR")
    x.add_argument("output", metavar="OUT.onnx")
    x.add_argument("--weights", choices=("best", "last"), default="best")
    x.add_argument("--opset", type=int, default=18)

    b = sub.add_parser("bench", help="training and inference throughput beside vit-pytorch "
                       "and Hugging Face ViT, at equal shapes; markdown and JSON")
    b.add_argument("--shapes", default="mnist-fast,vit-ti-32,vit-s-224",
                   help="comma-separated: mnist-fast, vit-ti-32, vit-s-224")
    b.add_argument("--impls", default="vit-mqa-mqa,vit-mqa-gqa,vit-mqa-mha,vit-mqa-mqa+compile,"
                   "vit-pytorch,hf-vit", help="comma-separated implementations")
    b.add_argument("--modes", default="train,infer", help="train, infer or both")
    b.add_argument("--batch-size", type=int, help="training batch (default per shape/device)")
    b.add_argument("--infer-batch-size", type=int, help="inference batch (default per shape)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    b.add_argument("--dtype", choices=("fp32", "bf16"), help="fp32 or bf16 autocast "
                   "(default bf16 on CUDA, fp32 on CPU)")
    b.add_argument("--compile", action="store_true", help="torch.compile every model (peers "
                   "too); vit-mqa-mqa+compile compiles only that one")
    b.add_argument("--repeats", type=int, default=5, help="timed windows per entry (median)")
    b.add_argument("--min-time", type=float, default=0.5, help="seconds per timed window")
    b.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    b.add_argument("--scaling", action="store_true",
                   help="also images/s against batch size and token count")
    b.add_argument("--levers", nargs="?", const="all", metavar="NAMES",
                   help="also each speed lever (or the comma-separated ones named), measured "
                   "against the default path")
    b.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    b.add_argument("--markdown", metavar="FILE", help="write the tables to a file too")

    d = sub.add_parser("demo", help="a local web page: draw or upload a digit, see the "
                       "prediction and its attention (needs vit-mqa[demo])")
    d.add_argument("run_dir", metavar="RUN_DIR")
    d.add_argument("--host", default="127.0.0.1", help="interface to bind (default "
                   "127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--device", default="cpu")
    d.add_argument("--top-k", type=int, default=5)
    d.add_argument("--procedure", choices=("stretch", "pad", "center-crop", "mnist",
                                           "fashion-mnist"),
                   help="override the run's recorded preprocessing")

    r = sub.add_parser("presets", help="list the named presets")
    r.add_argument("--json", action="store_true", help="print the presets as JSON")
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
    from .interop import adapt_state_dict, load_external
    from .model import VisionTransformer, ViTConfig, save_model_dir
    from .preprocess import Preprocess

    dest = _fresh_dir(args.dest)
    model, extras = load_external(args.source, args.num_heads)
    if args.image_size:
        if len(args.image_size) > 2:
            raise VitMqaError("--image-size takes H or H W")
        size = args.image_size * 2 if len(args.image_size) == 1 else args.image_size
        target = ViTConfig.from_dict({**model.config.to_dict(), "image_size": size})
        resized = VisionTransformer(target)
        resized.load_state_dict(adapt_state_dict(model.state_dict(), model.config, target))
        model = resized
    mc = model.config
    # Both Hugging Face ViT and timm's original ViT weights scale pixels to [-1, 1].
    pre = Preprocess(mc.image_size, mc.in_channels, (0.5,) * mc.in_channels,
                     (0.5,) * mc.in_channels)
    save_model_dir(model, dest, {"preprocess": pre.to_dict(), **extras,
                                 "imported_from": str(args.source)})
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
    import numpy as np
    import torch

    from .interop import export_onnx
    from .model import load_model_dir

    model, _ = load_model_dir(args.run_dir, _weights_name(args.weights))
    try:
        import onnxruntime as ort
    except ImportError:
        raise VitMqaError("ONNX export needs onnx, onnxscript and onnxruntime: "
                          "pip install 'vit-mqa[onnx]'") from None
    export_onnx(model, args.output, args.opset)
    session = ort.InferenceSession(str(args.output), providers=["CPUExecutionProvider"])
    c = model.config
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, c.in_channels, *c.image_size)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > 1e-4:
        Path(args.output).unlink(missing_ok=True)
        raise VitMqaError(f"ONNX output differs from PyTorch by {worst:.2e} (> 1e-4); "
                          "not written")
    print(f"exported {args.run_dir} -> {args.output} (dynamic batch; onnxruntime matches "
          f"PyTorch within {worst:.1e})")
    return 0


def _weights_name(choice: str) -> str:
    from .checkpoint import LAST_WEIGHTS_NAME, WEIGHTS_NAME

    return WEIGHTS_NAME if choice == "best" else LAST_WEIGHTS_NAME


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import launched_by_torchrun
    from .train import SECTIONS, build_config, field_section, train

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
    result = evaluate(model, split, model.preprocess, device=device)
    report = classification_report(result["predictions"], split.labels, data.classes)
    report = {"split": args.split, "run_dir": str(args.run_dir), "loss": result["loss"], **report}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.split} accuracy: {100 * report['accuracy']:.2f}% on {report['num_images']} "
          f"images (loss {report['loss']:.4f})")
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
                          weights=_weights_name(args.weights), procedure=args.procedure)
    # One unreadable or blank image gets its own error line; the others are still predicted.
    results = predictor.predict(args.paths, top_k=args.top_k, raw=args.raw, errors="record")
    good = [r for r in results if "error" not in r]
    if args.json:
        print(json.dumps(good, indent=2))
    else:
        for r in good:
            tops = "  ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
            print(f"{r['path']}: {tops}")
    sys.stdout.flush()
    for r in results:
        if "error" in r:
            print(f"vit-mqa: error: {r['error']}", file=sys.stderr)
    return 1 if len(good) < len(results) else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .distributed import pick_device

    for name in ("repeats", "threads", "batch_size", "infer_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise VitMqaError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.min_time <= 0:
        raise VitMqaError(f"--min-time must be > 0, got {args.min_time}")
    device = pick_device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    opts = bench.BenchOptions(device, dtype, args.compile, args.repeats, args.min_time,
                              threads=args.threads)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    report = bench.run_benchmark(
        split(args.shapes), split(args.impls), split(args.modes), opts,
        train_batch=args.batch_size, infer_batch=args.infer_batch_size,
        with_scaling=args.scaling, with_levers=args.levers is not None,
        lever_names=None if args.levers in (None, "all") else split(args.levers),
        say=bench.log if sys.stderr.isatty() or os.environ.get("VIT_MQA_VERBOSE") else
        (lambda m: None))
    bench.write_report(report, args.json, args.markdown)
    print(bench.markdown(report), end="")
    return 0


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
    from .train import build_config

    rows = [("preset", "dataset", "model", "epochs", "batch", "lr")]
    for name in PRESETS:
        config = build_config(name)  # what a run of the preset uses, defaults included
        model, train = config["model"], config["train"]
        shape = (f"patch {model['patch_size']}, dim {model['dim']}, depth {model['depth']}, "
                 f"{model['num_heads']} heads / {model['num_kv_heads']} K/V, "
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `vit-mqa`: say what it can do
        parser.print_help()
        return 0
    commands = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
                "import": cmd_import, "convert": cmd_convert, "export": cmd_export,
                "bench": cmd_bench, "presets": cmd_presets, "demo": cmd_demo,
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
        print(f"vit-mqa: error: {e}", file=sys.stderr)
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


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
