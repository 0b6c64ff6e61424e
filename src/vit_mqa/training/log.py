"""Epoch lines and notices of a run, printed between progress bars."""

from __future__ import annotations

import sys

from tqdm import tqdm


def log(message: str) -> None:
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()  # epoch lines appear at once in logs, not at exit
