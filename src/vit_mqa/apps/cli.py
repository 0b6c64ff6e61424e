"""The ``vit-mqa`` command: train, eval, predict, presets.

Its arguments are in :mod:`vit_mqa.apps.cli_parser` (every setting of every config section is
also a flag, generated from the config dataclasses so that flags, JSON config files and
presets can never drift apart), what each subcommand does in :mod:`vit_mqa.apps.cli_commands`.
User errors print one line and exit non-zero.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from ..errors import VitMqaError
from .cli_commands import COMMANDS
from .cli_parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `vit-mqa`: say what it can do
        parser.print_help()
        return 0
    # SIGTERM (kill, a job scheduler, a container stop) ends a run as Ctrl-C does: temporary
    # files are removed, the last finished epoch stays resumable, and the exit is one line.
    # Pillow warns on stderr about a damaged file that it then refuses (or reads anyway);
    # the refusal is the one line such a file gets, and a warning would be a second.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return COMMANDS[args.command](args)
    except Terminated:
        print("vit-mqa: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except VitMqaError as e:
        print(f"vit-mqa: error: {as_flags(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:  # unwritable run directory, full disk, ...: the OS says it best
        print(f"vit-mqa: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vit-mqa: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def as_flags(message: str) -> str:
    """A library message with its `setting` names as this command's flags (--setting)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + m.group(1).replace("_", "-"),
                  message)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
