"""Product masks: the weight-free ``studio`` segmenter and the cleanup every mask goes through.

**Studio segmenter** (photos on plain or studio backgrounds): a smooth background model (a quadratic
surface per Lab channel, fitted to a frame along the image border) predicts every pixel's background
colour; pixels further than a threshold (``k`` robust standard deviations of the border's residuals,
at least ``min_threshold`` in Lab units) from it are product. Its confidence is low when the border is
not explained by the model (a busy scene, a product cut by the frame) or when the product barely
stands out, or when the border's residuals are noisier than ``max_border_noise`` Lab units (a
textured backdrop, not a plain one); the pipeline drops masks under ``filters.min_mask_confidence``.

**Cleanup** (:func:`clean_mask`, every mask kind): binarise at 128; keep the largest component and every
component over ``keep_components_above`` of its area; fill holes (background regions not connected to
the border) when they are smaller than ``small_hole_share`` of the product area, or when their mean
colour is further than ``hole_background_distance`` (Lab) from the background's median colour. Larger
holes whose colour matches the background stay open: they show background through the product (a
ring, a mug's handle). Finally the edge is softened by a Gaussian of ``soft_edge`` pixels, unless
that leaves under 97% of the pixels near-binary (then the edge stays hard).
"""

from __future__ import annotations

import cv2
import numpy as np

from dreampainter.data.build.config import CleanupConfig
from dreampainter.data.shards.checks import MASK_HIGH, MASK_LOW

# A softened mask is kept only while this share of its pixels stays near-binary (the shard format
# needs 95%); otherwise (small images, long outlines) the hard mask is stored.
SOFT_EDGE_MIN_BINARY = 0.97


def to_lab(photo: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> float32 CIE Lab (L in 0..100)."""
    return cv2.cvtColor(photo.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _design(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(x), x, y, x * y, x * x, y * y], axis=-1)


class StudioSegmenter:
    """Product masks for photos on plain or studio backgrounds, without weights."""

    def __init__(
        self,
        border: float = 0.03,
        k: float = 4.0,
        min_threshold: float = 10.0,
        min_border_fit: float = 0.85,
        max_border_noise: float = 4.0,
        device: str = "cpu",
    ) -> None:
        self.border, self.k, self.min_threshold, self.min_border_fit = border, k, min_threshold, min_border_fit
        self.max_border_noise = max_border_noise
        self.noise = 0.0

    def distance(self, photo: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(per-pixel Lab distance from the background model, border frame as bool, threshold)."""
        height, width = photo.shape[:2]
        lab = to_lab(photo)
        frame = max(2, round(self.border * min(height, width)))
        border = np.zeros((height, width), bool)
        border[:frame], border[-frame:], border[:, :frame], border[:, -frame:] = True, True, True, True
        xs = (np.arange(width, dtype=np.float32) / max(width - 1, 1) - 0.5)[None, :]
        ys = (np.arange(height, dtype=np.float32) / max(height - 1, 1) - 0.5)[:, None]
        index = np.flatnonzero(border.ravel())
        if index.size > 20000:
            index = index[:: index.size // 20000]
        rows = _design(xs.ravel()[index % width], ys.ravel()[index // width])
        coef, *_ = np.linalg.lstsq(rows, lab.reshape(-1, 3)[index], rcond=None)
        coef = coef.astype(np.float32)  # model = c0 + c1 x + c2 y + c3 xy + c4 x^2 + c5 y^2, per channel
        model = (
            coef[0]
            + xs[..., None] * coef[1]
            + ys[..., None] * coef[2]
            + (xs * ys)[..., None] * coef[3]
            + (xs * xs)[..., None] * coef[4]
            + (ys * ys)[..., None] * coef[5]
        )
        distance = np.linalg.norm(lab - model, axis=-1)
        residual = distance[border]
        sigma = 1.4826 * float(np.median(residual)) + 1e-6
        self.noise = sigma
        return distance, border, max(self.min_threshold, self.k * sigma)

    def segment(self, photo: np.ndarray) -> tuple[np.ndarray, float]:
        distance, border, threshold = self.distance(photo)
        product = distance > threshold
        # Anti-aliased edge pixels: product only when nearer the product's colour than the background's.
        edge = product & ~cv2.erode(product.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        local = cv2.dilate(np.where(product, distance, 0).astype(np.float32), np.ones((5, 5), np.uint8))
        product &= ~(edge & (distance < 0.5 * local))
        border_fit = float(np.mean(~product[border]))
        if not product.any():
            return np.zeros(product.shape, np.uint8), 0.0
        separation = float(np.median(distance[product])) / threshold
        fit_score = np.clip((border_fit - self.min_border_fit) / (1.0 - self.min_border_fit), 0.0, 1.0)
        plain = np.clip((self.max_border_noise - self.noise) / (0.5 * self.max_border_noise), 0.0, 1.0)
        confidence = float(fit_score * plain * np.clip(separation - 1.0, 0.0, 1.0))
        return np.where(product, 255, 0).astype(np.uint8), confidence

    def __call__(self, photos: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        return [self.segment(photo) for photo in photos]


def _background_colour(lab: np.ndarray, background: np.ndarray) -> np.ndarray:
    return np.median(lab[background], axis=0) if background.any() else np.median(lab.reshape(-1, 3), axis=0)


def clean_mask(photo: np.ndarray, mask: np.ndarray, config: CleanupConfig) -> np.ndarray:
    """Binarise, keep the main components, fill product holes, soften the edge (see the module doc)."""
    binary = (mask >= 128).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return np.zeros(mask.shape, np.uint8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= max(1, config.keep_components_above * areas.max())) + 1
    product = np.isin(labels, keep)
    # Background regions: those touching the border are background, the others are holes.
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~product).astype(np.uint8), connectivity=4)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    holes = [label for label in range(1, count) if label not in set(edge_labels.tolist())]
    if holes:
        lab = to_lab(photo)
        background = np.isin(labels, edge_labels[edge_labels > 0])
        reference = _background_colour(lab, background)
        sums = np.stack([np.bincount(labels.ravel(), lab[..., c].ravel(), count) for c in range(3)], -1)
        area = float(product.sum())
        fill = []
        for label in holes:
            size = stats[label, cv2.CC_STAT_AREA]
            colour = sums[label] / size
            if size < config.small_hole_share * area or np.linalg.norm(colour - reference) > config.hole_background_distance:
                fill.append(label)
        product |= np.isin(labels, fill)
    result = np.where(product, 255, 0).astype(np.uint8)
    if config.soft_edge > 0:
        soft = cv2.GaussianBlur(result.astype(np.float32), (0, 0), config.soft_edge)
        soft = np.clip(np.round(soft), 0, 255).astype(np.uint8)
        binary_share = np.count_nonzero((soft <= MASK_LOW) | (soft >= MASK_HIGH)) / soft.size
        if binary_share >= SOFT_EDGE_MIN_BINARY:  # small images: a soft edge would make the mask too grey
            result = soft
    return result
