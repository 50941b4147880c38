"""Background references without weights: classical inpainting of the dilated product region.

``FillReference`` removes the product (its mask dilated by ``dilate`` of the shorter side) with
OpenCV's Telea or Navier-Stokes inpainting, at a working size of at most ``work_side`` pixels (the
fill is smooth anyway), and keeps the original pixels outside the dilated region.
"""

from __future__ import annotations

import cv2
import numpy as np

from dreampainter.errors import InvalidInputError

METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


def dilated(mask: np.ndarray, share: float) -> np.ndarray:
    """Boolean product region grown by ``share`` of the shorter side (at least one pixel)."""
    radius = max(1, round(share * min(mask.shape[:2])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate((mask >= 128).astype(np.uint8), kernel) > 0


class FillReference:
    """Reference = the photo with the dilated product region inpainted (Telea / Navier-Stokes)."""

    def __init__(
        self, method: str = "telea", dilate: float = 0.02, radius: int = 5, work_side: int = 512, device: str = "cpu"
    ) -> None:
        if method not in METHODS:
            raise InvalidInputError(f"reference.method: must be one of {', '.join(METHODS)}, got {method!r}")
        self.flag, self.dilate, self.radius, self.work_side = METHODS[method], dilate, radius, work_side

    def fill(self, photo: np.ndarray, mask: np.ndarray) -> np.ndarray:
        region = dilated(mask, self.dilate)
        height, width = region.shape
        scale = min(1.0, self.work_side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(photo, size, interpolation=cv2.INTER_AREA) if scale < 1 else photo
        small_region = cv2.resize(region.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if scale < 1:  # grow by a pixel so that downscaling never uncovers the product's edge
            small_region = cv2.dilate(small_region, np.ones((3, 3), np.uint8))
        filled = cv2.inpaint(np.ascontiguousarray(small), small_region * 255, self.radius, self.flag)
        if scale < 1:
            filled = cv2.resize(filled, (width, height), interpolation=cv2.INTER_CUBIC)
        return np.where(region[..., None], filled, photo).astype(np.uint8)

    def __call__(self, photos: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
        return [self.fill(photo, mask) for photo, mask in zip(photos, masks)]
