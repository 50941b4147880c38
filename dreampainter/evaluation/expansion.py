"""Object expansion (Eshratifar et al., "Salient Object-Aware Background Generation using
Text-Guided Diffusion Models", CVPRW 2024): how much product the model painted outside the product.

With ``m_i`` the input product mask and ``m_o`` the product found in the result by a segmenter,
``E = (area(m_o | m_i) - area(m_i)) / area(image)``, i.e. the fraction of the image that is
product in the result but lies outside the input mask (pixels with any product coverage in the
input mask, value > 0, count as inside). Reported: the mean of ``E`` and the fraction of samples
with ``E`` above 1% of the image.

The segmenter is pluggable: any callable ``(image, sample) -> bool HxW`` (wrap an image-only
model, e.g. SAM prompted inside the product or a salient-object detector, with :func:`image_only`).
:class:`KnownSceneSegmenter` serves the toy data, whose reference is the scene without the product.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from dreampainter.evaluation.base import Metric, Row
from dreampainter.evaluation.batch import EvalBatch, EvalSample

Segmenter = Callable[[np.ndarray, EvalSample], np.ndarray]


def image_only(segment: Callable[[np.ndarray], np.ndarray]) -> Segmenter:
    """Adapt an ``image -> mask`` callable to the segmenter signature."""

    def segmenter(image: np.ndarray, sample: EvalSample) -> np.ndarray:
        return segment(image)

    return segmenter


def product_palette(photo: np.ndarray, mask: np.ndarray, colours: int = 8) -> np.ndarray:
    """Up to ``colours`` dominant product colours (means of the most frequent 16-level RGB bins)."""
    pixels = photo[mask].reshape(-1, 3).astype(np.int64)
    if pixels.size == 0:
        return np.zeros((0, 3))
    bins = (pixels[:, 0] >> 4) * 256 + (pixels[:, 1] >> 4) * 16 + (pixels[:, 2] >> 4)
    counts = np.bincount(bins, minlength=4096)
    top = np.argsort(counts)[::-1][:colours]
    top = top[counts[top] > 0]
    return np.stack([pixels[bins == b].mean(axis=0) for b in top])


class KnownSceneSegmenter:
    """Product pixels in a result of the toy data, whose reference is the scene without the product.

    A pixel is product when its colour is within ``tolerance`` (RGB Euclidean, 0-255) of one of
    the product's dominant colours in the input photo **and** farther than ``tolerance`` from the
    reference at the same place (so a wall that happens to share the product's colour is not
    counted). The reference is resized to the result when its size differs.
    """

    def __init__(self, tolerance: float = 40.0) -> None:
        self.tolerance = tolerance

    def __call__(self, image: np.ndarray, sample: EvalSample) -> np.ndarray:
        palette = product_palette(sample.photo, sample.product_mask == 255)
        if palette.size == 0:
            return np.zeros(image.shape[:2], dtype=bool)
        reference = sample.reference
        if reference.shape[:2] != image.shape[:2]:
            size = (image.shape[1], image.shape[0])
            reference = np.asarray(Image.fromarray(reference).resize(size, Image.BILINEAR))
        pixels = image.astype(np.float64)
        to_palette = np.full(image.shape[:2], np.inf)
        for colour in palette:  # a loop keeps memory at one HxW map per colour
            np.minimum(to_palette, np.linalg.norm(pixels - colour, axis=-1), out=to_palette)
        to_reference = np.linalg.norm(pixels - reference.astype(np.float64), axis=-1)
        return (to_palette < self.tolerance) & (to_reference > self.tolerance)


def expansion_fraction(found: np.ndarray, product_mask: np.ndarray) -> float:
    """Fraction of the image that is ``found`` product outside the input mask (mask value 0)."""
    if found.shape != product_mask.shape:
        raise ValueError(f"segmenter returned a {found.shape} mask for a {product_mask.shape} image")
    return float(np.count_nonzero(found.astype(bool) & (product_mask == 0)) / found.size)


class ExpansionMetric(Metric):
    """Object expansion of the composited result (or of the raw result, ``image="raw"``)."""

    name = "expansion"
    columns = ("expansion",)
    higher_is_better = {"expansion": False, "expansion_over_threshold": False}

    def __init__(self, segmenter: Segmenter, threshold: float = 0.01, image: str = "composited") -> None:
        if image not in ("composited", "raw"):
            raise ValueError(f"image must be 'composited' or 'raw', got {image!r}")
        self.segmenter = segmenter
        self.threshold = threshold
        self.image = image
        super().__init__()

    def score(self, batch: EvalBatch) -> list[Row]:
        rows = []
        for sample in batch:
            image = getattr(sample, self.image)
            found = np.asarray(self.segmenter(image, sample))
            rows.append({"expansion": expansion_fraction(found, sample.product_mask)})
        return rows

    def compute(self) -> dict[str, float]:
        values = self._column("expansion")
        values = values[~np.isnan(values)]
        if not values.size:
            return {"expansion_mean": math.nan, "expansion_over_threshold": math.nan}
        return {
            "expansion_mean": float(values.mean()),
            "expansion_over_threshold": float(np.mean(values > self.threshold)),
            "expansion_threshold": self.threshold,
        }
