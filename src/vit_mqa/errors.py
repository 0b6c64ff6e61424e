"""The one exception type that user-facing code raises for bad input, the checks
shared by every config, and reading a JSON file with a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The largest image side any config or image may ask for: a run directory or an image is
# something people download, and must not make the loader allocate without limit.
MAX_IMAGE_SIDE = 4096


class VitMqaError(ValueError):
    """Bad input from the user: a config, a file, a path, an option.

    The CLI prints its message as a single line and exits non-zero; library users
    can catch it as a ``ValueError``. Settings and parameters are named in backticks
    (`val_size`): the command line shows them as its flags (--val-size).
    """


def check_field_types(config: object, section: str) -> None:
    """Every field of a config dataclass holds a value of its declared type, and every
    number is finite: NaN passes every ``<`` / ``>`` range check, so it is refused here.

    Ints are accepted for float fields; bools are never numbers. ``section`` names the
    config in the message (e.g. "model").
    """
    import dataclasses
    import math

    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        declared = str(f.type)
        if value is None and "None" in declared:
            continue
        kinds = [part.strip() for part in declared.split("|") if part.strip() != "None"]
        base = kinds[0] if len(kinds) == 1 else declared
        if base == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and not math.isfinite(value):
                raise VitMqaError(f"{section}.{f.name} must be a finite number, got {value}")
        elif base == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base == "bool":
            ok = isinstance(value, bool)
        elif base == "str":
            ok = isinstance(value, str)
        else:  # e.g. image_size: int or (h, w), checked by the config itself
            continue
        if not ok:
            raise VitMqaError(f"{section}.{f.name} must be {declared}, got {value!r}")


def dataclass_from_dict(cls: type, d: object, what: str) -> Any:
    """``cls(**d)`` for a config section read from JSON, with one clear error when ``d`` is
    not an object or names a setting ``cls`` does not have."""
    import dataclasses

    if not isinstance(d, dict):
        raise VitMqaError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(d) - known))
    if unknown:
        raise VitMqaError(f"unknown {what} setting(s): {', '.join(unknown)}")
    return cls(**d)


def read_json(path: Path, failure: str) -> Any:
    """The JSON value in the file ``path``; a file that cannot be read, decoded or parsed
    is a VitMqaError "``failure``: the reason" (the reason's first line)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitMqaError(f"{failure}: {str(e).splitlines()[0]}") from None
