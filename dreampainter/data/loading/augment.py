"""Joint geometric augmentation of photo + product mask, and reference-image preparation.

The crop is planned once per sample (:func:`plan_crop`) from the image size and the product's
bounding box, then applied with :func:`apply_crop` to the photo and to the mask, so the two stay
pixel-aligned whatever resolution each was decoded at. Images are ``uint8`` tensors ``(C, H, W)``;
resizing uses torchvision's uint8 kernels (antialiased), which are several times faster than PIL's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dreampainter.data.decode import load_image
from dreampainter.errors import InvalidInputError

# OpenAI CLIP's normalisation, used by open_clip and transformers' CLIPImageProcessor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_MODES = ("pad", "crop")


@dataclass(frozen=True)
class CropPlan:
    """Resize the source to ``scaled_size`` (w, h), then cut the ``out_size`` (w, h) window at ``offset``.

    ``offset`` is the window's top-left corner in the resized image; it is negative (and the window is
    padded) when the resized image is smaller than the window on that axis. ``flip`` mirrors the
    output horizontally.
    """

    scaled_size: tuple[int, int]
    offset: tuple[int, int]
    out_size: tuple[int, int]
    flip: bool = False


def _window_range(size: int, out: int, lo_edge: float, hi_edge: float) -> tuple[int, int]:
    """Allowed window offsets on one axis: covering the image (or containing it) and the product span."""
    cover_lo, cover_hi = min(0, size - out), max(0, size - out)
    lo = max(cover_lo, math.ceil(hi_edge) - out)
    hi = min(cover_hi, math.floor(lo_edge))
    if lo > hi:  # only reachable through float rounding; centre on the product instead
        centre = round((lo_edge + hi_edge - out) / 2)
        return centre, centre
    return lo, hi


def plan_crop(
    image_size: tuple[int, int],
    out_size: tuple[int, int],
    product_box: tuple[int, int, int, int] | None,
    rng: random.Random,
    *,
    max_zoom: float = 1.0,
    flip_prob: float = 0.5,
    margin: int = 1,
) -> CropPlan:
    """Plan a resize + random crop of an image of ``image_size`` (w, h) to ``out_size`` (w, h).

    The image is scaled to cover the output (times a random zoom in ``[1, max_zoom]``), but never so
    much that the product box ``(x0, y0, x1, y1)`` no longer fits with ``margin`` px to spare; if the
    product cannot fit even at the covering scale, the image is scaled down further and padded.
    The window is then placed uniformly at random among the positions that keep the whole product in.
    """
    width, height = image_size
    out_w, out_h = out_size
    scale = max(out_w / width, out_h / height) * rng.uniform(1.0, max(1.0, max_zoom))
    if product_box is not None:
        box_w = max(1, product_box[2] - product_box[0])
        box_h = max(1, product_box[3] - product_box[1])
        scale = min(scale, (out_w - 2 * margin) / box_w, (out_h - 2 * margin) / box_h)
    scaled_w, scaled_h = max(1, round(width * scale)), max(1, round(height * scale))
    if product_box is None:
        product_box = (width, height, 0, 0)  # an empty span: any covering offset is allowed
    sx, sy = scaled_w / width, scaled_h / height
    x_lo, x_hi = _window_range(scaled_w, out_w, product_box[0] * sx, product_box[2] * sx)
    y_lo, y_hi = _window_range(scaled_h, out_h, product_box[1] * sy, product_box[3] * sy)
    offset = (rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi))
    return CropPlan((scaled_w, scaled_h), offset, (out_w, out_h), rng.random() < flip_prob)


def apply_crop(image: torch.Tensor, plan: CropPlan, fill: int = 0) -> torch.Tensor:
    """Apply ``plan`` to a ``uint8`` image ``(C, H, W)`` of any resolution (it is resized to ``plan.scaled_size``)."""
    scaled_w, scaled_h = plan.scaled_size
    if tuple(image.shape[-2:]) != (scaled_h, scaled_w):
        image = TF.resize(image, [scaled_h, scaled_w], antialias=True)
    out_w, out_h = plan.out_size
    x, y = plan.offset
    if x >= 0 and y >= 0 and x + out_w <= scaled_w and y + out_h <= scaled_h:
        out = image[:, y : y + out_h, x : x + out_w]
    else:
        out = torch.full((image.shape[0], out_h, out_w), fill, dtype=image.dtype)
        src_x0, src_y0 = max(0, x), max(0, y)
        src_x1, src_y1 = min(scaled_w, x + out_w), min(scaled_h, y + out_h)
        if src_x1 > src_x0 and src_y1 > src_y0:
            out[:, src_y0 - y : src_y1 - y, src_x0 - x : src_x1 - x] = image[:, src_y0:src_y1, src_x0:src_x1]
    return out.flip(-1) if plan.flip else out


def to_uint8_chw(image: Image.Image | np.ndarray | torch.Tensor, name: str = "image") -> torch.Tensor:
    """A PIL image, an HxWx3 ``uint8`` array or a (3, H, W) ``uint8`` tensor as a (3, H, W) ``uint8`` tensor."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise InvalidInputError(
                f"{name}: expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}"
            )
        return image
    if isinstance(image, Image.Image):
        image = np.asarray(load_image(image, name))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(
            f"{name}: expected an RGB image (PIL, HxWx3 uint8 array or 3xHxW uint8 tensor)"
        )
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def reference_decode_size(image_size: tuple[int, int], size: int, mode: str) -> tuple[int, int]:
    """The smallest (w, h) a reference of ``image_size`` must be decoded at for :func:`prepare_reference`."""
    width, height = image_size
    scale = size / (max(width, height) if mode == "pad" else min(width, height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def prepare_reference(
    image: Image.Image | np.ndarray | torch.Tensor,
    size: int = 224,
    mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """A reference image as a normalised float ``(3, size, size)`` tensor for a CLIP vision encoder.

    ``mode="pad"`` pads the short side symmetrically with the mean colour (~0 after normalisation) and
    scales the square to ``size``, so nothing is cut or distorted; ``mode="crop"`` scales the shorter
    side to ``size`` and centre-crops (CLIPImageProcessor's behaviour). Resizing is bicubic and
    antialiased, on ``uint8`` pixels. Same geometry as
    :func:`dreampainter.models.reference_encoder.prepare_reference` (used at inference), so training
    and inference see the same reference preprocessing.
    """
    if mode not in REFERENCE_MODES:
        raise InvalidInputError(f"reference_mode must be one of {REFERENCE_MODES}, got {mode!r}")
    pixels = to_uint8_chw(image, "reference")
    height, width = pixels.shape[-2:]
    if mode == "pad":
        side = max(height, width)
        if height != width:
            fill = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8).view(3, 1, 1)
            canvas = fill.expand(3, side, side).clone()
            top, left = (side - height) // 2, (side - width) // 2
            canvas[:, top : top + height, left : left + width] = pixels
            pixels = canvas
        new_h = new_w = size
    else:
        scale = size / min(width, height)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if tuple(pixels.shape[-2:]) != (new_h, new_w):
        pixels = TF.resize(pixels, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if mode == "crop":
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pixels = pixels[:, top : top + size, left : left + size]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels.float().div_(255.0) - mean_t).div_(std_t)


def to_signed_unit(image: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``uint8`` pixels -> float in [-1, 1] (0 -> -1, 255 -> 1), written into ``out`` when given."""
    out = torch.empty(image.shape) if out is None else out
    return out.copy_(image).mul_(2.0 / 255.0).sub_(1.0)
