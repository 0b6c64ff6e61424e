"""The one exception type that user-facing code raises for bad input, the checks
shared by every config, and reading a JSON file with a one-line error."""

from __future__ import annotations

# The largest image side any config or image may ask for: a run directory or an image is
# something people download, and must not make the loader allocate without limit.
MAX_IMAGE_SIDE = 4096


class VitMqaError(ValueError):
    """Bad input from the user: a config, a file, a path, an option.

    The CLI prints its message as a single line and exits non-zero; library users
    can catch it as a ``ValueError``. Settings and parameters are named in backticks
    (`val_size`): the command line shows them as its flags (--val-size).
    """


