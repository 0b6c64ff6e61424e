"""What each ``vit-mqa`` subcommand does, given its parsed arguments; each returns the
exit code. The package's heavy modules (torch among them) are imported inside the command
that needs them, so that ``--help`` and ``presets`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .._version import __version__
from ..errors import VitMqaError


def _fresh_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VitMqaError(f"{out} already exists; choose a new destination")
    return out


def cmd_import(args: argparse.Namespace) -> int:
    from ..models.adapt import resize_model
    from ..models.hub import save_model_dir
    from ..models.interop import load_external

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
    from ..models.adapt import convert_kv_heads
    from ..models.hub import save_model_dir
    from ..models.vit import load_model_dir

    dest = _fresh_dir(args.dest)
    model, config = load_model_dir(args.source)
    converted = convert_kv_heads(model, args.kv_heads)
    # The model's config keeps its class names and preprocessing; the run's data settings
    # go along so that `vit-mqa eval` finds its test set. The fitted temperature does not:
    # it was fitted to the unconverted model's logits.
    extra = {"data": config["data"]} if "data" in config else {}
    save_model_dir(converted, dest, {**extra, "converted_from": str(args.source),
                                     "vit_mqa_version": __version__})
    print(f"converted {args.source} ({model.config.num_kv_heads} K/V heads) -> {dest} "
          f"({args.kv_heads} K/V heads)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..models.interop import export_onnx
    from ..models.vit import load_model_dir

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
    from ..checkpoint import LAST_WEIGHTS_NAME, WEIGHTS_NAME

    return WEIGHTS_NAME if choice == "best" else LAST_WEIGHTS_NAME


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.loop import train
    from ..training.setup import run_config
    from ..training.state import default_run_dir

    own = {"command", "preset", "config", "out", "resume", "init_from", "quiet"}
    overrides = {k: v for k, v in vars(args).items() if k not in own}
    if args.resume:
        if args.preset or args.config or args.out or args.init_from:
            raise VitMqaError("--resume takes its settings from the run; it cannot be combined "
                              "with --preset, --config, --out or --init-from")
        train(overrides, args.resume, resume=True, quiet=args.quiet)
        return 0
    config, init_dir = run_config(args.preset, args.config, overrides, args.init_from)
    out = args.out or default_run_dir(config["preset"])
    train(config, out, init_from=init_dir, quiet=args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..device import pick_device
    from ..evaluation.calibration import declining
    from ..evaluation.evaluate import classification_report, evaluate, load_run
    from ..evaluation.predict import none_of_these
    from ..models.hub import run_temperature, run_thresholds

    device = pick_device(args.device)
    model, config, data = load_run(args.run_dir, _weights_name(args.weights), device,
                                   args.data_dir)
    split = data.test if args.split == "test" else data.val
    result = evaluate(model, split, model.preprocess, device=device, tta=args.tta)
    report = classification_report(result["predictions"], split.labels, data.classes)
    where = Path(args.run_dir) / "config.json"
    declined = declining(result["logits"], split.labels, run_temperature(config, where),
                         run_thresholds(config, where))
    report = {"split": args.split, "run_dir": str(args.run_dir), "tta": args.tta,
              "loss": result["loss"], **report, "declined": declined}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    views = "" if args.tta == "none" else f", test-time augmentation {args.tta}"
    print(f"{args.split} accuracy: {100 * report['accuracy']:.2f}% on {report['num_images']} "
          f"images (loss {report['loss']:.4f}{views})")
    d = declined
    answered = ("" if d["answered_accuracy"] is None
                else f"; the answered {100 * d['answered_accuracy']:.2f}% right")
    print(f"declined as predict would: {d['unknown']} as {none_of_these(data.classes)}, "
          f"{d['unsure']} unsure ({100 * (d['unknown'] + d['unsure']) / d['images']:.2f}% of "
          f"the images){answered}")
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..device import pick_device
    from ..evaluation.calibration import recalibrate, threshold_summary

    calibration = recalibrate(args.run_dir, args.decline_unknown, args.decline_unsure,
                              args.data_dir, pick_device(args.device))
    print(f"{args.run_dir}: temperature {calibration['temperature']:.3f}; "
          f"{threshold_summary(calibration['thresholds'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..device import pick_device
    from .report import write_report

    paths = write_report(args.run_dir, _weights_name(args.weights), pick_device(args.device),
                         args.data_dir, samples=args.samples, seed=args.seed)
    print(f"wrote {len(paths) - 1} figures and {paths[-1]}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..device import pick_device
    from ..evaluation.predict import Predictor, none_of_these

    if args.top_k < 1:
        raise VitMqaError(f"--top-k must be >= 1, got {args.top_k}")
    predictor = Predictor(args.run_dir, device=pick_device(args.device),
                          weights=_weights_name(args.weights), procedure=args.procedure,
                          onnx=args.onnx, **({} if args.min_confidence is None else
                                             {"min_confidence": args.min_confidence}))
    # One unreadable or blank image gets its own error line; the others are still predicted.
    results = predictor.predict(args.paths, top_k=args.top_k, raw=args.raw, errors="record")
    good = [r for r in results if "error" not in r]
    if args.json:  # every image in order, failed ones as {"path", "error"}
        print(json.dumps(results, indent=2))
    else:
        none = none_of_these(predictor.classes)
        for r in good:
            tops = "  ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
            if r["decision"] == "unknown":  # an answer too: "none of these", not an error
                print(f"{r['path']}: {none} (closest: {tops})")
            else:
                print(f"{r['path']}: {tops}{'  (unsure)' if r['unsure'] else ''}")
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
    from ..config.presets import DEFAULT_PRESET, PRESETS

    if args.json:
        print(json.dumps({"default": DEFAULT_PRESET, "presets": PRESETS}, indent=2))
        return 0
    from ..config.recipe import build_config

    rows = [("preset", "dataset", "model", "epochs", "batch", "lr")]
    for name in PRESETS:
        config = build_config(name)  # what a run of the preset uses, defaults included
        model, train = config["model"], config["train"]
        stem = "" if model["stem"] == "patch" else f"{model['stem']} stem, "
        if model["stem_convs"] != 1:
            stem += f"{model['stem_convs']} convs per stage, "
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
    from ..models.builtin import BUILTIN_MODELS, card_text, model_card

    if args.json:
        print(json.dumps({name: model_card(name) for name in BUILTIN_MODELS}, indent=2))
        return 0
    print("\n\n".join(card_text(name) for name in BUILTIN_MODELS))
    print("\nUse a name wherever a run directory goes: vit-mqa predict vit-mqa/mnist "
          "digit.png, vit-mqa demo vit-mqa/mnist, vit-mqa train --init-from vit-mqa/mnist; "
          "in Python, VisionTransformer.from_pretrained(\"vit-mqa/mnist\").")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "import": cmd_import,
    "convert": cmd_convert, "export": cmd_export, "presets": cmd_presets,
    "models": cmd_models, "demo": cmd_demo, "report": cmd_report, "calibrate": cmd_calibrate,
}
