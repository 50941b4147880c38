"""User-facing errors: each carries one line that names the file or argument and what is wrong.

The CLI prints these as ``error: <message>`` and exits with status 2, never with a traceback.
"""

from __future__ import annotations


class DreamPainterError(Exception):
    """Base class of every error that is the user's to fix (bad input, missing weights, bad config)."""


class InvalidInputError(DreamPainterError, ValueError):
    """An argument, file or sample is malformed."""


class MissingFileError(DreamPainterError, FileNotFoundError):
    """A file the user must provide is not there (weights, data, configs)."""


class CheckpointMismatchError(DreamPainterError, ValueError):
    """A checkpoint does not fit the model it is being loaded into."""


def require_file(path, what: str, hint: str = "") -> None:
    """Raise :class:`MissingFileError` naming ``path`` and ``what`` it should hold when it is absent."""
    import os

    if not os.path.exists(path):
        message = f"{what} not found: {path}"
        if hint:
            message += f" ({hint})"
        raise MissingFileError(message)
