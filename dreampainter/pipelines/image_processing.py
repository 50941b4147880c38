"""Pipeline inputs and outputs in pixel space: decoding, masks, sizes, compositing, cut-out placement.

Mask conventions (diffusers'): the *product mask* is 255 where the product is; the *inpainting mask*
is its complement, 255 where the model repaints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from dreampainter.data.decode import DEFAULT_MAX_PIXELS, load_image, load_mask
from dreampainter.errors import InvalidInputError

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes

# A pixel belongs to the product when its mask value is at least this (diffusers binarizes at 0.5).
PRODUCT_THRESHOLD = 128


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    """HxW, HxWx1/3/4 arrays: uint8 as is, uint16 scaled, floats taken to be in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InvalidInputError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidInputError(f"{name}: the image array contains NaN or infinite values")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InvalidInputError(f"{name}: unsupported array dtype {array.dtype} (use uint8, uint16 or float)")
    return Image.fromarray(np.ascontiguousarray(array))


def _tensor_to_array(tensor: torch.Tensor, name: str) -> np.ndarray:
    """(C, H, W) or (1, C, H, W) tensors (floats in [0, 1] or uint8) to an HxWxC array."""
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        tensor = tensor.permute(1, 2, 0)
    elif tensor.ndim != 2:
        raise InvalidInputError(f"{name}: expected a (C, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = tensor.detach().cpu()
    return array.float().numpy() if array.is_floating_point() else array.numpy()


def to_pil_image(
    source: ImageInput, name: str = "image", *, keep_alpha: bool = False, max_pixels: int | None = None
) -> Image.Image:
    """Any supported image input (PIL, path, bytes, array, tensor) to an upright 8-bit RGB(A) PIL image."""
    if isinstance(source, torch.Tensor):
        source = _tensor_to_array(source, name)
    if isinstance(source, np.ndarray):
        source = _array_to_pil(source, name)
    if not isinstance(source, (Image.Image, str, os.PathLike, bytes)):
        raise InvalidInputError(
            f"{name}: expected a PIL image, a path, an array or a tensor, got {type(source)}"
        )
    if isinstance(source, Image.Image):
        _check_pixels(source, name, max_pixels)
    return load_image(source, name, keep_alpha=keep_alpha, max_pixels=max_pixels)


def _check_pixels(image: Image.Image, name: str, max_pixels: int | None) -> None:
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    width, height = image.size
    if width * height > limit:
        raise InvalidInputError(
            f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of {limit}"
        )


def to_mask_array(source, name: str = "product_mask", *, max_pixels: int | None = None) -> np.ndarray:
    """A product mask (PIL, path, bytes, array, tensor; 0/1, 0/255 or soft) as uint8 HxW, 255 = product."""
    if isinstance(source, torch.Tensor):
        source = _tensor_to_array(source, name)
        if source.ndim == 3:
            source = source[..., 0] if source.shape[-1] == 1 else source
    if isinstance(source, np.ndarray):
        if np.issubdtype(source.dtype, np.floating) and not np.isfinite(source).all():
            raise InvalidInputError(f"{name}: the mask array contains NaN or infinite values")
        if source.dtype == np.uint16:
            source = source.astype(np.float64) / 65535.0
    elif isinstance(source, Image.Image):
        _check_pixels(source, name, max_pixels)
    elif not isinstance(source, (str, os.PathLike, bytes)):
        raise InvalidInputError(
            f"{name}: expected a PIL image, a path, an array or a tensor, got {type(source)}"
        )
    return load_mask(source, name, max_pixels=max_pixels)


@dataclass
class ProductInput:
    """One validated product photo: the RGB photo and its product mask (uint8, 255 = product), same size."""

    image: Image.Image
    product_mask: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def prepare_product_input(
    image: ImageInput,
    product_mask=None,
    *,
    name: str = "image",
    mask_name: str = "product_mask",
    max_pixels: int | None = None,
) -> ProductInput:
    """Decode and check a product photo: RGB + ``product_mask``, or RGBA whose alpha is the product mask.

    Raises :class:`InvalidInputError` for a missing or fully opaque alpha without a mask, a mask of
    another size, an empty product mask, or a mask that covers the whole image.
    """
    picture = to_pil_image(image, name, keep_alpha=True, max_pixels=max_pixels)
    if product_mask is None:
        if picture.mode != "RGBA":
            raise InvalidInputError(
                f"{mask_name}: required for the RGB {name} (or pass an RGBA cut-out whose alpha marks the product)"
            )
        mask = np.asarray(picture)[..., 3].copy()
        if mask.min() == 255:
            raise InvalidInputError(
                f"{name}: RGBA image with a fully opaque alpha and no {mask_name}; the alpha cannot mark the product"
            )
    else:
        mask = to_mask_array(product_mask, mask_name, max_pixels=max_pixels)
        if mask.shape != (picture.height, picture.width):
            raise InvalidInputError(
                f"{mask_name}: mask is {mask.shape[1]}x{mask.shape[0]} but {name} is {picture.width}x{picture.height}"
            )
    product = mask >= PRODUCT_THRESHOLD
    if not product.any():
        raise InvalidInputError(f"{mask_name}: the product mask is empty (255 must mark the product)")
    if product.all():
        raise InvalidInputError(
            f"{mask_name}: the product mask covers the whole image; nothing is left to repaint"
        )
    return ProductInput(image=picture.convert("RGB"), product_mask=mask)


def inpainting_mask(product_mask: np.ndarray, product_dilation: int = 0) -> Image.Image:
    """The inpainting mask (``L``, 255 = repaint) = NOT product, after growing the product by ``product_dilation`` px."""
    mask = Image.fromarray(product_mask)
    if product_dilation > 0:
        mask = mask.filter(ImageFilter.MaxFilter(2 * product_dilation + 1))
    return Image.fromarray(255 - np.asarray(mask))


def processing_size(width: int, height: int, multiple: int, resolution: int | None = None) -> tuple[int, int]:
    """The (width, height) to run the model at: a multiple of ``multiple`` keeping the aspect ratio.

    ``resolution=None`` keeps the input's scale; an integer rescales to about ``resolution**2`` pixels.
    """
    scale = 1.0 if resolution is None else resolution / math.sqrt(width * height)
    return (
        max(multiple, int(round(width * scale / multiple)) * multiple),
        max(multiple, int(round(height * scale / multiple)) * multiple),
    )


# How far (px) the pasted-back product is feathered outward by default (pipeline, evaluation, demo).
DEFAULT_FEATHER_RADIUS = 2.0


def feathered_alpha(product_mask: np.ndarray, feather_radius: float) -> np.ndarray:
    """Float (H, W) in [0, 1]: 1 on the product, fading to 0 over ``feather_radius`` px outside it.

    Pixels whose mask is 255 get exactly 1, so product pixels are copied unchanged.
    """
    alpha = product_mask.astype(np.float32) / 255.0
    if feather_radius > 0:
        blurred = Image.fromarray(product_mask).filter(ImageFilter.GaussianBlur(feather_radius))
        alpha = np.maximum(alpha, np.asarray(blurred, dtype=np.float32) / 255.0)
    return alpha


def composite(generated: np.ndarray, original: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``original * alpha + generated * (1 - alpha)`` on float (H, W, 3) images, exact where alpha is 0 or 1."""
    alpha = alpha[..., None]
    return np.where(
        alpha >= 1.0, original, np.where(alpha <= 0.0, generated, original * alpha + generated * (1 - alpha))
    )


def place_cutout(
    cutout: ImageInput,
    canvas_size: tuple[int, int],
    *,
    scale: float = 0.6,
    position: tuple[float, float] = (0.5, 0.5),
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """Place a transparent-background product on a canvas; returns (RGB photo, product mask uint8).

    The product (cropped to its alpha's bounding box) is resized to fit ``scale`` x the canvas in
    both directions, keeping its aspect ratio, and centred at ``position`` (fractions of the
    canvas width and height). Parts falling outside the canvas are clipped.
    """
    width, height = canvas_size
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"canvas_size: must be positive, got {width}x{height}")
    if not (math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale: must be a positive number, got {scale}")
    if not all(math.isfinite(p) for p in position):
        raise InvalidInputError(f"position: must be finite, got {position}")
    picture = to_pil_image(cutout, "cutout", keep_alpha=True, max_pixels=max_pixels)
    if picture.mode != "RGBA":
        raise InvalidInputError(
            "cutout: needs an alpha channel (a transparent-background PNG) to mark the product"
        )
    bbox = picture.getchannel("A").getbbox()
    if bbox is None:
        raise InvalidInputError("cutout: the alpha channel is fully transparent; there is no product")
    product = picture.crop(bbox)
    factor = scale * min(width / product.width, height / product.height)
    size = (max(1, round(product.width * factor)), max(1, round(product.height * factor)))
    product = product.resize(size, Image.Resampling.LANCZOS)
    left = round(position[0] * width - size[0] / 2)
    top = round(position[1] * height - size[1] / 2)
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    layer.paste(product, (left, top))
    mask = np.asarray(layer.getchannel("A")).copy()
    if mask.max() < PRODUCT_THRESHOLD:
        raise InvalidInputError(
            f"position: the product placed at {position} falls outside the {width}x{height} canvas"
        )
    photo = Image.new("RGB", (width, height), background)
    photo.paste(layer.convert("RGB"), (0, 0), layer.getchannel("A"))
    return photo, mask


