"""Training: one function, ``train(config, run_dir)``, that the CLI and notebooks call.

A run is fully described by its config, a plain nested dict with the sections
"model", "data", "augment" and "train" (plus the preset's name). ``build_config``
layers defaults < preset < JSON file < explicit overrides; ``train`` writes the
run directory described in ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint import (
    CONFIG_NAME,
    LAST_WEIGHTS_NAME,
    METRICS_NAME,
    RESULTS_NAME,
    STATE_NAME,
    WEIGHTS_NAME,
    RunLock,
    append_jsonl,
    describe_mismatch,
    load_training_state,
    load_weights,
    remove_stale_temporaries,
    run_dir_has_files,
    save_training_state,
    save_weights,
    write_json,
)
from ..config.sections import TrainConfig
from ..data.datasets import Data
from ..device import cpu_bf16_unit
from ..errors import VitMqaError
from ..evaluation.calibration import fit_on_split, threshold_summary
from ..evaluation.evaluate import report_from_confusion
from ..models.vit import count_parameters
from . import distributed
from .distributed import all_reduce_sum
from .log import log
from .setup import EpochHook, Run, setup_run
from .state import absolute_data_paths, diverged_error, keep_metrics_up_to, resumed_config
from .steps import (
    compile_model,
    cpu_speedups,
    make_batch,
    outlier_batch,
    sharded_eval,
    training_step,
)
from .tensorboard_log import TensorBoardLogger


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    # Per-epoch streams: an epoch's data order and augmentation depend only on
    # (seed, epoch), so resuming at an epoch boundary replays them exactly.
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


def train(config: dict[str, Any], run_dir: str | Path, resume: bool = False,
          init_from: str | Path | None = None, data: Data | None = None,
          quiet: bool = False, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train per ``config`` (what ``build_config`` returns) into ``run_dir``; returns the
    final results dict. With ``resume``, ``config`` holds only overrides of the settings a
    resumed run may change, as ``build_config`` takes them (flat names or sections).

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
    config = resumed_config(run_dir, config) if resume else copy.deepcopy(config)
    config = {**config, "data": absolute_data_paths(config["data"])}
    ctx, device = distributed.init(TrainConfig(**config["train"]).device)
    if not resume:  # a resumed run keeps what it recorded
        unit = cpu_bf16_unit()
        train_section, changed = cpu_speedups(config["train"], device, unit)
        config = {**config, "train": train_section}
        if changed and ctx.is_main and not quiet:
            log(f"this CPU multiplies bf16 in hardware ({unit}): {' and '.join(changed)} "
                "switched on (--no-cpu-speedups keeps them off)")
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
        run = setup_run(config, run_dir, resume, init_from, data, quiet, ctx, device)
        if resume:
            _restore(run)
        results = _fit(run, on_epoch_end)
    distributed.shutdown(ctx)
    return results


def _restore(run: Run) -> None:
    """Continue from training_state.pt: modules, counters, and the metrics lines they cover."""
    path = run.run_dir / STATE_NAME
    if not path.exists():
        run.say(f"{run.run_dir} has no finished epoch; starting it over")
        if run.ctx.is_main:
            keep_metrics_up_to(run.run_dir / METRICS_NAME, 0)
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
        keep_metrics_up_to(run.run_dir / METRICS_NAME, progress.epoch)


def _fit(run: Run, on_epoch_end: EpochHook | None) -> dict[str, Any]:
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


def _plan_for_budget(run: Run, elapsed_s: float, announce: bool) -> None:
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


def _train_epoch(run: Run, step_model: torch.nn.Module, images: torch.Tensor,
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
    outliers = run.outliers[0] if run.outliers is not None else None
    outlier_gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 1000 + ctx.rank))
    outlier_count = max(1, round(cfg.outlier_batch * run.local_batch))
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
        x_out = None
        if outliers is not None:
            pick = torch.randint(len(outliers), (outlier_count,), generator=outlier_gen)
            x_out = outlier_batch(outliers, pick.to(device), run.pre, run.aug_cfg, aug_gen)
        # DDP averages gradients across ranks: the global-batch gradient.
        loss, logits = training_step(step_model, run.optimizer, x, y, cfg, autocast,
                                     run.teacher, x_out)
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
            raise diverged_error(run.run_dir, epoch, progress.step, cfg.lr)
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


def _end_epoch(run: Run, epoch: int, totals: torch.Tensor, train_time: float,
               epoch_start: float, started: float) -> dict[str, Any]:
    """Validation and the epoch's metrics record; a non-finite loss stops the run."""
    cfg, progress = run.train_cfg, run.progress
    if not math.isfinite(totals[0].item()):
        raise diverged_error(run.run_dir, epoch, progress.step, cfg.lr)
    val = sharded_eval(run.eval_model, run.data.val, run.pre, cfg, run.device, run.ctx,
                        len(run.data.classes))
    if not math.isfinite(val["loss"]):
        raise diverged_error(run.run_dir, epoch, progress.step, cfg.lr)
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


def _save_epoch(run: Run, epoch: int, record: dict[str, Any],
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


def _final_test(run: Run, train_time: float) -> dict[str, Any]:
    """The selected checkpoint (best validation accuracy, or last), scored on the test set."""
    progress = run.progress
    if run.best_weights is not None:
        run.eval_model.load_state_dict(run.best_weights)
    else:  # the selected epoch was before a resume
        load_weights(run.eval_model, run.run_dir / WEIGHTS_NAME, run.device)
    # In fp32 even after bf16 training: the figure `vit-mqa eval` gives for these weights.
    test = sharded_eval(run.eval_model, run.data.test, run.pre, run.train_cfg, run.device,
                         run.ctx, len(run.data.classes), fp32=True)
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
        # Fitted on validation images only: the test split stays untouched by any choice.
        # On fp32 logits, as `predict` computes them.
        cfg = run.train_cfg
        calibration = fit_on_split(run.eval_model, run.data.val.images, run.data.val.labels,
                                   run.pre, run.aug_cfg, cfg.seed, run.device,
                                   cfg.eval_batch_size, bf16=False,
                                   outliers=run.outliers[1] if run.outliers else None,
                                   decline_unknown=cfg.decline_unknown,
                                   decline_unsure=cfg.decline_unsure)
        results["calibration"] = calibration
        write_json(run.run_dir / CONFIG_NAME, {**run.config, "calibration": calibration})
        write_json(run.run_dir / RESULTS_NAME, results)
        run.say(f"calibration: temperature {calibration['temperature']:.3f} (validation NLL "
                f"{calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f} on "
                f"{calibration['images']} images)")
        run.say(threshold_summary(calibration["thresholds"]))
    chosen = "best" if run.train_cfg.select == "best" else "last"
    run.say(f"test accuracy {100 * results['test_accuracy']:.2f}% ({chosen} epoch "
            f"{progress.best_epoch}, val {100 * progress.best_val_accuracy:.2f}%) in "
            f"{train_time:.0f}s -> {run.run_dir}")
    return results
