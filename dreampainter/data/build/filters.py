"""Filters: every drop has one reason, counted in the report.

Scan (whole input, before any component runs): ``undecodable`` (not an image, truncated),
``oversized`` (over ``filters.max_pixels``, the decode limit), ``too_small`` (shorter side under
``min_side``), ``blurry`` (variance of the Laplacian of the grey photo, its longer side scaled to
512 px when larger, under ``min_sharpness``), ``duplicate`` (perceptual hash within ``duplicate_distance`` bits of
an earlier input's and a 4x4 colour thumbnail whose every tile is within 12 levels of
it, in input order, over the whole
input and every rank; the first of a group is kept).

Masks: ``mask_low_confidence``, ``mask_quality`` (raw mask not near-binary), then on the cleaned mask
``mask_too_small`` / ``mask_too_large`` (product share of the pixels) and ``cut_off`` (product along an
image edge). ``missing_mask`` / ``bad_mask``, ``missing_reference`` / ``bad_reference`` and
``missing_prompt`` are for ``given`` inputs that lack them.
"""

from __future__ import annotations

import cv2
import imagehash
import numpy as np
from PIL import Image

from dreampainter.data.build.config import FilterConfig
from dreampainter.data.shards.checks import MASK_HIGH, MASK_LOW

REASONS = (
    "undecodable",
    "oversized",
    "too_small",
    "blurry",
    "duplicate",
    "missing_mask",
    "bad_mask",
    "mask_low_confidence",
    "mask_quality",
    "mask_too_small",
    "mask_too_large",
    "cut_off",
    "missing_reference",
    "bad_reference",
    "missing_prompt",
)
SHARPNESS_SIDE = 512
COLOUR_TOLERANCE = 12.0  # largest per-tile mean absolute difference (0..255) of two duplicates' 4x4 thumbnails


def sharpness(photo: np.ndarray) -> float:
    """Variance of the Laplacian of the grey photo, its longer side reduced to 512 px when larger."""
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    scale = SHARPNESS_SIDE / max(grey.shape)
    if scale < 1:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash (imagehash) as an int."""
    return int(str(imagehash.phash(image)), 16)


def scan_problem(image: Image.Image, photo: np.ndarray, config: FilterConfig) -> str | None:
    """``too_small`` or ``blurry`` for a decoded, upright photo; None when it passes."""
    if min(image.size) < config.min_side:
        return "too_small"
    if sharpness(photo) < config.min_sharpness:
        return "blurry"
    return None


def colour_signature(image: Image.Image) -> list[int]:
    """The photo's 4x4 RGB thumbnail (48 values): pHash is grey only, and packshots of one shape in
    two colours are not duplicates."""
    return np.asarray(image.convert("RGB").resize((4, 4), Image.Resampling.BOX)).ravel().tolist()


def _same_colours(first: list[int] | None, second: list[int] | None) -> bool:
    if first is None or second is None:
        return True
    tiles = np.abs(np.subtract(first, second)).reshape(-1, 3).mean(axis=1)
    return float(tiles.max()) <= COLOUR_TOLERANCE


def find_duplicates(
    hashes: list[tuple[str, int]], distance: int, colours: dict[str, list[int]] | None = None
) -> dict[str, str]:
    """``key -> earlier key`` for every hash within ``distance`` bits of an earlier kept one (and, when
    ``colours`` are given, with a colour signature within ``COLOUR_TOLERANCE`` of it).

    Pigeonhole bands: two 64-bit hashes within ``d`` bits agree exactly on one of ``d + 1`` bands,
    so candidates are found by band lookups instead of comparing every pair.
    """
    colours = colours or {}
    if distance < 0:
        return {}
    bands = min(distance + 1, 64)
    edges = [round(64 * b / bands) for b in range(bands + 1)]
    tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    kept: list[tuple[str, int]] = []
    found: dict[str, str] = {}
    for key, value in hashes:
        parts = [(value >> edges[b]) & ((1 << (edges[b + 1] - edges[b])) - 1) for b in range(bands)]
        candidates = {index for b, part in enumerate(parts) for index in tables[b].get(part, ())}
        match = min(
            (i for i in candidates
             if bin(kept[i][1] ^ value).count("1") <= distance
             and _same_colours(colours.get(kept[i][0]), colours.get(key))),
            default=None,
        )  # fmt: skip
        if match is not None:
            found[key] = kept[match][0]
            continue
        for b, part in enumerate(parts):
            tables[b].setdefault(part, []).append(len(kept))
        kept.append((key, value))
    return found


def raw_mask_problem(mask: np.ndarray, confidence: float, config: FilterConfig) -> str | None:
    """``mask_low_confidence`` / ``mask_quality`` for the mask a component (or the input) gave."""
    if confidence < config.min_mask_confidence:
        return "mask_low_confidence"
    binary = np.count_nonzero((mask <= MASK_LOW) | (mask >= MASK_HIGH)) / max(mask.size, 1)
    if binary < config.min_binary_share:
        return "mask_quality"
    return None


def clean_mask_problem(mask: np.ndarray, config: FilterConfig) -> str | None:
    """``mask_too_small`` / ``mask_too_large`` / ``cut_off`` for a cleaned mask."""
    product = mask >= 128
    share = float(product.mean())
    if share < config.min_mask_share:
        return "mask_too_small"
    if share > config.max_mask_share:
        return "mask_too_large"
    edges = (product[0], product[-1], product[:, 0], product[:, -1])
    if max(float(edge.mean()) for edge in edges) > config.max_border_touch:
        return "cut_off"
    return None
