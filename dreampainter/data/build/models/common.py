"""Helpers shared by the model-backed build components: devices, input checks, masks, batching."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreampainter.errors import InvalidInputError, MissingFileError

MASK_THRESHOLD = 127  # mask pixels above this are product


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU; anything else as torch reads it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidInputError(f"device: not a torch device: {device!r}") from error


def require_path(path: str | os.PathLike, what: str, hint: str, folder: bool = False) -> Path:
    """The path as a :class:`Path`; :class:`MissingFileError` naming it and ``hint`` when absent."""
    if path is None or str(path) == "":
        raise MissingFileError(f"{what} not set ({hint})")
    path = Path(os.path.expanduser(str(path)))
    if not path.exists() or (folder and not path.is_dir()):
        raise MissingFileError(f"{what} not found: {path} ({hint})")
    return path


def require_hf_folder(path: str | os.PathLike, what: str, hint: str, model_types: Sequence[str]) -> Path:
    """A local transformers model folder whose ``config.json`` has one of ``model_types``."""
    folder = require_path(path, what, hint, folder=True)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{what} not found: {config_file} ({hint})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{config_file}: not a JSON model config ({error})") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in model_types:
        raise InvalidInputError(
            f"{folder}: model_type is {model_type!r}, expected {' or '.join(map(repr, model_types))} ({hint})"
        )
    return folder


def one_line(error: BaseException) -> str:
    """An exception's message on one line, shortened."""
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def check_photos(photos: Sequence[Any], what: str = "photos") -> list[np.ndarray]:
    """Each photo must be an HxWx3 uint8 array; returns them as a list."""
    if isinstance(photos, np.ndarray):
        raise InvalidInputError(f"{what}: expected a list of HxWx3 uint8 arrays, got one array")
    checked = []
    for index, photo in enumerate(photos):
        if (
            not isinstance(photo, np.ndarray)
            or photo.dtype != np.uint8
            or photo.ndim != 3
            or photo.shape[2] != 3
        ):
            described = (
                f"{photo.dtype} array of shape {photo.shape}"
                if isinstance(photo, np.ndarray)
                else type(photo).__name__
            )
            raise InvalidInputError(f"{what}[{index}]: expected an HxWx3 uint8 array, got {described}")
        if photo.shape[0] == 0 or photo.shape[1] == 0:
            raise InvalidInputError(f"{what}[{index}]: empty image of shape {photo.shape}")
        checked.append(photo)
    return checked


def check_masks(photos: Sequence[np.ndarray], masks: Sequence[Any]) -> list[np.ndarray]:
    """One HxW uint8 mask per photo, of the photo's size; returns them as a list."""
    if isinstance(masks, np.ndarray):
        raise InvalidInputError("masks: expected a list of HxW uint8 arrays, got one array")
    masks = list(masks)
    if len(masks) != len(photos):
        raise InvalidInputError(f"masks: {len(masks)} masks for {len(photos)} photos")
    for index, (photo, mask) in enumerate(zip(photos, masks)):
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
            described = (
                f"{mask.dtype} array of shape {mask.shape}"
                if isinstance(mask, np.ndarray)
                else type(mask).__name__
            )
            raise InvalidInputError(f"masks[{index}]: expected an HxW uint8 array, got {described}")
        if mask.shape != photo.shape[:2]:
            raise InvalidInputError(
                f"masks[{index}]: size {mask.shape} differs from its photo's {photo.shape[:2]}"
            )
    return masks


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (x1, y1 exclusive) around the mask's product pixels, ``None`` when it has none."""
    rows = np.flatnonzero((mask > MASK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((mask > MASK_THRESHOLD).any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Boolean product region grown by a disc of ``pixels`` radius (Euclidean)."""
    region = mask > MASK_THRESHOLD
    if pixels <= 0 or not region.any():
        return region
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~region) <= pixels


def check_dilation(dilation: Any) -> int:
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 0:
        raise InvalidInputError(f"dilation: expected a whole number of pixels >= 0, got {dilation!r}")
    return dilation


def check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name}: expected a whole number >= 1, got {value!r}")
    return value


def chunks(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive slices of ``indices`` of at most ``size`` items."""
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


def batches_by_key(keys: Sequence[Any], size: int) -> Iterator[list[int]]:
    """Indices grouped by equal key (e.g. image size, for stacking), in chunks of at most ``size``."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    for indices in groups.values():
        yield from chunks(indices, size)
