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

from . import __version__, distributed
from .augment import AugmentConfig, augment
from .checkpoint import (
    CONFIG_NAME,
    LAST_WEIGHTS_NAME,
    METRICS_NAME,
    RESULTS_NAME,
    STATE_NAME,
    WEIGHTS_NAME,
    RunLock,
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
from .data import DATASETS, Data, DataConfig, Split, load_data, locate_idx_dataset
from .distributed import DistContext, all_reduce_sum
from .errors import VitMqaError, check_field_types
from .evaluate import confusion_matrix, predict_logits, report_from_confusion
from .interop import transfer_weights
from .model import VisionTransformer, ViTConfig, count_parameters
from .preprocess import Preprocess
from .presets import DEFAULT_PRESET, PRESETS
from .tensorboard_log import TensorBoardLogger


@dataclass
class TrainConfig:
    """The "train" part of config.json."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3  # peak learning rate, reached after warm-up
    min_lr: float = 1e-5  # end of the cosine decay
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings, CLS token
    beta2: float = 0.999
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 switches clipping off
    bf16: bool = False  # bf16 autocast (fast on GPUs and CPUs with native bf16 matmul)
    compile: bool = False  # torch.compile the training step's model (falls back to eager)
    seed: int = 0  # fixes initialisation, data order, augmentation and dropout
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    eval_batch_size: int = 1000
    max_steps: int = 0  # stop after this many optimizer steps in all (0 = no cap)
    # Exponential moving average of the weights, updated every step (0 = off; 0.998 averages
    # about the last 500 steps). When on, validation, model selection, the saved weights and
    # the test score use the average.
    ema_decay: float = 0.0
    tensorboard: bool = False  # also log scalars to RUN/tensorboard/ (needs tensorboard)
    # Fine-tuning. freeze_backbone trains only the classification head (a linear probe).
    # layer_decay < 1 scales each block's learning rate by layer_decay ** (blocks above it
    # + 1), the head keeping lr (Clark et al. 2020; BEiT). init_normalization, with
    # --init-from: "source" normalises inputs with the pretrained model's mean and std,
    # "data" recomputes them from this data.
    freeze_backbone: bool = False
    layer_decay: float = 1.0
    init_normalization: str = "source"

    def validate(self) -> None:
        check_field_types(self, "train")
        positive = ("epochs", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise VitMqaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise VitMqaError(f"need 0 <= min_lr <= lr and lr > 0, got {self.min_lr}, {self.lr}")
        if self.lr > 10:
            raise VitMqaError(f"lr {self.lr} is far outside any useful range (at most 10)")
        if not 0 <= self.beta2 < 1:
            raise VitMqaError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not 0 <= self.seed < 2**63:
            raise VitMqaError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.epochs > 100_000 or self.warmup_epochs > 100_000:
            raise VitMqaError(f"epochs and warmup_epochs must be <= 100000, got "
                              f"{self.epochs}, {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise VitMqaError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise VitMqaError("warmup_epochs, weight_decay and grad_clip must be >= 0")
        if self.max_steps < 0:
            raise VitMqaError(f"max_steps must be >= 0, got {self.max_steps}")
        if not 0 <= self.ema_decay < 1:
            raise VitMqaError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.layer_decay <= 1:
            raise VitMqaError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.init_normalization not in ("source", "data"):
            raise VitMqaError(f"init_normalization must be 'source' or 'data', got "
                              f"{self.init_normalization!r}")


SECTIONS: dict[str, type] = {
    "model": ViTConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
}
# Settings a resumed run may change: where data lives, where and how fast it runs,
# how long.
RESUME_OVERRIDABLE = (("train", "epochs"), ("train", "max_steps"), ("train", "device"),
                      ("train", "eval_batch_size"), ("train", "compile"), ("data", "data_dir"),
                      ("train", "tensorboard"))
# Taken from the data, never from a flag.
DERIVED_MODEL_FIELDS = ("image_size", "in_channels", "num_classes")


def default_config() -> dict[str, dict[str, Any]]:
    config = {}
    for section, cls in SECTIONS.items():
        config[section] = {f.name: copy.deepcopy(f.default) for f in dataclasses.fields(cls)}
    config["model"]["image_size"] = list(ViTConfig().image_size)
    return config


def field_section(name: str) -> str:
    """The section that owns a flat setting name (names are unique across sections)."""
    for section, cls in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            if section == "model" and name in DERIVED_MODEL_FIELDS:
                continue  # e.g. image_size: the data section's is the one to set
            return section
    raise VitMqaError(f"unknown setting {name!r}")


def _merge(config: dict[str, dict[str, Any]], layer: dict[str, Any], origin: str) -> None:
    for section, values in layer.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise VitMqaError(f"{origin}: unknown config section {section!r} "
                              f"(expected {', '.join(SECTIONS)})")
        for key, value in values.items():
            if key not in config[section]:
                raise VitMqaError(f"{origin}: unknown setting {section}.{key}")
            config[section][key] = _checked(section, key, value, origin)


def _checked(section: str, key: str, value: Any, origin: str) -> Any:
    """The value if its type fits the setting (ints are accepted for floats), else an error."""
    ftype = str(next(f.type for f in dataclasses.fields(SECTIONS[section]) if f.name == key))
    base = ftype.split("|")[0].strip()
    if value is None and "None" in ftype:
        return None
    kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
    if base not in kinds:  # image_size: int or [h, w]; checked by ViTConfig itself
        return value
    if isinstance(value, kinds[base]) and (base == "bool" or not isinstance(value, bool)):
        return float(value) if base == "float" else value
    raise VitMqaError(f"{origin}: {section}.{key} must be {ftype}, got {value!r}")


def build_config(preset: str | None = None, config_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None,
                 init_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """defaults < preset < init_model < JSON config file < overrides (flat names).

    ``init_model`` is the "model" section of a run to start from (``--init-from``):
    its architecture replaces the preset's.
    """
    config: dict[str, Any] = default_config()
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise VitMqaError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    _merge(config, PRESETS[preset], f"preset {preset}")
    if init_model is not None:
        shape = {k: v for k, v in init_model.items() if k not in DERIVED_MODEL_FIELDS}
        _merge(config, {"model": shape}, "--init-from config.json")
    if config_file is not None:
        path = Path(config_file)
        try:
            layer = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VitMqaError(f"cannot read config file {path}: "
                              f"{str(e).splitlines()[0]}") from None
        if not isinstance(layer, dict):
            raise VitMqaError(f"config file {path} must hold a JSON object")
        _merge(config, layer, str(path))
    for name, value in (overrides or {}).items():
        section = field_section(name)
        config[section][name] = _checked(section, name, value, "override")
    config["preset"] = preset
    return config


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


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    # Per-epoch streams: an epoch's data order and augmentation depend only on
    # (seed, epoch), so resuming at an epoch boundary replays them exactly.
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()  # epoch lines appear at once in logs, not at exit


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile, or the model itself where compiling is not supported.

    Dynamo's ``suppress_errors`` makes a graph that fails to compile (no C++ compiler, an
    unsupported platform) run eagerly instead of failing the run.
    """
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        return torch.compile(model)
    except (RuntimeError, ImportError) as e:  # e.g. a Python that this torch cannot compile on
        _log(f"torch.compile unavailable ({str(e).splitlines()[0]}); training eagerly")
        return model


def make_batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, pre: Preprocess,
               aug_cfg: AugmentConfig, aug_gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels already on the device, batch indices -> augmented, normalised
    model input and labels. Everything stays on the device: no loader processes, no copies."""
    x = images[idx].float().div_(255.0)
    return pre.normalize(augment(x, aug_cfg, aug_gen)), labels[idx]


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, cfg: TrainConfig, autocast: torch.autocast
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: forward, loss, backward, clipping, update.
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


def train(config: dict[str, Any], run_dir: str | Path, resume: bool = False,
          init_from: str | Path | None = None, data: Data | None = None,
          quiet: bool = False, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train per ``config`` into ``run_dir``; returns the final results dict.

    Under torchrun every process calls this; they train one DistributedDataParallel
    model and only rank 0 prints and writes. ``data`` may be passed to reuse splits
    that are already loaded (notebooks, tests). ``on_epoch_end(record, model)``, called
    on every rank after each epoch's validation, may return fields to add to the
    epoch's metrics line (a benchmark's test accuracy, say); its time is not counted in
    the run's elapsed time.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise VitMqaError(f"run directory {run_dir} is a file")
    config = _resume_config(run_dir, config) if resume else copy.deepcopy(config)
    _absolute_data_paths(config["data"])
    data_cfg = DataConfig(**config["data"])
    aug_cfg = AugmentConfig(**config["augment"])
    train_cfg = TrainConfig(**config["train"])
    data_cfg.validate()
    aug_cfg.validate()
    train_cfg.validate()
    ctx, device = distributed.init(train_cfg.device)
    # The writing process holds the run directory's lock for the whole run; the emptiness
    # check comes after it, so two runs started together cannot both pass it.
    with RunLock(run_dir) if ctx.is_main else contextlib.nullcontext():
        if not resume and run_dir_has_files(run_dir):
            raise VitMqaError(f"run directory {run_dir} already exists and is not empty; "
                              "choose another --out or pass --resume")
        if resume and ctx.is_main:
            remove_stale_temporaries(run_dir)
        # On an error this process exits without waiting for its peers (a barrier here could
        # pair with a collective they are in); torchrun then stops the others.
        results = _train(config, run_dir, resume, init_from, data, quiet, data_cfg, aug_cfg,
                         train_cfg, ctx, device, on_epoch_end)
    distributed.shutdown(ctx)
    return results


def _train(config: dict[str, Any], run_dir: Path, resume: bool, init_from: str | Path | None,
           data: Data | None, quiet: bool, data_cfg: DataConfig, aug_cfg: AugmentConfig,
           train_cfg: TrainConfig, ctx: DistContext, device: torch.device,
           on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    saved_preprocess = read_config(run_dir).get("preprocess") if resume and (
        run_dir / CONFIG_NAME).is_file() else None
    say = _log if ctx.is_main and not quiet else (lambda m: None)
    if train_cfg.batch_size % ctx.world_size:
        raise VitMqaError(f"batch_size {train_cfg.batch_size} is not divisible by the "
                          f"{ctx.world_size} processes")
    local_batch = train_cfg.batch_size // ctx.world_size
    distributed.barrier(ctx)  # every rank has checked run_dir before rank 0 writes to it

    if data is None:
        spec = DATASETS.get(data_cfg.dataset)
        must_download = spec is not None and locate_idx_dataset(spec, data_cfg.data_dir) is None
        if must_download and not ctx.is_main:
            distributed.barrier(ctx)  # rank 0 downloads into the cache first
        data = load_data(data_cfg)
        if must_download and ctx.is_main:
            distributed.barrier(ctx)
    pre = data.preprocess
    source = VisionTransformer.from_pretrained(init_from) if init_from is not None else None
    if (source is not None and train_cfg.init_normalization == "source"
            and source.config.in_channels == pre.in_channels):
        # The pretrained weights expect their own input statistics.
        pre = dataclasses.replace(pre, mean=source.preprocess.mean, std=source.preprocess.std)
    elif resume and isinstance(saved_preprocess, dict):
        saved = Preprocess.from_dict(saved_preprocess)
        if saved.in_channels == pre.in_channels:  # e.g. a fine-tuning run's source statistics
            pre = dataclasses.replace(pre, mean=saved.mean, std=saved.std)
    model_fields = dict(config["model"], image_size=list(pre.image_size),
                        in_channels=pre.in_channels, num_classes=len(data.classes))
    model_cfg = ViTConfig.from_dict(model_fields)
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

    steps_per_epoch = len(data.train) // train_cfg.batch_size
    if steps_per_epoch < 1:
        raise VitMqaError(f"batch_size {train_cfg.batch_size} exceeds the "
                          f"{len(data.train)} training images")
    total_steps = train_cfg.epochs * steps_per_epoch
    warmup = min(int(train_cfg.warmup_epochs * steps_per_epoch), total_steps)
    min_ratio = train_cfg.min_lr / train_cfg.lr
    optimizer = make_optimizer(model, train_cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, min_ratio))
    ema = make_ema(model, train_cfg.ema_decay) if train_cfg.ema_decay else None
    # The weights that are validated, saved and tested: the average when there is one.
    eval_model = ema.module if ema is not None else model

    full_config = {**config, "preprocess": pre.to_dict(), "classes": data.classes,
                   "vit_mqa_version": __version__}
    start_epoch, step, best_acc, best_epoch = 0, 0, -1.0, -1
    earlier_time = 0.0  # training seconds before a resume, so that times stay cumulative
    best_state: dict[str, torch.Tensor] | None = None  # kept in memory: no shared disk needed
    if resume and (run_dir / STATE_NAME).exists():
        state = load_training_state(run_dir / STATE_NAME)
        mismatch = describe_mismatch(
            {k: tuple(getattr(v, "shape", ())) for k, v in state["model"].items()},
            {k: tuple(v.shape) for k, v in model.state_dict().items()})
        if mismatch:
            raise VitMqaError(f"cannot resume: {run_dir / STATE_NAME} does not match the "
                              f"run's config: {mismatch}")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise VitMqaError(f"cannot resume: {run_dir / STATE_NAME} does not match the "
                              f"run's config ({str(e).splitlines()[0]})") from None
        start_epoch, step = state["epoch"], state["step"]
        earlier_time = float(state.get("elapsed_s", 0.0))
        best_acc, best_epoch = state["best_val_accuracy"], state["best_epoch"]
        say(f"resuming {run_dir} at epoch {start_epoch + 1}")
        if ctx.is_main:  # drop metric lines of an epoch whose state was never saved
            _keep_metrics_up_to(run_dir / METRICS_NAME, start_epoch)
    elif resume:
        say(f"{run_dir} has no finished epoch; starting it over")
        if ctx.is_main:
            _keep_metrics_up_to(run_dir / METRICS_NAME, 0)
    # Opened before anything is written: a missing tensorboard package fails the run early.
    tb = (TensorBoardLogger(run_dir, first_step=step if resume else None)
          if train_cfg.tensorboard and ctx.is_main else None)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG_NAME, full_config)
    ddp = (torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
        if ctx.enabled else model)
    step_model = compile_model(ddp) if train_cfg.compile else ddp

    say(f"data: {data_cfg.dataset} from {data.source} ({len(data.train)} train, "
        f"{len(data.val)} val, {len(data.test)} test) | model: {count_parameters(model):,} "
        f"params, {model_cfg.num_heads} heads / {model_cfg.num_kv_heads} kv heads, "
        f"{model_cfg.num_patches} patches | device: {device}"
        + (f" x {ctx.world_size} processes" if ctx.enabled else ""))

    train_images = data.train.images.to(device)
    train_labels = data.train.labels.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_cfg.bf16)
    data_gen = torch.Generator()
    aug_gen = torch.Generator(device=device)
    started = time.perf_counter() - earlier_time
    stopped_early = False

    for epoch in range(start_epoch, train_cfg.epochs):
        if train_cfg.max_steps and step >= train_cfg.max_steps:
            break
        ddp.train()
        # Data order is common to all ranks; augmentation and dropout differ per rank.
        data_gen.manual_seed(_epoch_seed(train_cfg.seed, epoch, 0))
        aug_gen.manual_seed(_epoch_seed(train_cfg.seed, epoch, 1 + 2 * ctx.rank))
        torch.manual_seed(_epoch_seed(train_cfg.seed, epoch, 2 + 2 * ctx.rank))
        order = torch.randperm(len(data.train), generator=data_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        step_losses: list[torch.Tensor] = []  # for TensorBoard; read once per epoch
        epoch_start = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{train_cfg.epochs}",
                   disable=True if quiet or not ctx.is_main else None, leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        for i in bar:
            # This rank's disjoint slice of the i-th global batch.
            start = i * train_cfg.batch_size + ctx.rank * local_batch
            idx = order[start:start + local_batch]
            x, y = make_batch(train_images, train_labels, idx, pre, aug_cfg, aug_gen)
            # DDP averages gradients across ranks: the global-batch gradient.
            loss, logits = training_step(step_model, optimizer, x, y, train_cfg, autocast)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            seen += y.shape[0]
            loss_sum += loss.detach() * y.shape[0]
            if tb is not None:
                step_losses.append(loss.detach())
            correct += (logits.detach().argmax(dim=1) == y).sum()
            # One process checks as it goes; several check together after the epoch, so
            # that they all stop at the same point.
            if not ctx.enabled and i % 20 == 19 and not bool(torch.isfinite(loss_sum)):
                raise _diverged(run_dir, epoch, step, train_cfg.lr)
            if ctx.is_main and (i % 20 == 0 or i == steps_per_epoch - 1):
                elapsed = time.perf_counter() - epoch_start
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                acc=f"{correct.item() / seen:.4f}",
                                img_s=f"{ctx.world_size * seen / elapsed:.0f}", refresh=False)
            if train_cfg.max_steps and step >= train_cfg.max_steps:
                stopped_early = True
                break
        bar.close()
        totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                             torch.tensor(seen, device=device).double()]), ctx)
        train_time = time.perf_counter() - epoch_start
        if not math.isfinite(totals[0].item()):
            raise _diverged(run_dir, epoch, step, train_cfg.lr)
        val = _sharded_eval(eval_model, data.val, pre, train_cfg, device, ctx, len(data.classes))
        if not math.isfinite(val["loss"]):
            raise _diverged(run_dir, epoch, step, train_cfg.lr)
        seen_all = max(totals[2].item(), 1)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": totals[0].item() / seen_all,
            "train_accuracy": totals[1].item() / seen_all,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": max(group["lr"] for group in optimizer.param_groups),
            "images_per_s": seen_all / train_time,
            "epoch_time_s": time.perf_counter() - epoch_start,
            "elapsed_s": time.perf_counter() - started,
            "processes": ctx.world_size,
        }
        if on_epoch_end is not None:
            hook_start = time.perf_counter()
            record.update(on_epoch_end(dict(record), eval_model) or {})
            started += time.perf_counter() - hook_start  # the hook's time is not training time
        improved = val["accuracy"] > best_acc  # the same decision on every rank
        if improved:
            best_acc, best_epoch = val["accuracy"], epoch + 1
            best_state = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
        if ctx.is_main:
            save_weights(eval_model, run_dir / LAST_WEIGHTS_NAME)
            if improved:
                save_weights(eval_model, run_dir / WEIGHTS_NAME)
            append_jsonl(run_dir / METRICS_NAME, record)
            if tb is not None:
                tb.log_epoch(record, step_losses)
            # Written last, and alone sufficient to resume: a crash before this line
            # resumes from the previous epoch, whose metrics line is then dropped.
            save_training_state(run_dir / STATE_NAME, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "best_val_accuracy": best_acc,
                "best_epoch": best_epoch,
                "elapsed_s": record["elapsed_s"],
                **({"ema": ema.state_dict()} if ema is not None else {}),
            })
        say(f"epoch {epoch + 1:>3}/{train_cfg.epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.4f}  val loss {val['loss']:.4f}  "
            f"val acc {val['accuracy']:.4f}  {record['images_per_s']:.0f} img/s  "
            f"{record['elapsed_s']:.0f}s")
        if stopped_early:
            break

    if tb is not None:
        tb.close()
    # Final evaluation: the best checkpoint by validation accuracy, on the test set.
    if best_state is not None:
        eval_model.load_state_dict(best_state)
    else:  # the best epoch was before a resume
        load_weights(eval_model, run_dir / WEIGHTS_NAME, device)
    test = _sharded_eval(eval_model, data.test, pre, train_cfg, device, ctx, len(data.classes))
    report = report_from_confusion(test["confusion"], data.classes)
    results = {
        "test_accuracy": report["accuracy"],
        "test_loss": test["loss"],
        "best_epoch": best_epoch,
        "best_val_accuracy": best_acc,
        "train_time_s": time.perf_counter() - started,
        "parameters": count_parameters(model),
        "steps": step,
        "processes": ctx.world_size,
        "per_class": report["per_class"],
    }
    if ctx.is_main:
        write_json(run_dir / RESULTS_NAME, results)
    say(f"test accuracy {100 * results['test_accuracy']:.2f}% (best epoch {best_epoch}, "
        f"val {100 * best_acc:.2f}%) in {results['train_time_s']:.0f}s -> {run_dir}")
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
                       f"(by step {step}); {kept}; try a lower --lr (now {lr:g})")


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
    saved = read_config(run_dir)
    missing = [k for k in SECTIONS if not isinstance(saved.get(k), dict)]
    if missing:
        raise VitMqaError(f"cannot resume {run_dir}: its config.json has no "
                          f"{', '.join(missing)} section (not a training run)")
    config = {k: copy.deepcopy(saved[k]) for k in (*SECTIONS, "preset") if k in saved}
    for section, values in overrides.items():
        for key, value in values.items():
            if (section, key) not in RESUME_OVERRIDABLE:
                allowed = ", ".join("--" + k.replace("_", "-") for _, k in RESUME_OVERRIDABLE)
                raise VitMqaError(f"--{key.replace('_', '-')} cannot change on --resume "
                                  f"(the run keeps its settings; allowed: {allowed})")
            config[section][key] = _checked(section, key, value, "resume")
    return config
