"""Hot-loop decoding for the loader: header probes, truncation checks and reduce-on-decode.

Same semantics as :mod:`dreampainter.data.decode` (upright, 8-bit RGB; masks 255 = product), but
JPEGs are decoded by torchvision's libjpeg-turbo binding, or by PIL's draft mode at 1/2, 1/4 or 1/8
scale when the image is at least twice as large as needed.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from dreampainter.data.decode import load_image, load_mask
from dreampainter.errors import InvalidInputError

_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: upright size ``(w, h)``, PIL format and EXIF orientation."""

    size: tuple[int, int]
    format: str
    orientation: int = 1


def _complete(data: bytes, fmt: str) -> bool:
    """Cheap end-of-stream checks that catch truncated files without decoding them."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in data[-64:]
    if fmt == "WEBP":
        return len(data) >= 8 + int.from_bytes(data[4:8], "little")
    return True


def probe(data: bytes, name: str, max_pixels: int | None = None) -> ImageHeader:
    """Read an image's header (no pixel decoding); raise :class:`InvalidInputError` if it is broken or truncated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            orientation = 1
            # PNG's getexif() decodes the whole image to look for a trailing eXIf chunk: only read
            # EXIF that the header already carries (decode_rgb checks the decoded shape agrees).
            if image.format in ("JPEG", "WEBP", "TIFF") or "exif" in image.info:
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception as error:  # PIL raises many types for garbage headers
        raise InvalidInputError(f"{name}: not a decodable image ({type(error).__name__})") from None
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidInputError(f"{name}: {width}x{height} is over the pixel limit of {max_pixels}")
    if not _complete(data, image.format or ""):
        raise InvalidInputError(f"{name}: truncated {image.format} file")
    if orientation in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return ImageHeader((width, height), image.format or "", orientation)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Share a (read-only) PIL-backed array with torch without a copy; the loader never writes into it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _pil_to_chw(image: Image.Image) -> torch.Tensor:
    return _as_tensor(np.asarray(image)).permute(2, 0, 1)


def decode_rgb(
    data: bytes, name: str, header: ImageHeader, min_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Decode to an upright ``uint8`` (3, H, W) tensor, possibly reduced (on decode) towards ``min_size`` (w, h).

    The result is never smaller than ``min_size`` on either axis (unless the image itself is).
    Raises :class:`InvalidInputError` when the decoded orientation disagrees with ``header``.
    """
    pixels = _decode_rgb(data, name, header, min_size)
    width, height = header.size
    decoded_w, decoded_h = pixels.shape[2], pixels.shape[1]
    if (decoded_w - decoded_h) * (width - height) < 0:  # landscape <-> portrait: a rotation we missed
        raise InvalidInputError(
            f"{name}: EXIF orientation not visible in the header ({width}x{height} expected)"
        )
    return pixels


def _decode_rgb(
    data: bytes, name: str, header: ImageHeader, min_size: tuple[int, int] | None
) -> torch.Tensor:
    if header.format == "JPEG":
        width, height = header.size
        if min_size is not None and 2 * min_size[0] <= width and 2 * min_size[1] <= height:
            request = min_size if header.orientation not in _SWAPPED_ORIENTATIONS else min_size[::-1]
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", request)
            return _pil_to_chw(load_image(image, name))
        try:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(buffer, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            pass  # unusual JPEG flavours: let PIL try
    return _pil_to_chw(load_image(data, name))


def decode_mask(data: bytes, name: str) -> torch.Tensor:
    """Decode a product mask to an upright ``uint8`` (1, H, W) tensor, 255 = product.

    Plain 8-bit grayscale masks without EXIF rotation take a direct path; everything else (RGBA,
    palette, 16-bit, rotated) goes through :func:`dreampainter.data.decode.load_mask`.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.mode == "L" and "exif" not in image.info and not image.getexif().get(_EXIF_ORIENTATION):
            image.load()
            mask = _as_tensor(np.asarray(image))
            if int(mask.max()) == 1:  # a 0/1 mask
                mask = mask * 255
            return mask.unsqueeze(0)
    except Exception:
        pass  # load_mask reports the problem with a proper message
    return _as_tensor(load_mask(data, name)).unsqueeze(0)
