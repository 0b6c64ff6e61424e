"""Training: one function, ``train(config, run_dir)``, that the CLI and notebooks call.

A run is fully described by its config, a plain nested dict with the sections
"model", "data", "augment" and "train" (plus the preset's name). ``build_config``
layers defaults < preset < JSON file < explicit overrides; ``train`` writes the
run directory described in ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import distributed
from ._version import __version__
from .augment import augment, mix_batch
from .checkpoint import (
    CONFIG_NAME,
    LAST_WEIGHTS_NAME,
    METRICS_NAME,
    RESULTS_NAME,
    STATE_NAME,
    WEIGHTS_NAME,
    RunLock,
    TrainingProgress,
    append_jsonl,
    atomic_write_text,
    describe_mismatch,
    load_training_state,
    load_weights,
    read_config,
    remove_stale_temporaries,
    run_dir_has_files,
    save_training_state,
    save_weights,
    write_json,
)
from .config import (
    AugmentConfig,
    DataConfig,
    TrainConfig,
    ViTConfig,
    resume_config,
)
from .data import DATASETS, Data, Split, load_data, locate_idx_dataset
from .distributed import DistContext, all_reduce_sum
from .errors import VitMqaError
from .evaluate import confusion_matrix, predict_logits, report_from_confusion
from .interop import transfer_weights
from .model import VisionTransformer, count_parameters
from .preprocess import Preprocess
from .tensorboard_log import TensorBoardLogger


def layer_index(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def make_optimizer(model: VisionTransformer, cfg: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D parameters (biases,
    norms) nor on those the model's ``no_weight_decay()`` names (position embeddings, the
    CLS token). With ``layer_decay`` < 1, one group per layer with its scaled lr."""
    skip = model.no_weight_decay()
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_index(name, depth) if cfg.layer_decay < 1 else 0
        groups.setdefault((layer, not (p.ndim < 2 or name in skip)), []).append(p)
    # Layers in order, decayed before undecayed within one: a stable group order, which
    # resuming relies on.
    param_groups = []
    for layer, decayed in sorted(groups, key=lambda key: (key[0], not key[1])):
        scale = cfg.layer_decay ** (depth + 1 - layer) if cfg.layer_decay < 1 else 1.0
        param_groups.append({"params": groups[(layer, decayed)], "lr": cfg.lr * scale,
                             "weight_decay": cfg.weight_decay if decayed else 0.0})
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (0.9, cfg.beta2)}
    try:
        # The fused kernel updates every tensor in one pass (CPU and CUDA, torch >= 2.4).
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, foreach=device.type != "cpu", **kwargs)


