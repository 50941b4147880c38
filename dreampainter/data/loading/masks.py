"""Mask derivation: product mask -> inpainting mask, plus the imperfect-mask augmentations.

Conventions (diffusers'): the stored **product mask** is white (255 / 1) on the product; the
**inpainting mask** is white where the model repaints, i.e. the background: ``mask = 1 - product``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# A resized anti-aliased mask is binarised with ``value > MASK_THRESHOLD`` (255 = product).
MASK_THRESHOLD = 127


def binarize(mask: torch.Tensor | np.ndarray, threshold: int = MASK_THRESHOLD) -> torch.Tensor:
    """``uint8`` mask (..., H, W) with 255 = product -> float {0, 1} tensor, 1 = product."""
    tensor = torch.as_tensor(mask)
    return (tensor > threshold).to(torch.float32)


def grow(product: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (``pixels > 0``) or erode (``pixels < 0``) a {0, 1} product mask (1, H, W) by a square of radius ``pixels``."""
    if pixels == 0:
        return product
    radius = abs(pixels)
    kernel = 2 * radius + 1
    source = product if pixels > 0 else 1.0 - product
    grown = F.max_pool2d(source.unsqueeze(0), kernel, stride=1, padding=radius).squeeze(0)
    return grown if pixels > 0 else 1.0 - grown


def bounding_box(mask: torch.Tensor | np.ndarray, threshold: float = 0) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (exclusive ends) of the pixels ``> threshold`` of an (H, W) or (1, H, W) mask.

    None when there are none. Works on ``uint8`` masks directly (threshold 127) or on {0, 1} masks.
    """
    tensor = torch.as_tensor(mask)
    if tensor.ndim == 3:
        tensor = tensor[0]
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    rows = torch.nonzero(tensor.amax(dim=1) > threshold)
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(tensor.amax(dim=0) > threshold)
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_mask(product: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """The product's bounding box (grown by ``pad`` px, clipped) as a {0, 1} mask of the same shape."""
    box = bounding_box(product)
    out = torch.zeros_like(product)
    if box is None:
        return out
    height, width = product.shape[-2:]
    x0, y0, x1, y1 = box
    out[..., max(0, y0 - pad) : min(height, y1 + pad), max(0, x0 - pad) : min(width, x1 + pad)] = 1.0
    return out


def inpainting_mask(product: torch.Tensor) -> torch.Tensor:
    """Inpainting mask (1 = repaint = background) from a {0, 1} product mask."""
    return 1.0 - product


def masked_image(pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``pixels * (1 - mask)``: the repaint region zeroed (diffusers' masked image for SD inpainting)."""
    return pixel_values * (1.0 - mask)
