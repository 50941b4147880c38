"""Sample checks shared by the shard writer (bad rows) and the validator (bad samples).

The writer refuses exactly what the validator would reject, so a freshly written shard set validates.

Mask thresholds: a product mask is *near-binary* when at least ``MIN_BINARY_FRACTION`` (95%) of its
pixels are within ``0..MASK_LOW`` (0..10) or ``MASK_HIGH..255`` (245..255), which leaves room for
anti-aliased edges. Product pixels are those >= 128; a mask is *empty* when under
``MIN_PRODUCT_FRACTION`` (0.1%) of the pixels are product and *full* when over
``MAX_PRODUCT_FRACTION`` (99.9%) are (then nothing is left to repaint).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

MASK_LOW = 10
MASK_HIGH = 245
MIN_BINARY_FRACTION = 0.95
MIN_PRODUCT_FRACTION = 0.001
MAX_PRODUCT_FRACTION = 0.999
# PIL modes a stored ``mask.png`` may have: 8-bit grey, or 1-bit.
MASK_MODES = ("L", "1")


def mask_problems(mask: np.ndarray) -> list[str]:
    """Problems of a decoded ``uint8`` HxW product mask (255 = product); empty when it is usable."""
    if mask.size == 0:
        return ["mask has no pixels"]
    binary = np.count_nonzero((mask <= MASK_LOW) | (mask >= MASK_HIGH)) / mask.size
    product = np.count_nonzero(mask >= 128) / mask.size
    problems = []
    if binary < MIN_BINARY_FRACTION:
        problems.append(
            f"mask is not near-binary: {binary:.1%} of pixels within 0..{MASK_LOW} or {MASK_HIGH}..255 "
            f"(need {MIN_BINARY_FRACTION:.0%})"
        )
    if product < MIN_PRODUCT_FRACTION:
        problems.append(f"mask is empty: {product:.2%} product pixels")
    elif product > MAX_PRODUCT_FRACTION:
        problems.append(f"mask is full: {product:.2%} product pixels, nothing to repaint")
    return problems


def mask_size_problem(mask: np.ndarray, photo: Image.Image) -> str | None:
    """A message when the mask's size differs from the (upright) photo's, else None."""
    height, width = mask.shape[:2]
    if (width, height) != photo.size:
        return f"mask is {width}x{height} but the photo is {photo.size[0]}x{photo.size[1]}"
    return None


def meta_problems(meta: dict[str, Any]) -> list[str]:
    """Problems of a sample's JSON record: ``prompt`` must be a non-empty string."""
    problems = []
    prompt = meta.get("prompt")
    if prompt is None:
        problems.append("prompt missing")
    elif not isinstance(prompt, str):
        problems.append(f"prompt is a {type(prompt).__name__}, expected a string")
    elif not prompt.strip():
        problems.append("empty prompt")
    prompt_zh = meta.get("prompt_zh")
    if prompt_zh is not None and not isinstance(prompt_zh, str):
        problems.append(f"prompt_zh is a {type(prompt_zh).__name__}, expected a string")
    return problems
