"""The toy world's ``data build`` components: mask, reference and prompt of a toy photo whose scene is known.

A toy photo's key names its scene (``toy<seed>_<split>_<index>``, as ``write_toy_dataset`` writes
them), so the scene is rendered again at the photo's size and its own mask, empty scene and record are
returned. A photo that does not match its re-rendered scene (not a toy photo, or edited) gets an empty
mask with confidence 0, which the build drops as ``mask_low_confidence``. Loaded by dotted path from
``dreampainter.data.build.components``; production code never imports it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import numpy as np

from dreampainter.toy.data import ToySample, make_toy_sample, sample_seed

KEY_PATTERN = re.compile(r"^toy(\d+)_([A-Za-z0-9]+)_(\d+)$")
MAX_MEAN_ERROR = 4.0  # mean absolute difference (0..255) a JPEG-encoded toy photo may have


@lru_cache(maxsize=256)
def known_scene(key: str, resolution: int) -> ToySample | None:
    """The toy sample a key names, rendered at ``resolution``; None for keys of no toy scene."""
    match = KEY_PATTERN.match(key)
    if match is None:
        return None
    seed, split, index = int(match[1]), match[2], int(match[3])
    return make_toy_sample(sample_seed(seed, split, index), resolution)


def _scene_of(photo: np.ndarray, key: str) -> ToySample | None:
    height, width = photo.shape[:2]
    sample = known_scene(key, width) if height == width else None
    if sample is None or np.abs(sample.photo.astype(np.int16) - photo).mean() > MAX_MEAN_ERROR:
        return None
    return sample


class ToySceneMasks:
    """Mask maker: the known scene's product mask (confidence 1), or confidence 0 when unknown."""

    wants_keys = True

    def __init__(self, device: str = "cpu") -> None:
        pass

    def __call__(self, photos: list[np.ndarray], keys: list[str]) -> list[tuple[np.ndarray, float]]:
        results = []
        for photo, key in zip(photos, keys):
            sample = _scene_of(photo, key)
            results.append((sample.mask, 1.0) if sample else (np.zeros(photo.shape[:2], np.uint8), 0.0))
        return results


class ToySceneReferences:
    """Reference maker: the known scene rendered without its product."""

    wants_keys = True

    def __init__(self, device: str = "cpu") -> None:
        pass

    def __call__(self, photos: list[np.ndarray], masks: list[np.ndarray], keys: list[str]) -> list[np.ndarray]:
        references = []
        for photo, key in zip(photos, keys):
            sample = _scene_of(photo, key)
            if sample is None:
                raise ValueError(f"toy reference: {key} is not a known toy scene")
            references.append(sample.reference)
        return references


class ToyScenePrompts:
    """Prompt maker: the known scene's whole record (prompts in English and Chinese, scene fields)."""

    wants_keys = True

    def __init__(self, device: str = "cpu") -> None:
        pass

    def __call__(self, images: list[np.ndarray], keys: list[str]) -> list[dict[str, Any]]:
        records = []
        for image, key in zip(images, keys):
            height, width = image.shape[:2]
            sample = known_scene(key, width) if height == width else None
            if sample is None:
                raise ValueError(f"toy prompt: {key} is not a known toy scene")
            records.append(dict(sample.meta))
        return records