def freeze_backbone(model: VisionTransformer) -> None:
    """Train only the classification head: every other parameter stops taking gradients."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0 to 1, then cosine decay to min_ratio, as a factor of lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class LRSchedule:
    """``lr_factor`` as a callable object, so that the scheduler's state_dict saves its
    fields (LambdaLR keeps a callable object's attributes), and a time budget can set
    ``total_steps`` after each epoch."""

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.min_ratio)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    # Per-epoch streams: an epoch's data order and augmentation depend only on
    # (seed, epoch), so resuming at an epoch boundary replays them exactly.
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()  # epoch lines appear at once in logs, not at exit


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile, or the model itself where compiling is not supported.

    Dynamo's ``suppress_errors`` makes a graph that fails to compile (an unsupported
    platform) run eagerly instead of failing the run. It does not cover a backward graph,
    which is compiled lazily during the first backward pass: on a CPU without a C++
    compiler the model therefore runs eagerly from the start.
    """
    try:
        import torch._dynamo

        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        missing = _missing_cpp_compiler() if on_cpu else None
        if missing:
            _log(f"torch.compile needs a C++ compiler on the CPU ({missing}); training eagerly")
            return model
        torch._dynamo.config.suppress_errors = True
        return torch.compile(model)
    except (RuntimeError, ImportError) as e:  # e.g. a Python that this torch cannot compile on
        _log(f"torch.compile unavailable ({str(e).splitlines()[0]}); training eagerly")
        return model


def _missing_cpp_compiler() -> str | None:
    """Why inductor cannot build CPU kernels here, or None when it can (or cannot tell)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return None
    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or the compiler search failing otherwise
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def make_batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, pre: Preprocess,
               aug_cfg: AugmentConfig, aug_gen: torch.Generator, num_classes: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels already on the device, batch indices -> augmented, normalised
    model input and targets: class indices (B,), or with mixup / CutMix soft targets (B,
    num_classes). Everything stays on the device: no loader processes, no copies."""
    x = augment(images[idx].float().div_(255.0), aug_cfg, aug_gen)
    y = labels[idx]
    if aug_cfg.mixes:
        x, y = mix_batch(x, y, num_classes, aug_cfg, aug_gen)
    return pre.normalize(x), y


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, cfg: TrainConfig, autocast: torch.autocast
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: forward, loss, backward, clipping, update. ``y``
    holds class indices or soft targets (mixup / CutMix); label smoothing applies to both.
    Returns the loss and the logits, both still on the device (no synchronisation)."""
    with autocast:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss, logits


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """A copy of ``model`` whose weights follow ``avg = decay * avg + (1 - decay) * weights``
    after every step: an average over roughly the last 1 / (1 - decay) steps. The first
    update copies the weights, so nothing of the initialisation before it stays."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _sharded_eval(model: torch.nn.Module, split: Split, pre: Preprocess, cfg: TrainConfig,
                  device: torch.device, ctx: DistContext, num_classes: int) -> dict[str, Any]:
    """Each rank scores every world_size-th image; losses and confusion matrices are summed."""
    images, labels = split.images[ctx.rank::ctx.world_size], split.labels[ctx.rank::ctx.world_size]
    if len(labels):
        logits = predict_logits(model, images, pre, cfg.eval_batch_size, device, cfg.bf16)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum").reshape(1)
        matrix = confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    else:  # more processes than images
        loss_sum = torch.zeros(1)
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = all_reduce_sum(loss_sum.to(device), ctx)
    matrix = all_reduce_sum(matrix.to(device), ctx).cpu()
    total = int(matrix.sum())
    return {"loss": loss_sum.item() / total, "accuracy": matrix.trace().item() / total,
            "confusion": matrix}


EpochHook = Callable[[dict[str, Any], VisionTransformer], "dict[str, Any] | None"]


@dataclass
class _Run:
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
    steps_per_epoch: int
    say: Callable[[str], None]
    quiet: bool
    progress: TrainingProgress = dataclasses.field(default_factory=TrainingProgress)
    # The best weights so far, kept in memory: no shared disk is needed between processes.
    best_weights: dict[str, torch.Tensor] | None = None

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


