"""One training step and what it needs: batches (augmented, normalised), the step itself,
the weight average, sharded evaluation, and the CPU speed-ups (bf16, torch.compile).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config.sections import AugmentConfig, TrainConfig
from ..data.augment import augment, mix_batch
from ..data.datasets import Split
from ..data.preprocess import Preprocess
from ..evaluation.evaluate import confusion_matrix, predict_logits
from .distill import Teacher, distillation_loss
from .distributed import DistContext, all_reduce_sum
from .log import log


def cpu_speedups(train: dict[str, Any], device: torch.device, bf16_unit: str | None
                 ) -> tuple[dict[str, Any], list[str]]:
    """Switch on what pays on this CPU in a "train" config section that asks for
    ``cpu_speedups``: bf16 autocast where the CPU multiplies bf16 in hardware, and
    torch.compile as well with Intel AMX, where both paid per training step; on AVX-512's
    bf16 dot products (AMD Zen 4) bf16 paid and compile did not (benchmarks/step_speed.py;
    docs/benchmarks.md, "CCT's tokenizer and sequence pooling, bf16 and torch.compile").
    Returns the section as the run records it (a new dict) and the names of the settings
    changed."""
    if not (train.get("cpu_speedups", True) and device.type == "cpu" and bf16_unit):
        return dict(train), []
    wanted = ("bf16", "compile") if bf16_unit == "amx_bf16" else ("bf16",)
    changed = [name for name in wanted if not train.get(name)]
    return {**train, **{name: True for name in changed}}, changed


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
            log(f"torch.compile needs a C++ compiler on the CPU ({missing}); training eagerly")
            return model
        torch._dynamo.config.suppress_errors = True
        return torch.compile(model)
    except (RuntimeError, ImportError) as e:  # e.g. a Python that this torch cannot compile on
        log(f"torch.compile unavailable ({str(e).splitlines()[0]}); training eagerly")
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


def outlier_batch(outliers: torch.Tensor, idx: torch.Tensor, pre: Preprocess,
                  aug_cfg: AugmentConfig, aug_gen: torch.Generator) -> torch.Tensor:
    """Outlier pictures (uint8, on the device) at ``idx``, augmented as the classes' images
    are (no mixing: they have no labels to mix) and normalised."""
    return pre.normalize(augment(outliers[idx].float().div_(255.0), aug_cfg, aug_gen))


def outlier_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy toward the uniform prediction (Hendrycks et al. 2019): the mean over
    classes of -log p, smallest when the model favours none of them."""
    return -logits.float().log_softmax(dim=1).mean(dim=1).mean()


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, cfg: TrainConfig, autocast: torch.autocast,
                  teacher: Teacher | None = None, x_outliers: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: forward, loss, backward, clipping, update. ``y``
    holds class indices or soft targets (mixup / CutMix); label smoothing applies to both.
    With a ``teacher``, the loss is blended with the loss on its answers for the same
    batch (``distill``). ``x_outliers``, pictures of none of the classes, go through the
    same forward pass and add ``outlier_weight`` times ``outlier_loss``. Returns the loss
    and the classes' logits, both still on the device (no synchronisation)."""
    with autocast:
        both = model(x if x_outliers is None else torch.cat([x, x_outliers]))
        logits = both[:len(x)]
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if teacher is not None:
            loss = distillation_loss(logits.float(), loss, teacher(x), cfg)
        if x_outliers is not None:
            loss = loss + cfg.outlier_weight * outlier_loss(both[len(x):])
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


def sharded_eval(model: torch.nn.Module, split: Split, pre: Preprocess, cfg: TrainConfig,
                  device: torch.device, ctx: DistContext, num_classes: int,
                  fp32: bool = False) -> dict[str, Any]:
    """Each rank scores every world_size-th image; losses and confusion matrices are summed.
    In the run's precision (bf16 where it trains in bf16), or in fp32 with ``fp32``: the
    precision of `vit-mqa eval` and `predict`, whose figures the final test must match."""
    images, labels = split.images[ctx.rank::ctx.world_size], split.labels[ctx.rank::ctx.world_size]
    if len(labels):
        logits = predict_logits(model, images, pre, cfg.eval_batch_size, device,
                                cfg.bf16 and not fp32)
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
