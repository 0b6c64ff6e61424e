"""What a run is made of before its first step: its data, model (fine-tuned from a
source or new), optimizer, schedule, weight average and loggers, as one ``Run``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from .._version import __version__
from ..checkpoint import TrainingProgress, read_config
from ..config.recipe import build_config
from ..config.sections import AugmentConfig, DataConfig, TrainConfig, ViTConfig
from ..data.datasets import DATASETS, Data, load_data, locate_idx_dataset
from ..data.outliers import load_outliers
from ..data.preprocess import Preprocess
from ..errors import VitMqaError
from ..models.adapt import transfer_weights
from ..models.hub import resolve_model_dir
from ..models.vit import VisionTransformer, count_parameters
from . import distributed
from .distill import Teacher, load_teacher
from .distributed import DistContext
from .log import log
from .optim import LRSchedule, freeze_backbone, make_optimizer
from .steps import make_ema

EpochHook = Callable[[dict[str, Any], VisionTransformer], "dict[str, Any] | None"]


@dataclass
class Run:
    """One training run: its settings, its data and the live objects that train it.
    ``progress`` holds the counters that training_state.pt saves beside the modules'
    states, so that what is saved and restored is listed once (checkpoint.py)."""

    config: dict[str, Any]  # the full config.json, as written
    run_dir: Path
    train_cfg: TrainConfig
    aug_cfg: AugmentConfig
    data: Data
    pre: Preprocess
    ctx: DistContext
    device: torch.device
    model: VisionTransformer
    ddp: torch.nn.Module  # the model, wrapped for DistributedDataParallel when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: LRSchedule  # the scheduler's lr factor; its total_steps ends the run
    ema: AveragedModel | None
    teacher: Teacher | None  # knowledge distillation's frozen teacher, when one is named
    steps_per_epoch: int
    say: Callable[[str], None]
    quiet: bool
    progress: TrainingProgress = dataclasses.field(default_factory=TrainingProgress)
    # The best weights so far, kept in memory: no shared disk is needed between processes.
    best_weights: dict[str, torch.Tensor] | None = None
    # Pictures of none of the classes (`outliers`): training's (on the device), held back.
    outliers: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated, saved and tested: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def step_limit(self) -> int:
        """The step at which training ends: the schedule's length, or max_steps if sooner."""
        total = self.schedule.total_steps
        return min(total, self.train_cfg.max_steps) if self.train_cfg.max_steps else total

    @property
    def planned_epochs(self) -> int:
        return min(self.train_cfg.epochs, -(-self.step_limit // self.steps_per_epoch))

    @property
    def local_batch(self) -> int:
        return self.train_cfg.batch_size // self.ctx.world_size

    def modules(self) -> dict[str, Any]:
        """The state_dicts that training_state.pt holds beside ``progress``."""
        states = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                  "scheduler": self.scheduler.state_dict()}
        return {**states, "ema": self.ema.state_dict()} if self.ema is not None else states


def run_config(preset: str | None = None, config_file: str | Path | None = None,
               overrides: dict[str, Any] | None = None,
               init_from: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """A new run's config (``build_config``) and, when fine-tuning, the folder of the model
    it starts from (a path, a built-in name or a Hub id, resolved once): that model's
    architecture replaces the preset's."""
    if init_from is None:
        return build_config(preset, config_file, overrides), None
    init_dir = resolve_model_dir(init_from)
    return build_config(preset, config_file, overrides, read_config(init_dir)["model"]), init_dir


def setup_run(config: dict[str, Any], run_dir: Path, resume: bool, init_from: str | Path | None,
           data: Data | None, quiet: bool, ctx: DistContext, device: torch.device) -> Run:
    """Data, model (from ``init_from`` when fine-tuning), optimizer and schedule. The run's
    config as recorded (``Run.config``) is a new dict: ``config`` itself is not changed."""
    config = {**config, **{section: dict(config[section])
                           for section in ("model", "data", "augment", "train")}}
    data_cfg = DataConfig(**config["data"])
    aug_cfg = AugmentConfig(**config["augment"])
    train_cfg = TrainConfig(**config["train"])
    say = log if ctx.is_main and not quiet else (lambda m: None)
    if train_cfg.batch_size % ctx.world_size:
        raise VitMqaError(f"batch_size {train_cfg.batch_size} is not divisible by the "
                          f"{ctx.world_size} processes")
    distributed.barrier(ctx)  # every rank has checked run_dir before rank 0 writes to it

    source = VisionTransformer.from_pretrained(init_from) if init_from is not None else None
    if source is not None and data is None and data_cfg.dataset not in DATASETS:
        # An image folder is read at the pretrained model's size and channel count unless
        # the settings say otherwise, as timm resolves its data config from the model.
        h, w = source.config.image_size
        if data_cfg.image_size is None and h == w:
            data_cfg.image_size = config["data"]["image_size"] = h
        if data_cfg.in_channels is None:
            data_cfg.in_channels = config["data"]["in_channels"] = source.config.in_channels
    if data is None:
        spec = DATASETS.get(data_cfg.dataset)
        must_download = spec is not None and locate_idx_dataset(spec, data_cfg.data_dir) is None
        if must_download and not ctx.is_main:
            distributed.barrier(ctx)  # rank 0 downloads into the cache first
        data = load_data(data_cfg)
        if must_download and ctx.is_main:
            distributed.barrier(ctx)
    pre = data.preprocess
    outliers = None
    if data_cfg.outliers:
        train_part, held = load_outliers(data_cfg, data, train_cfg.seed)
        outliers = (train_part.to(device), held)
    saved = (config["model"].get("preprocess") if resume else None)
    if (source is not None and train_cfg.init_normalization == "source"
            and source.config.in_channels == pre.in_channels):
        # The pretrained weights expect their own input statistics.
        pre = dataclasses.replace(pre, mean=source.preprocess.mean, std=source.preprocess.std)
    elif isinstance(saved, dict) and len(saved.get("mean", ())) == pre.in_channels:
        # A resumed run keeps what it recorded (e.g. a fine-tuning run's source's).
        pre = dataclasses.replace(pre, mean=tuple(saved["mean"]), std=tuple(saved["std"]))

    teacher = (load_teacher(train_cfg.teacher, pre, data.classes, device)
               if train_cfg.teacher else None)
    model_cfg = ViTConfig.from_dict(dict(config["model"], image_size=list(pre.image_size),
                                         in_channels=pre.in_channels,
                                         num_classes=len(data.classes),
                                         classes=list(data.classes),
                                         preprocess=pre.model_config_entry()))
    config["model"] = model_cfg.to_dict()
    torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
    model = VisionTransformer(model_cfg)
    if source is not None:
        for notice in transfer_weights(model, source, init_from):
            if ctx.is_main:
                print(f"vit-mqa: note: {notice}", file=sys.stderr)
    if train_cfg.freeze_backbone:
        freeze_backbone(model)
    model.to(device)

    fitted = len(data.train) - len(data.train) % ctx.world_size
    if train_cfg.batch_size > len(data.train) and fitted >= ctx.world_size:
        # A small folder: one step per epoch over all of it, rather than no step at all.
        if ctx.is_main:
            print(f"vit-mqa: note: batch_size {train_cfg.batch_size} is more than the "
                  f"{len(data.train)} training images; using {fitted}", file=sys.stderr)
        train_cfg.batch_size = config["train"]["batch_size"] = fitted
    steps_per_epoch = len(data.train) // train_cfg.batch_size
    if steps_per_epoch < 1:
        raise VitMqaError(f"batch_size {train_cfg.batch_size} exceeds the "
                          f"{len(data.train)} training images")
    total_steps = train_cfg.epochs * steps_per_epoch
    warmup = min(int(train_cfg.warmup_epochs * steps_per_epoch), total_steps)
    min_ratio = train_cfg.min_lr / train_cfg.lr
    optimizer = make_optimizer(model, train_cfg, device)
    schedule = LRSchedule(warmup, total_steps, min_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ddp = (torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
        if ctx.enabled else model)
    full_config = {**config, "vit_mqa_version": __version__}
    say(f"data: {data_cfg.dataset} from {data.source} ({len(data.train)} train, "
        f"{len(data.val)} val, {len(data.test)} test) | model: {count_parameters(model):,} "
        f"params, {model_cfg.num_heads} heads / {model_cfg.num_kv_heads} kv heads, "
        f"{model_cfg.num_patches} patches | device: {device}"
        + (f" x {ctx.world_size} processes" if ctx.enabled else "")
        + (f" | teacher: {train_cfg.teacher} ({train_cfg.distill}, weight "
           f"{train_cfg.distill_weight:g})" if teacher is not None else ""))
    return Run(full_config, run_dir, train_cfg, aug_cfg, data, pre, ctx, device, model, ddp,
                optimizer, scheduler, schedule,
                make_ema(model, train_cfg.ema_decay) if train_cfg.ema_decay else None,
                teacher, steps_per_epoch, say, quiet, outliers=outliers)
