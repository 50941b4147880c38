"""Product consistency: is the product the same in the result as in the input photo?

Before compositing (``raw``), inside the product region (mask >= 128):

- ``psnr``: ``10 log10(255^2 / MSE)``, MSE over all channels and pixels of the region (8-bit
  values); identical regions score :data:`PSNR_CAP` dB instead of infinity.
- ``ssim``: the SSIM map of Wang et al. (Gaussian window sigma 1.5, K1 0.01, K2 0.03, data range
  255, per channel, then averaged over channels) averaged over the region. The map is computed
  between the photo and the raw result *with its pixels outside the region replaced by the
  photo's*, so that windows on the product edge see only product changes, not the new background.
  Equal to scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, full=True)`` map averaged over the region.
- ``lpips`` (separate metric, needs trunk weights): the spatial LPIPS map over the product's
  bounding box (same outside-region replacement), averaged over the region.

After compositing: ``composite_change_mean`` / ``composite_change_max``, the mean and max
absolute change (0-255) of the solid product pixels (mask == 255); both must be 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from dreampainter.evaluation.base import Metric, Row
from dreampainter.evaluation.batch import EvalBatch, EvalSample

PSNR_CAP = 100.0
DATA_RANGE = 255.0
SSIM_RADIUS = int(3.5 * 1.5 + 0.5)  # scipy's Gaussian window radius for sigma 1.5, truncate 3.5


def psnr_in_region(image: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """PSNR (dB) of ``image`` vs ``target`` over the pixels of boolean ``region``, capped at :data:`PSNR_CAP`."""
    if not region.any():
        return math.nan
    diff = image[region].astype(np.float64) - target[region].astype(np.float64)
    mse = float(np.mean(diff**2))
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(DATA_RANGE**2 / mse))


def ssim_map(image: np.ndarray, target: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM (``HxW``, averaged over channels) of two 8-bit ``HxWxC`` images."""
    c1 = (0.01 * DATA_RANGE) ** 2
    c2 = (0.03 * DATA_RANGE) ** 2
    maps = []
    for channel in range(image.shape[-1]):
        x = image[..., channel].astype(np.float64)
        y = target[..., channel].astype(np.float64)

        def blur(a):
            return gaussian_filter(a, sigma=sigma, truncate=3.5, mode="reflect")

        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return np.mean(maps, axis=0)


def keep_region(image: np.ndarray, outside_from: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``image`` inside ``region``, ``outside_from`` elsewhere."""
    return np.where(region[..., None], image, outside_from)


def ssim_in_region(image: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
    """SSIM map of ``target`` vs (``image`` inside the region, ``target`` outside), averaged over the region.

    Computed on the region's bounding box plus the window radius: the map values at region
    pixels are the same as on the whole image, at a fraction of the cost for small products.
    """
    if not region.any():
        return math.nan
    rows, cols = product_box(region, min_size=0, margin=SSIM_RADIUS + 1)
    image, target, region = image[rows, cols], target[rows, cols], region[rows, cols]
    return float(ssim_map(target, keep_region(image, target, region))[region].mean())


def composite_change(sample: EvalSample) -> tuple[float, float]:
    """Mean and max absolute change of the solid product pixels after compositing."""
    solid = sample.product_mask == 255
    if not solid.any():
        return math.nan, math.nan
    change = np.abs(sample.composited[solid].astype(np.int16) - sample.photo[solid].astype(np.int16))
    return float(change.mean()), float(change.max())


class ProductMetric(Metric):
    """PSNR and SSIM of the product before compositing, and the product's change after compositing."""

    name = "product"
    columns = ("psnr", "ssim", "composite_change_mean", "composite_change_max")
    higher_is_better = {
        "psnr": True,
        "ssim": True,
        "composite_change_mean": False,
        "composite_change_max": False,
    }

    def score(self, batch: EvalBatch) -> list[Row]:
        rows = []
        for sample in batch:
            change_mean, change_max = composite_change(sample)
            rows.append(
                {
                    "psnr": psnr_in_region(sample.raw, sample.photo, sample.product),
                    "ssim": ssim_in_region(sample.raw, sample.photo, sample.product),
                    "composite_change_mean": change_mean,
                    "composite_change_max": change_max,
                }
            )
        return rows

    def compute(self) -> dict[str, float]:
        values = super().compute()
        maxima = self._column("composite_change_max")
        maxima = maxima[~np.isnan(maxima)]
        values["composite_change_max"] = float(maxima.max()) if maxima.size else math.nan
        return values


def _grown(low: int, high: int, length: int, min_size: int) -> slice:
    size = min(max(high - low, min_size), length)
    start = min(max(0, (low + high) // 2 - size // 2), length - size)
    return slice(start, start + size)


def product_box(region: np.ndarray, min_size: int = 64, margin: int = 0) -> tuple[slice, slice]:
    """The region's bounding box plus ``margin``, grown around its centre to at least ``min_size``
    (both within the image)."""
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    h, w = region.shape
    return (
        _grown(max(0, int(rows[0]) - margin), min(h, int(rows[-1]) + 1 + margin), h, min_size),
        _grown(max(0, int(cols[0]) - margin), min(w, int(cols[-1]) + 1 + margin), w, min_size),
    )


class LpipsMetric(Metric):
    """LPIPS of the product before compositing (spatial map over the product, see module doc)."""

    name = "lpips"
    requires = ("lpips",)
    columns = ("lpips",)
    higher_is_better = {"lpips": False}

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        super().__init__()

    @torch.no_grad()
    def lpips_in_region(self, image: np.ndarray, target: np.ndarray, region: np.ndarray) -> float:
        if not region.any():
            return math.nan
        rows, cols = product_box(region)
        crop = region[rows, cols]
        image = keep_region(image, target, region)[rows, cols]
        target = target[rows, cols]
        device = next(self.model.parameters()).device

        def to_tensor(a):
            return (
                torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float().to(device) / 127.5
                - 1.0
            )

        distance = self.model(to_tensor(image), to_tensor(target))[0, 0].cpu().numpy()
        return float(distance[crop].mean())

    def score(self, batch: EvalBatch) -> list[Row]:
        return [{"lpips": self.lpips_in_region(s.raw, s.photo, s.product)} for s in batch]