def train(config: dict[str, Any], run_dir: str | Path, resume: bool = False,
          init_from: str | Path | None = None, data: Data | None = None,
          quiet: bool = False, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train per ``config`` into ``run_dir``; returns the final results dict.

    Under torchrun every process calls this; they train one DistributedDataParallel
    model and only rank 0 prints and writes. ``init_from``: a run or model directory (or
    Hub id) whose weights to fine-tune. ``data`` may be passed to reuse splits that are
    already loaded (notebooks, tests). ``on_epoch_end(record, model)``, called on every
    rank after each epoch's validation, may return fields to add to the epoch's metrics
    line (a benchmark's test accuracy, say); its time is not counted in the run's
    elapsed time. The caller's ``config`` is not modified.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise VitMqaError(f"run directory {run_dir} is a file")
    config = _resume_config(run_dir, config) if resume else copy.deepcopy(config)
    _absolute_data_paths(config["data"])
    train_cfg = TrainConfig(**config["train"])  # checked here: the device comes from it
    ctx, device = distributed.init(train_cfg.device)
    # The writing process holds the run directory's lock for the whole run; the emptiness
    # check comes after it, so two runs started together cannot both pass it.
    with RunLock(run_dir) if ctx.is_main else contextlib.nullcontext():
        if not resume and run_dir_has_files(run_dir):
            raise VitMqaError(f"run directory {run_dir} already exists and is not empty; "
                              "choose another, or `resume` it")
        if resume and ctx.is_main:
            remove_stale_temporaries(run_dir)
        # On an error this process exits without waiting for its peers (a barrier here could
        # pair with a collective they are in); torchrun then stops the others.
        run = _setup(config, run_dir, resume, init_from, data, quiet, ctx, device)
        if resume:
            _restore(run)
        results = _fit(run, on_epoch_end)
    distributed.shutdown(ctx)
    return results


def _setup(config: dict[str, Any], run_dir: Path, resume: bool, init_from: str | Path | None,
           data: Data | None, quiet: bool, ctx: DistContext, device: torch.device) -> _Run:
    """Data, model (from ``init_from`` when fine-tuning), optimizer and schedule."""
    data_cfg = DataConfig(**config["data"])
    aug_cfg = AugmentConfig(**config["augment"])
    train_cfg = TrainConfig(**config["train"])
    say = _log if ctx.is_main and not quiet else (lambda m: None)
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
    saved = (read_config(run_dir).get("preprocess")
             if resume and (run_dir / CONFIG_NAME).is_file() else None)
    if (source is not None and train_cfg.init_normalization == "source"
            and source.config.in_channels == pre.in_channels):
        # The pretrained weights expect their own input statistics.
        pre = dataclasses.replace(pre, mean=source.preprocess.mean, std=source.preprocess.std)
    elif isinstance(saved, dict):
        recorded = Preprocess.from_dict(saved)
        if recorded.in_channels == pre.in_channels:  # e.g. a fine-tuning run's source's
            pre = dataclasses.replace(pre, mean=recorded.mean, std=recorded.std)

    model_cfg = ViTConfig.from_dict(dict(config["model"], image_size=list(pre.image_size),
                                         in_channels=pre.in_channels,
                                         num_classes=len(data.classes)))
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
    full_config = {**config, "preprocess": pre.to_dict(), "classes": data.classes,
                   "vit_mqa_version": __version__}
    say(f"data: {data_cfg.dataset} from {data.source} ({len(data.train)} train, "
        f"{len(data.val)} val, {len(data.test)} test) | model: {count_parameters(model):,} "
        f"params, {model_cfg.num_heads} heads / {model_cfg.num_kv_heads} kv heads, "
        f"{model_cfg.num_patches} patches | device: {device}"
        + (f" x {ctx.world_size} processes" if ctx.enabled else ""))
    return _Run(full_config, run_dir, train_cfg, aug_cfg, data, pre, ctx, device, model, ddp,
                optimizer, scheduler, schedule,
                make_ema(model, train_cfg.ema_decay) if train_cfg.ema_decay else None,
                steps_per_epoch, say, quiet)


def _restore(run: _Run) -> None:
    """Continue from training_state.pt: modules, counters, and the metrics lines they cover."""
    path = run.run_dir / STATE_NAME
    if not path.exists():
        run.say(f"{run.run_dir} has no finished epoch; starting it over")
        if run.ctx.is_main:
            _keep_metrics_up_to(run.run_dir / METRICS_NAME, 0)
        return
    modules, progress = load_training_state(path)
    mismatch = describe_mismatch(
        {k: tuple(getattr(v, "shape", ())) for k, v in modules["model"].items()},
        {k: tuple(v.shape) for k, v in run.model.state_dict().items()})
    if mismatch:
        raise VitMqaError(f"cannot resume: {path} does not match the run's config: {mismatch}")
    try:
        run.model.load_state_dict(modules["model"])
        run.optimizer.load_state_dict(modules["optimizer"])
        run.scheduler.load_state_dict(modules["scheduler"])
        if not run.train_cfg.time_budget:
            # A plain run's length follows `epochs`, which a resume may change; a budgeted
            # run keeps its last plan (restored just above) until its next epoch ends.
            run.schedule.total_steps = run.train_cfg.epochs * run.steps_per_epoch
        if run.ema is not None:
            run.ema.load_state_dict(modules["ema"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise VitMqaError(f"cannot resume: {path} does not match the run's config "
                          f"({str(e).splitlines()[0]})") from None
    run.progress = progress
    run.say(f"resuming {run.run_dir} at epoch {progress.epoch + 1}")
    if run.ctx.is_main:  # drop metric lines of an epoch whose state was never saved
        _keep_metrics_up_to(run.run_dir / METRICS_NAME, progress.epoch)


def _fit(run: _Run, on_epoch_end: EpochHook | None) -> dict[str, Any]:
    """Every remaining epoch, then the test score of the best weights."""
    cfg, ctx, progress = run.train_cfg, run.ctx, run.progress
    # Opened before anything is written: a missing tensorboard package fails the run early.
    tb = (TensorBoardLogger(run.run_dir, first_step=progress.step if progress.step else None)
          if cfg.tensorboard and ctx.is_main else None)
    if ctx.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / CONFIG_NAME, run.config)
    step_model = compile_model(run.ddp) if cfg.compile else run.ddp
    images = run.data.train.images.to(run.device)
    labels = run.data.train.labels.to(run.device)
    started = time.perf_counter() - progress.elapsed_s  # times stay cumulative over resumes
    progress_start = progress.epoch
    for epoch in range(progress.epoch, cfg.epochs):
        if progress.step >= run.step_limit:
            break
        epoch_start = time.perf_counter()
        totals, step_losses, stopped_early = _train_epoch(run, step_model, images, labels, epoch,
                                                          started)
        record = _end_epoch(run, epoch, totals, time.perf_counter() - epoch_start, epoch_start,
                            started)
        if cfg.time_budget:
            _plan_for_budget(run, record["elapsed_s"], announce=epoch == progress_start)
        if on_epoch_end is not None:
            hook_start = time.perf_counter()
            record.update(on_epoch_end(dict(record), run.eval_model) or {})
            started += time.perf_counter() - hook_start  # the hook's time is not training time
        _save_epoch(run, epoch, record, tb, step_losses)
        if stopped_early:
            break
    if tb is not None:
        tb.close()
    return _final_test(run, time.perf_counter() - started)


def _plan_for_budget(run: _Run, elapsed_s: float, announce: bool) -> None:
    """Set the schedule's length so that training ends with the time budget: as many
    steps as the pace so far (validation included) fits in, at most `epochs`. Planned
    again after every epoch, so that a slow first epoch (start-up costs, a busy machine)
    does not leave the end of the budget unused; every process plans from the mean of
    their clocks, so that all keep the same learning rate."""
    cfg, spe, step = run.train_cfg, run.steps_per_epoch, run.progress.step
    clock = torch.tensor([elapsed_s], dtype=torch.float64, device=run.device)
    elapsed_s = all_reduce_sum(clock, run.ctx).item() / run.ctx.world_size
    fitting = int(cfg.time_budget * step / elapsed_s)
    run.schedule.total_steps = max(spe, step, min(fitting, cfg.epochs * spe))
    if announce:
        run.say(f"time budget {cfg.time_budget:g} s: {elapsed_s:.1f} s for {step} steps, so "
                f"the schedule ends after {run.schedule.total_steps / spe:.2f} epochs "
                f"({run.schedule.total_steps} steps; planned again after every epoch)")


def _train_epoch(run: _Run, step_model: torch.nn.Module, images: torch.Tensor,
                 labels: torch.Tensor, epoch: int, started: float
                 ) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
    """One pass over the training set: (summed loss, correct, seen over all processes),
    the per-step losses for TensorBoard, and whether the step limit or the time budget
    stopped it early."""
    cfg, ctx, device, progress = run.train_cfg, run.ctx, run.device, run.progress
    run.ddp.train()
    # A linear probe leaves the conv stem's BatchNorm statistics as they were.
    run.model.patch_embed.train(not cfg.freeze_backbone)
    # Data order is common to all ranks; augmentation and dropout differ per rank. Per-epoch
    # streams: an epoch depends only on (seed, epoch), so a resume replays it exactly.
    data_gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 0))
    aug_gen = torch.Generator(device=device)
    aug_gen.manual_seed(_epoch_seed(cfg.seed, epoch, 1 + 2 * ctx.rank))
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, 2 + 2 * ctx.rank))
    order = torch.randperm(len(run.data.train), generator=data_gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, step_losses, stopped_early = 0, [], False
    keep_losses = cfg.tensorboard and ctx.is_main  # per-step losses only for TensorBoard
    epoch_start = time.perf_counter()
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{run.planned_epochs}",
               disable=True if run.quiet or not ctx.is_main else None, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    for i in bar:
        # This rank's disjoint slice of the i-th global batch.
        start = i * cfg.batch_size + ctx.rank * run.local_batch
        x, y = make_batch(images, labels, order[start:start + run.local_batch], run.pre,
                          run.aug_cfg, aug_gen, len(run.data.classes))
        # DDP averages gradients across ranks: the global-batch gradient.
        loss, logits = training_step(step_model, run.optimizer, x, y, cfg, autocast)
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        progress.step += 1
        seen += y.shape[0]
        loss_sum += loss.detach() * y.shape[0]
        if keep_losses:
            step_losses.append(loss.detach())
        # Under mixup / CutMix, a prediction is right when it names the larger share.
        hard = y.argmax(dim=1) if y.ndim == 2 else y
        correct += (logits.detach().argmax(dim=1) == hard).sum()
        # One process checks as it goes; several check together after the epoch, so that
        # they all stop at the same point.
        if not ctx.enabled and i % 20 == 19 and not bool(torch.isfinite(loss_sum)):
            raise _diverged(run.run_dir, epoch, progress.step, cfg.lr)
        if ctx.is_main and (i % 20 == 0 or i == run.steps_per_epoch - 1):
            elapsed = time.perf_counter() - epoch_start
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                            acc=f"{correct.item() / seen:.4f}",
                            img_s=f"{ctx.world_size * seen / elapsed:.0f}", refresh=False)
        if progress.step >= run.step_limit:
            stopped_early = True
            break
        # The budget's plan comes from the first epoch's pace; should the machine slow
        # down, one process stops at the budget itself. (Several would have to agree on
        # the moment; they keep to the plan.)
        if (cfg.time_budget and not ctx.enabled and i % 20 == 19
                and time.perf_counter() - started >= cfg.time_budget):
            run.say(f"time budget of {cfg.time_budget:g} s reached at step {progress.step}")
            stopped_early = True
            break
    bar.close()
    totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                         torch.tensor(seen, device=device).double()]), ctx)
    return totals, step_losses, stopped_early


