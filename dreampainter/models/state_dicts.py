"""Strict state-dict checks whose errors name the offending keys and shapes."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dreampainter.errors import CheckpointMismatchError


def _preview(keys: list[str], limit: int = 4) -> str:
    return f"{keys[:limit]}{'...' if len(keys) > limit else ''}"


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: str, what: str = "the model"
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``found`` has exactly ``expected``'s keys and shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not match {what}: missing {_preview(missing)}, unexpected {_preview(unexpected)}"
        )
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointMismatchError(
                f"{source}: '{key}' has shape {tuple(value.shape)} in the checkpoint, {what} expects "
                f"{tuple(expected[key].shape)}"
            )
