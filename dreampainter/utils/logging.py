"""Quiet runs: drop library messages that tell a DreamPainter user nothing; every other warning stays."""

from __future__ import annotations

import logging
import re

# diffusers warns on every ``model.to(dtype)`` even when the list of modules to keep in float32 is empty.
_EMPTY_FP32_LIST = re.compile(r"^There are modules in \w+ that should be kept in float32: \[\]")
# DeepSpeed says this when it is imported (accelerate imports it whenever it is installed) on a machine
# without an accelerator, also in runs that never use DeepSpeed.
_DEEPSPEED_CPU = re.compile(r"^Setting accelerator to CPU")

_FILTERS = {
    "diffusers.models.modeling_utils": _EMPTY_FP32_LIST,
    "DeepSpeed": _DEEPSPEED_CPU,
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_known_noise() -> None:
    """Install the filters (idempotent). Entry points (the CLI, ``scripts/*.py``) call this at start."""
    for name, pattern in _FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