def _end_epoch(run: _Run, epoch: int, totals: torch.Tensor, train_time: float,
               epoch_start: float, started: float) -> dict[str, Any]:
    """Validation and the epoch's metrics record; a non-finite loss stops the run."""
    cfg, progress = run.train_cfg, run.progress
    if not math.isfinite(totals[0].item()):
        raise _diverged(run.run_dir, epoch, progress.step, cfg.lr)
    val = _sharded_eval(run.eval_model, run.data.val, run.pre, cfg, run.device, run.ctx,
                        len(run.data.classes))
    if not math.isfinite(val["loss"]):
        raise _diverged(run.run_dir, epoch, progress.step, cfg.lr)
    seen = max(totals[2].item(), 1)
    return {
        "epoch": epoch + 1,
        "step": progress.step,
        "train_loss": totals[0].item() / seen,
        "train_accuracy": totals[1].item() / seen,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": max(group["lr"] for group in run.optimizer.param_groups),
        "images_per_s": seen / train_time,
        "epoch_time_s": time.perf_counter() - epoch_start,
        "elapsed_s": time.perf_counter() - started,
        "processes": run.ctx.world_size,
    }


def _save_epoch(run: _Run, epoch: int, record: dict[str, Any],
                tb: TensorBoardLogger | None, step_losses: list[torch.Tensor]) -> None:
    """Model selection (the best validation accuracy, or the last epoch), then the epoch's
    files."""
    progress = run.progress
    improved = (run.train_cfg.select == "last"
                or record["val_accuracy"] > progress.best_val_accuracy)  # same on every rank
    if improved:
        progress.best_val_accuracy, progress.best_epoch = record["val_accuracy"], epoch + 1
        run.best_weights = {k: v.detach().clone() for k, v in run.eval_model.state_dict().items()}
    progress.epoch, progress.elapsed_s = epoch + 1, record["elapsed_s"]
    if run.ctx.is_main:
        save_weights(run.eval_model, run.run_dir / LAST_WEIGHTS_NAME)
        if improved:
            save_weights(run.eval_model, run.run_dir / WEIGHTS_NAME)
        append_jsonl(run.run_dir / METRICS_NAME, record)
        if tb is not None:
            tb.log_epoch(record, step_losses)
        # Written last, and alone sufficient to resume: a crash before this line resumes
        # from the previous epoch, whose metrics line is then dropped.
        save_training_state(run.run_dir / STATE_NAME, run.modules(), progress)
    run.say(f"epoch {epoch + 1:>3}/{run.planned_epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.4f}  val loss {record['val_loss']:.4f}  "
            f"val acc {record['val_accuracy']:.4f}  {record['images_per_s']:.0f} img/s  "
            f"{record['elapsed_s']:.0f}s")


