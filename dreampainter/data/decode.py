"""Image decoding shared by the shard writer, validator, loader and pipeline.

Everything that turns user bytes into pixels goes through here so that odd inputs (EXIF rotation,
CMYK, grayscale, palette, 16-bit, RGBA) behave the same everywhere.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreampainter.errors import InvalidInputError, MissingFileError

# Refuse images above this many pixels unless the caller raises the limit (decompression bombs).
DEFAULT_MAX_PIXELS = 64_000_000


def _open(source: bytes | str | os.PathLike, name: str, max_pixels: int | None) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise MissingFileError(f"{name}: file not found: {source}")
        fp = open(source, "rb")  # noqa: SIM115 - PIL reads lazily; closed below after load()
    else:
        fp = io.BytesIO(source)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = limit
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            width, height = image.size
            if width * height > limit:
                raise InvalidInputError(
                    f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of {limit}"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidInputError(f"{name}: image is over the pixel limit of {limit} ({error})") from None
    except UnidentifiedImageError:
        raise InvalidInputError(f"{name}: not a decodable image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidInputError(f"{name}: cannot decode image ({error})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
        fp.close()
    return image


def _exif_transposed(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not make a good image unreadable
        return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images (``I;16``, ``I``, ``F``) scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image


def load_image(
    source: bytes | str | os.PathLike | Image.Image,
    name: str = "image",
    *,
    keep_alpha: bool = False,
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode ``source`` to an upright 8-bit ``RGB`` (or ``RGBA`` with ``keep_alpha``) PIL image.

    Handles EXIF orientation, CMYK, grayscale, palette (with transparency) and 16-bit images.
    ``name`` is used in error messages (pass the file name or the argument name).
    """
    image = source if isinstance(source, Image.Image) else _open(source, name, max_pixels)
    image = _to_8bit(_exif_transposed(image))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if keep_alpha and has_alpha:
        return image.convert("RGBA")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def load_mask(
    source: bytes | str | os.PathLike | Image.Image | np.ndarray,
    name: str = "mask",
    *,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode a product mask to a ``uint8`` HxW array with 255 = product.

    Accepts 0/1, 0/255 and anti-aliased masks, single-channel or RGB(A) (the alpha channel of an RGBA
    mask is used when its colour channels are uniform, else luminance), 16-bit and palette images.
    """
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 3:
            array = array[..., -1] if array.shape[-1] in (2, 4) else array.mean(axis=-1)
        if array.ndim != 2:
            raise InvalidInputError(f"{name}: expected an HxW mask array, got shape {source.shape}")
        if array.dtype == bool or (array.size and float(np.nanmax(array)) <= 1.0):
            array = array.astype(np.float64) * 255.0
        return np.clip(np.asarray(array, dtype=np.float64) + 0.5, 0, 255).astype(np.uint8)
    image = source if isinstance(source, Image.Image) else _open(source, name, max_pixels)
    image = _to_8bit(_exif_transposed(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        array = np.asarray(rgba)
        colour = array[..., :3]
        alpha = array[..., 3]
        uniform_colour = bool((colour == colour.reshape(-1, 3)[0]).all())
        mask = alpha if uniform_colour or alpha.min() < 255 else np.asarray(rgba.convert("L"))
    else:
        mask = np.asarray(image.convert("L"))
    if mask.size and mask.max() == 1:  # a 0/1 mask
        mask = mask * np.uint8(255)
    return np.ascontiguousarray(mask, dtype=np.uint8)
