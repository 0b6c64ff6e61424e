"""Training-step speed of a preset's model on this machine: eager fp32 against bf16
autocast and torch.compile, one change at a time, in one run.

Each mode trains the preset's model on a fixed random batch of the preset's batch size
with the training loop's own step (``vit_mqa.training.steps.training_step``: forward, loss,
backward, clipping, fused AdamW), so data loading and augmentation are left out. The
first steps, where torch.compile compiles, are timed apart ("warm-up"); images/s come
from the steps after them, as the median of several timed rounds. The modes run
interleaved, round by round, so that a machine whose speed drifts slows them alike.

    python benchmarks/step_speed.py --preset mnist-20min --json-out speed.json
    python benchmarks/step_speed.py --preset mnist-3min --modes eager,bf16 --set stem=conv
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import machine
import torch

from vit_mqa.checkpoint import write_json
from vit_mqa.config.recipe import build_config
from vit_mqa.config.sections import TrainConfig, ViTConfig
from vit_mqa.errors import VitMqaError
from vit_mqa.models.vit import VisionTransformer
from vit_mqa.training.optim import make_optimizer
from vit_mqa.training.steps import compile_model, training_step

MODES = {"eager": (False, False), "bf16": (True, False), "compile": (False, True),
         "bf16+compile": (True, True)}
# The image shape (channels, side) that each dataset gives the model; an image folder's
# comes from --set image_size=N and --set in_channels=1|3 (default 3).
IMAGE_SHAPES = {"mnist": (1, 28), "fashion-mnist": (1, 28)}


def parse_setting(text: str) -> tuple[str, Any]:
    name, _, raw = text.partition("=")
    if not raw:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return name.replace("-", "_"), raw


class Stepper:
    """One mode's model, optimizer and batch; ``steps(n)`` runs n training steps."""

    def __init__(self, model_cfg: ViTConfig, train_cfg: TrainConfig, bf16: bool,
                 use_compile: bool) -> None:
        torch.manual_seed(0)
        self.model = VisionTransformer(model_cfg).train()
        self.cfg = TrainConfig(**{**vars(train_cfg), "bf16": bf16})
        self.optimizer = make_optimizer(self.model, self.cfg, torch.device("cpu"))
        self.step_model = compile_model(self.model) if use_compile else self.model
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        g = torch.Generator().manual_seed(0)
        batch = train_cfg.batch_size
        self.x = torch.randn(batch, model_cfg.in_channels, *model_cfg.image_size, generator=g)
        self.y = torch.randint(0, model_cfg.num_classes, (batch,), generator=g)

    def steps(self, n: int) -> float:
        """Seconds for n steps (the last loss is read, so the work has finished)."""
        start = time.perf_counter()
        for _ in range(n):
            loss, _ = training_step(self.step_model, self.optimizer, self.x, self.y, self.cfg,
                                    self.autocast)
        if not torch.isfinite(loss):
            raise VitMqaError("the training step gave a non-finite loss")
        return time.perf_counter() - start


def measure(preset: str, overrides: dict[str, Any], modes: list[str], warmup_steps: int,
            steps: int, rounds: int) -> dict[str, Any]:
    config = build_config(preset, overrides=overrides)
    data = config["data"]
    if data["dataset"] in IMAGE_SHAPES:
        channels, side = IMAGE_SHAPES[data["dataset"]]
    elif data["image_size"] is None:
        raise VitMqaError(f"preset {preset!r} trains on an image folder: give its image "
                          "size with --set image_size=N")
    else:
        channels, side = data["in_channels"] or 3, data["image_size"]
    model_cfg = ViTConfig.from_dict({**config["model"], "in_channels": channels,
                                     "image_size": side})
    train_cfg = TrainConfig(**config["train"])
    steppers, results = {}, {}
    for mode in modes:
        steppers[mode] = Stepper(model_cfg, train_cfg, *MODES[mode])
        results[mode] = {"warmup_s": steppers[mode].steps(warmup_steps), "rounds_s": []}
    for _ in range(rounds):
        for mode in modes:
            results[mode]["rounds_s"].append(steppers[mode].steps(steps))
    batch = train_cfg.batch_size
    for mode in modes:
        median = statistics.median(results[mode]["rounds_s"])
        results[mode]["images_per_s"] = batch * steps / median
    eager = results.get("eager", {}).get("images_per_s")
    for mode in modes:
        results[mode]["vs_eager"] = results[mode]["images_per_s"] / eager if eager else None
    return {"preset": preset, "overrides": overrides, "parameters": model_cfg.num_parameters(),
            "batch_size": batch, "warmup_steps": warmup_steps, "steps": steps,
            "rounds": rounds, "machine": machine.describe(), "modes": results}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['preset']} {report['overrides'] or ''} on {report['machine']['cpu']} "
             f"({report['machine']['threads']} threads), batch {report['batch_size']}",
             "", "| mode | images/s | vs eager | warm-up |", "|---|---|---|---|"]
    for mode, r in report["modes"].items():
        ratio = f"{r['vs_eager']:.2f}x" if r["vs_eager"] else "-"
        lines.append(f"| {mode} | {r['images_per_s']:,.0f} | {ratio} | "
                     f"{r['warmup_s']:.1f} s for {report['warmup_steps']} steps |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mnist-fast")
    parser.add_argument("--set", type=parse_setting, action="append", default=[],
                        metavar="NAME=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    try:
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise VitMqaError(f"unknown mode {unknown[0] if unknown else '(none)'!r}; choose "
                              f"from {', '.join(MODES)}")
        if min(args.warmup_steps, args.steps, args.rounds) < 1:
            raise VitMqaError("--warmup-steps, --steps and --rounds must be >= 1")
        report = measure(args.preset, dict(args.set), modes, args.warmup_steps, args.steps,
                         args.rounds)
        if args.json_out:
            write_json(args.json_out, report)
    except (VitMqaError, OSError) as e:
        sys.exit(f"step_speed: error: {e}")
    print(markdown(report))


if __name__ == "__main__":
    main()