def _final_test(run: _Run, train_time: float) -> dict[str, Any]:
    """The selected checkpoint (best validation accuracy, or last), scored on the test set."""
    progress = run.progress
    if run.best_weights is not None:
        run.eval_model.load_state_dict(run.best_weights)
    else:  # the selected epoch was before a resume
        load_weights(run.eval_model, run.run_dir / WEIGHTS_NAME, run.device)
    test = _sharded_eval(run.eval_model, run.data.test, run.pre, run.train_cfg, run.device,
                         run.ctx, len(run.data.classes))
    report = report_from_confusion(test["confusion"], run.data.classes)
    results = {
        "test_accuracy": report["accuracy"],
        "test_loss": test["loss"],
        "best_epoch": progress.best_epoch,
        "best_val_accuracy": progress.best_val_accuracy,
        "train_time_s": train_time,
        "parameters": count_parameters(run.model),
        "steps": progress.step,
        "processes": run.ctx.world_size,
        "per_class": report["per_class"],
    }
    if run.ctx.is_main:
        write_json(run.run_dir / RESULTS_NAME, results)
    chosen = "best" if run.train_cfg.select == "best" else "last"
    run.say(f"test accuracy {100 * results['test_accuracy']:.2f}% ({chosen} epoch "
            f"{progress.best_epoch}, val {100 * progress.best_val_accuracy:.2f}%) in "
            f"{train_time:.0f}s -> {run.run_dir}")
    return results


