"""The one exception type that user-facing code raises for bad input."""

from __future__ import annotations


class VitMqaError(ValueError):
    """Bad input from the user: a config, a file, a path, an option.

    The CLI prints its message as a single line and exits non-zero; library users
    can catch it as a ``ValueError``.
    """
