"""Background colour distance to the reference (weight-free; most telling on toy runs).

The result's background (composited result outside the product, mask < 128) is compared with
all pixels of the reference, as distributions (the reference need not be aligned):

- ``bg_delta_e``: CIE76 ΔE between the mean CIELAB colours (sRGB, D65) of the two pixel sets;
- ``bg_hist_chi2``: chi-square distance ``0.5 * sum((p - q)^2 / (p + q))`` of normalised 3-D RGB
  histograms with 8 bins per channel, in [0, 1];
- ``bg_emd``: 1-D Wasserstein (earth mover's) distance of the pixel values, per RGB channel in
  0-255 units, averaged over channels.
"""

from __future__ import annotations

import math

import numpy as np

from dreampainter.evaluation.base import Metric, Row
from dreampainter.evaluation.batch import EvalBatch

_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_LEVELS = np.arange(256) / 255.0
_SRGB_TO_LINEAR = np.where(_LEVELS > 0.04045, ((_LEVELS + 0.055) / 1.055) ** 2.4, _LEVELS / 12.92)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """8-bit sRGB ``(..., 3)`` to CIELAB (D65, 2° observer), as scikit-image's ``rgb2lab``."""
    linear = _SRGB_TO_LINEAR[np.asarray(rgb, dtype=np.uint8)]  # a 256-entry table: 8-bit input
    r, g, b = linear[..., 0], linear[..., 1], linear[..., 2]
    # Written out rather than `linear @ M.T`: a BLAS call on an (N, 3) matrix is slower here.
    xyz = np.stack([(m[0] * r + m[1] * g + m[2] * b) / w for m, w in zip(_RGB_TO_XYZ, _WHITE_D65)], axis=-1)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lightness = 116.0 * f[..., 1] - 16.0
    return np.stack([lightness, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def rgb_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """Normalised 3-D RGB histogram of ``(N, 3)`` uint8 pixels, flattened to ``bins**3``."""
    q = pixels.astype(np.int64) * bins // 256
    counts = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3).astype(np.float64)
    return counts / counts.sum()


def chi_square_distance(p: np.ndarray, q: np.ndarray) -> float:
    total = p + q
    used = total > 0
    return float(0.5 * np.sum((p[used] - q[used]) ** 2 / total[used]))


def channel_wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over channels of the 1-D Wasserstein-1 distance between uint8 pixel values ``(N, 3)``, ``(M, 3)``."""
    distances = []
    for channel in range(3):
        cdf_a = np.cumsum(np.bincount(a[:, channel], minlength=256)) / len(a)
        cdf_b = np.cumsum(np.bincount(b[:, channel], minlength=256)) / len(b)
        distances.append(np.abs(cdf_a - cdf_b)[:-1].sum())
    return float(np.mean(distances))


def background_distances(background: np.ndarray, reference: np.ndarray) -> Row:
    """The three distances between ``(N, 3)`` background pixels and ``(M, 3)`` reference pixels."""
    if len(background) == 0:
        return {"bg_delta_e": math.nan, "bg_hist_chi2": math.nan, "bg_emd": math.nan}
    delta = rgb_to_lab(background).mean(axis=0) - rgb_to_lab(reference).mean(axis=0)
    return {
        "bg_delta_e": float(np.linalg.norm(delta)),
        "bg_hist_chi2": chi_square_distance(rgb_histogram(background), rgb_histogram(reference)),
        "bg_emd": channel_wasserstein(background, reference),
    }


class BackgroundColourMetric(Metric):
    """Colour and histogram distances of the result's background to the reference."""

    name = "colour"
    columns = ("bg_delta_e", "bg_hist_chi2", "bg_emd")
    higher_is_better = {"bg_delta_e": False, "bg_hist_chi2": False, "bg_emd": False}

    def score(self, batch: EvalBatch) -> list[Row]:
        return [background_distances(s.composited[s.background], s.reference.reshape(-1, 3)) for s in batch]