def _absolute_data_paths(data: dict[str, Any]) -> None:
    """Data paths are recorded absolute, so that `vit-mqa eval RUN` works from any folder."""
    if data.get("data_dir"):
        data["data_dir"] = str(Path(data["data_dir"]).expanduser().absolute())
    dataset = data.get("dataset")
    if isinstance(dataset, str) and dataset not in DATASETS and Path(dataset).expanduser().is_dir():
        data["dataset"] = str(Path(dataset).expanduser().absolute())


def _diverged(run_dir: Path, epoch: int, step: int, lr: float) -> VitMqaError:
    """The error that stops a run whose loss is no longer finite. Nothing of the diverged
    epoch is saved: the checkpoints on disk are those of the last good epoch."""
    kept = (f"{run_dir} keeps the weights and state of epoch {epoch}" if epoch > 0
            else "no epoch finished, so no weights were saved")
    return VitMqaError(f"training diverged: the loss is NaN or infinite in epoch {epoch + 1} "
                       f"(by step {step}); {kept}; try a lower `lr` (now {lr:g})")


def _metrics_epoch(path: Path, number: int, line: str) -> int:
    try:
        record = json.loads(line)
        epoch = record.get("epoch", 0) if isinstance(record, dict) else None
    except json.JSONDecodeError:
        epoch = None
    if type(epoch) is not int:
        raise VitMqaError(f"cannot resume: line {number} of {path} is not an epoch record")
    return epoch


def _keep_metrics_up_to(path: Path, epoch: int) -> None:
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        kept = [x for n, x in enumerate(lines, 1) if _metrics_epoch(path, n, x) <= epoch]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(x + "\n" for x in kept))


def _resume_config(run_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's own config; only settings that do not change the run may be overridden."""
    return resume_config(read_config(run_dir), overrides, run_dir)
