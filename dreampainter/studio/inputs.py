"""The studio's product input: uploads (size and pixel limits), masks (given, alpha, automatic, edited),
and placement on a canvas (aspect presets or a custom size; scale, position and margin via ``place_cutout``).

Everything here works on bytes, PIL images and arrays; nothing needs a browser or a model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dreampainter.data.decode import DEFAULT_MAX_PIXELS
from dreampainter.errors import InvalidInputError
from dreampainter.pipelines.image_processing import (
    ProductInput,
    place_cutout,
    prepare_product_input,
    to_pil_image,
)
from dreampainter.utils.config import Choice

# Uploads over this many bytes are refused (before decoding; decoding has its pixel limit).
DEFAULT_MAX_UPLOAD_BYTES = 50 * 1024 * 1024


class ProductKind(Choice):
    """How the product comes in."""

    cutout = "cutout"  # an RGBA cut-out: its alpha is the product
    photo_mask = "photo_mask"  # an RGB photo and a mask file (white = product)
    photo_auto = "photo_auto"  # a photo on a plain background: the data builder's studio segmenter masks it


# Canvas aspect presets (width : height); AS_UPLOADED keeps the input's own size and framing.
CANVAS_PRESETS = {"1:1": (1, 1), "4:5": (4, 5), "3:4": (3, 4), "16:9": (16, 9)}
AS_UPLOADED = "as uploaded"
CUSTOM = "custom"
CANVAS_CHOICES = (AS_UPLOADED, *CANVAS_PRESETS, CUSTOM)
# Canvas sides are rounded to this multiple (the VAE factor of every UNet family we load).
CANVAS_MULTIPLE = 8


@dataclass
class Limits:
    """Upload limits: bytes per file and pixels per image (the project's decode limit by default)."""

    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def read_upload(path: str | os.PathLike, name: str, limits: Limits) -> bytes:
    """The bytes of an uploaded file, refused when over ``limits.max_bytes`` (one-line error naming ``name``)."""
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise InvalidInputError(
            f"{name}: the file is {size / 2**20:.1f} MB, over the upload limit of {limits.max_bytes / 2**20:.1f} MB"
        )
    with open(path, "rb") as file:
        return file.read()


def auto_mask(photo: Image.Image, min_confidence: float | None = None) -> np.ndarray:
    """A product mask for a photo on a plain background (the data builder's ``studio`` segmenter + cleanup).

    Refused (one line, saying what to do instead) when OpenCV is missing or the segmenter's confidence is
    under ``min_confidence`` (default: the data builder's ``filters.min_mask_confidence``).
    """
    try:
        from dreampainter.data.build.config import CleanupConfig, FilterConfig
        from dreampainter.data.build.masks import StudioSegmenter, clean_mask
    except ModuleNotFoundError as error:
        raise InvalidInputError(
            f"automatic mask: needs OpenCV ({error.name} is missing): pip install 'dreampainter[build]', "
            "or upload a mask or a cut-out"
        ) from None
    if min_confidence is None:
        min_confidence = FilterConfig().min_mask_confidence
    array = np.asarray(photo.convert("RGB"))
    mask, confidence = StudioSegmenter().segment(array)
    if confidence < min_confidence or not mask.any():
        raise InvalidInputError(
            f"automatic mask: the background is not plain enough (confidence {confidence:.2f} < {min_confidence}); "
            "upload a mask or a cut-out, or paint the mask"
        )
    return clean_mask(array, mask, CleanupConfig())


def load_product(
    kind: ProductKind | str,
    image: str | os.PathLike | None,
    mask: str | os.PathLike | None,
    limits: Limits,
) -> ProductInput:
    """Decode and check an uploaded product: a cut-out, a photo + mask, or a photo masked automatically."""
    kind = ProductKind(kind)
    if image is None:
        raise InvalidInputError("product: upload an image first")
    data = read_upload(image, "product", limits)
    if kind == ProductKind.cutout:
        picture = to_pil_image(data, "product", keep_alpha=True, max_pixels=limits.max_pixels)
        if picture.mode != "RGBA":
            raise InvalidInputError(
                "product: a cut-out needs an alpha channel (a transparent-background PNG); "
                "for a photo choose 'photo + mask' or 'photo, automatic mask'"
            )
        return prepare_product_input(
            picture, name="product", mask_name="cut-out alpha", max_pixels=limits.max_pixels
        )
    if kind == ProductKind.photo_mask:
        if mask is None:
            raise InvalidInputError("mask: upload the product mask (white = product)")
        mask_data = read_upload(mask, "mask", limits)
        photo = to_pil_image(data, "product", max_pixels=limits.max_pixels)
        return prepare_product_input(
            photo, mask_data, name="product", mask_name="mask", max_pixels=limits.max_pixels
        )
    photo = to_pil_image(data, "product", max_pixels=limits.max_pixels)
    return prepare_product_input(photo, auto_mask(photo), name="product", mask_name="automatic mask")


@dataclass
class Placement:
    """Where the product goes: the canvas (``canvas``: a preset, ``as uploaded`` or ``custom``) and, on a
    new canvas, the product's scale (of the canvas, both ways), centre position and margin (fractions)."""

    canvas: str = AS_UPLOADED
    long_side: int = 512  # presets: the canvas's longer side in pixels
    width: int = 512  # custom
    height: int = 512  # custom
    scale: float = 0.6
    position: tuple[float, float] = (0.5, 0.5)
    margin: float = 0.05  # the product keeps this share of the shorter canvas side from every edge
    background: tuple[int, int, int] = (255, 255, 255)

    def canvas_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The canvas (width, height) in pixels for an input of ``input_size``."""
        if self.canvas == AS_UPLOADED:
            return input_size
        if self.canvas == CUSTOM:
            width, height = int(self.width), int(self.height)
        elif self.canvas in CANVAS_PRESETS:
            aspect_w, aspect_h = CANVAS_PRESETS[self.canvas]
            side = int(self.long_side)
            width, height = (
                (side, side * aspect_h / aspect_w)
                if aspect_w >= aspect_h
                else (side * aspect_w / aspect_h, side)
            )
        else:
            raise InvalidInputError(
                f"canvas: unknown choice {self.canvas!r} (choose from {', '.join(CANVAS_CHOICES)})"
            )
        width = max(CANVAS_MULTIPLE, round(width / CANVAS_MULTIPLE) * CANVAS_MULTIPLE)
        height = max(CANVAS_MULTIPLE, round(height / CANVAS_MULTIPLE) * CANVAS_MULTIPLE)
        return width, height


def check_canvas(size: tuple[int, int], limits: Limits) -> None:
    """Refuse a canvas over the pixel limit (the same limit as uploads)."""
    width, height = size
    if width * height > limits.max_pixels:
        raise InvalidInputError(
            f"canvas: {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}"
        )


def fit_in_margin(
    product_size: tuple[int, int],
    canvas_size: tuple[int, int],
    scale: float,
    position: tuple[float, float],
    margin: float,
) -> tuple[float, tuple[float, float]]:
    """``place_cutout``'s (scale, position) adjusted so a product of ``product_size`` keeps ``margin`` (a share
    of the shorter canvas side) from every edge: the scale shrinks to fit, the centre moves inside."""
    if not (math.isfinite(margin) and 0 <= margin < 0.5):
        raise InvalidInputError(f"margin: must be in [0, 0.5), got {margin}")
    width, height = canvas_size
    gap = margin * min(width, height)
    inner_w, inner_h = width - 2 * gap, height - 2 * gap
    fit = min(width / product_size[0], height / product_size[1])  # place_cutout's size for scale 1
    scale = min(scale, inner_w / (fit * product_size[0]), inner_h / (fit * product_size[1]))
    box_w, box_h = product_size[0] * fit * scale, product_size[1] * fit * scale
    x = min(max(position[0] * width, gap + box_w / 2), width - gap - box_w / 2) / width
    y = min(max(position[1] * height, gap + box_h / 2), height - gap - box_h / 2) / height
    return scale, (x, y)


def place_product(product: ProductInput, placement: Placement, limits: Limits) -> ProductInput:
    """The product on its canvas: as uploaded, or cut out by its mask and placed by ``place_cutout``."""
    size = placement.canvas_size(product.size)
    check_canvas(size, limits)
    if placement.canvas == AS_UPLOADED:
        return product
    cutout = Image.fromarray(np.dstack([np.asarray(product.image), product.product_mask]), "RGBA")
    bbox = cutout.getchannel("A").getbbox()
    scale, position = fit_in_margin(
        (bbox[2] - bbox[0], bbox[3] - bbox[1]), size, placement.scale, placement.position, placement.margin
    )
    photo, mask = place_cutout(
        cutout,
        size,
        scale=scale,
        position=position,
        background=placement.background,
        max_pixels=limits.max_pixels,
    )
    return prepare_product_input(
        photo, mask, name="placed product", mask_name="placed mask", max_pixels=limits.max_pixels
    )


# The editor shows the photo with the product tinted in PRODUCT_COLOUR (at MASK_ALPHA); its brush paints
# PRODUCT_COLOUR to add to the product and BACKGROUND_COLOUR to take away from it.
PRODUCT_COLOUR = (255, 64, 160)
BACKGROUND_COLOUR = (40, 120, 255)
MASK_ALPHA = 140


def hex_colour(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def mask_overlay(product: ProductInput) -> Image.Image:
    """The photo with the product mask shown over it (tinted in ``PRODUCT_COLOUR``), RGB."""
    layer = np.zeros((*product.product_mask.shape, 4), np.uint8)
    layer[..., :3] = PRODUCT_COLOUR
    layer[..., 3] = (product.product_mask.astype(np.uint16) * MASK_ALPHA // 255).astype(np.uint8)
    return Image.alpha_composite(product.image.convert("RGBA"), Image.fromarray(layer, "RGBA")).convert("RGB")


def apply_mask_edits(product_mask: np.ndarray, strokes: np.ndarray | None) -> np.ndarray:
    """The mask after the user's brush strokes (an HxWx4 layer, any size; ``None``: no edits).

    Pixels painted (alpha >= 128) nearer ``PRODUCT_COLOUR`` become product (255), nearer
    ``BACKGROUND_COLOUR`` background (0); unpainted pixels keep their exact (possibly soft) value.
    """
    if strokes is None or strokes.ndim != 3 or strokes.shape[-1] != 4 or not strokes[..., 3].any():
        return product_mask
    if strokes.shape[:2] != product_mask.shape:
        resized = Image.fromarray(strokes, "RGBA").resize(product_mask.shape[::-1], Image.Resampling.NEAREST)
        strokes = np.asarray(resized)
    painted = strokes[..., 3] >= 128
    rgb = strokes[..., :3].astype(np.int32)
    to_product = ((rgb - PRODUCT_COLOUR) ** 2).sum(-1)
    to_background = ((rgb - BACKGROUND_COLOUR) ** 2).sum(-1)
    edited = product_mask.copy()
    edited[painted & (to_product <= to_background)] = 255
    edited[painted & (to_background < to_product)] = 0
    return edited
