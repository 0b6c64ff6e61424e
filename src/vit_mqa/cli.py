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
import sys
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model; writes a run directory")
    t.add_argument("--preset", help="named recipe (see `vit-mqa presets`); default mnist-fast")
    t.add_argument("--config", metavar="FILE", help="JSON file with model/data/augment/train "
                   "sections, layered over the preset")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/PRESET-TIME)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last epoch")
    t.add_argument("--init-from", metavar="RUN_DIR", help="start from a run's best weights")
    t.add_argument("--quiet", action="store_true", help="no progress or epoch lines")
    _add_setting_flags(t)

    e = sub.add_parser("eval", help="test accuracy, per-class accuracy, confusion matrix")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--weights", choices=("best", "last"), default="best")
    e.add_argument("--data-dir", help="where the dataset files are (default: lookup order)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("paths", metavar="IMAGE_OR_FOLDER", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--weights", choices=("best", "last"), default="best")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")

    sub.add_parser("presets", help="list the named presets")
    return parser


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
    config = build_config(args.preset, args.config, overrides)
    out = args.out
    if out is None:
        # Every torchrun process must pick the same folder: name it after the run id.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") if launched_by_torchrun() else None
        out = f"runs/{config['preset']}-{run_id or time.strftime('%Y%m%d-%H%M%S')}"
    if args.init_from and not Path(args.init_from).is_dir():
        raise VitMqaError(f"--init-from {args.init_from} is not a directory")
    train(config, out, init_from=args.init_from, quiet=args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_dir
    from .data import DataConfig, Preprocess, load_data
    from .distributed import pick_device
    from .evaluate import classification_report, evaluate

    device = pick_device(args.device)
    model, config = load_model_dir(args.run_dir, _weights_name(args.weights), device)
    if "data" not in config or "preprocess" not in config:
        raise VitMqaError(f"{args.run_dir} has no data settings: not a training run directory")
    data_cfg = DataConfig(**config["data"])
    if args.data_dir:
        data_cfg.data_dir = args.data_dir
    data = load_data(data_cfg)
    if config.get("classes") and data.classes != config["classes"]:
        raise VitMqaError(f"the data's classes {data.classes} differ from the run's "
                          f"{config['classes']}")
    split = data.test if args.split == "test" else data.val
    result = evaluate(model, split, Preprocess.from_dict(config["preprocess"]), device=device)
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


def cmd_predict(args: argparse.Namespace) -> int:
    from .distributed import pick_device
    from .predict import Predictor

    if args.top_k < 1:
        raise VitMqaError(f"--top-k must be >= 1, got {args.top_k}")
    predictor = Predictor(args.run_dir, device=pick_device(args.device),
                          weights=_weights_name(args.weights))
    results = predictor.predict(args.paths, top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        tops = "  ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
        print(f"{r['path']}: {tops}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import DEFAULT_PRESET, PRESETS

    for name, preset in PRESETS.items():
        marker = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name}{marker}: {json.dumps(preset)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
                "presets": cmd_presets}
    try:
        return commands[args.command](args)
    except VitMqaError as e:
        print(f"vit-mqa: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # unwritable run directory, full disk, ...: the OS says it best
        print(f"vit-mqa: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vit-mqa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
