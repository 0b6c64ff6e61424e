"""TensorBoard scalars for a training run (``vit-mqa train --tensorboard``).

Written to ``RUN/tensorboard/``, all against the optimizer step so that per-step and
per-epoch curves share one axis:

    loss/train_step   training loss of every step (this process's batch)
    loss/train        mean training loss of the epoch
    loss/val          validation loss after the epoch
    accuracy/train    training accuracy of the epoch (on augmented batches)
    accuracy/val      validation accuracy after the epoch
    lr                learning rate at the end of the epoch

Needs the ``tensorboard`` package (``pip install 'vit-mqa[tensorboard]'``); torch's
``SummaryWriter`` writes the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import VitMqaError

TENSORBOARD_DIR = "tensorboard"
EPOCH_TAGS = {"loss/train": "train_loss", "loss/val": "val_loss",
              "accuracy/train": "train_accuracy", "accuracy/val": "val_accuracy", "lr": "lr"}
STEP_LOSS_TAG = "loss/train_step"


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise VitMqaError("`tensorboard` needs the tensorboard package: "
                          "pip install 'vit-mqa[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLogger:
    """Scalars of one run. ``first_step``: on resume, the step training continues from;
    events an interrupted attempt wrote past it are dropped, so replayed steps are not
    shown twice."""

    def __init__(self, run_dir: str | Path, first_step: int | None = None) -> None:
        writer_class = _summary_writer_class()
        purge = None if first_step is None else first_step + 1
        self.writer = writer_class(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def log_epoch(self, record: dict[str, Any], step_losses: list[torch.Tensor]) -> None:
        """One epoch's metrics line; ``step_losses`` are its steps' losses, still on the
        device: they are copied in one transfer here, not one per step."""
        step = int(record["step"])
        if step_losses:
            values = torch.stack([x.float() for x in step_losses]).cpu().tolist()
            first = step - len(values) + 1
            for i, value in enumerate(values):
                self.writer.add_scalar(STEP_LOSS_TAG, value, first + i)
        for tag, key in EPOCH_TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, float(record[key]), step)
        self.writer.flush()  # a crashed run keeps its finished epochs

    def close(self) -> None:
        self.writer.close()
