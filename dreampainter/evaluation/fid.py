"""Image quality: FID and KID of the results against the split's real photos.

Definitions follow torchmetrics (and torch-fidelity): Gaussian statistics with the unbiased
covariance, ``FID = |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))``; KID is the unbiased
MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``, averaged over random subsets.
Real-photo features are extracted once and cached on disk per split and backbone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from dreampainter.errors import InvalidInputError
from dreampainter.evaluation.backbones import ImageFeatureExtractor
from dreampainter.evaluation.base import Metric, Row
from dreampainter.evaluation.batch import EvalBatch
from dreampainter.utils import atomic_path, module_fingerprint


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``N - 1``) of an ``(N, D)`` feature matrix, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise InvalidInputError(f"FID needs at least 2 feature rows, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
    symmetric ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), which stays real and stable
    for the rank-deficient covariances of small sample sets.
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
    middle = root1 @ np.asarray(sigma2, np.float64) @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    return frechet_distance(*gaussian_statistics(real), *gaussian_statistics(fake))


def polynomial_mmd(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> float:
    """Unbiased MMD^2 between equal-size sets ``x`` and ``y`` with the polynomial kernel."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx = (x @ x.T * gamma + coef) ** degree
    k_yy = (y @ y.T * gamma + coef) ** degree
    k_xy = (x @ y.T * gamma + coef) ** degree
    m = x.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float, int]:
    """KID mean and (population) std over ``subsets`` random subsets; returns the subset size used.

    ``subset_size`` is lowered to the smaller set's size when there are fewer samples (then,
    with all samples in every subset, a single evaluation is exact and the std is 0).
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise InvalidInputError(
            f"KID needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}"
        )
    if size == len(real) == len(fake):
        return polynomial_mmd(real, fake), 0.0, size
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd(real[rng.permutation(len(real))[:size]], fake[rng.permutation(len(fake))[:size]])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values)), size


def image_digest(image: np.ndarray) -> str:
    """A short hash of an image's pixels: cached features are reused only for the same photo."""
    digest = hashlib.sha1(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Real-photo features on disk: ``<folder>/<split>--<backbone>.npz`` with ``keys``, ``digests``, ``features``."""

    def __init__(self, folder: str | os.PathLike, split: str, backbone_id: str) -> None:
        safe_split = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
        self.path = Path(folder) / f"{safe_split}--{backbone_id}.npz"

    def load(self) -> dict[str, tuple[str, np.ndarray]]:
        """``{key: (image digest, features)}``; empty when there is no cache yet."""
        if not self.path.exists():
            return {}
        with np.load(self.path, allow_pickle=False) as data:
            return {
                key: (digest, row)
                for key, digest, row in zip(data["keys"].tolist(), data["digests"].tolist(), data["features"])
            }

    def save(self, entries: dict[str, tuple[str, np.ndarray]]) -> None:
        """Write atomically (temp file + rename) so a killed run never leaves a half-written cache."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(entries)
        with atomic_path(self.path, suffix=".npz") as temporary:  # one temporary per process
            np.savez(
                temporary,
                keys=np.array(keys, dtype=str),
                digests=np.array([entries[k][0] for k in keys], dtype=str),
                features=np.stack([entries[k][1] for k in keys]),
            )


class ImageQualityMetric(Metric):
    """FID and KID of the composited results against the real photos.

    The real set is the input photos of the evaluated samples plus any added with
    :meth:`add_real` (e.g. the whole split when evaluating with ``--limit``). The on-disk cache
    only saves recomputing features (checked by a digest of each photo's pixels); it never adds
    photos to the real set.
    """

    name = "image_quality"
    requires = ("inception",)
    higher_is_better = {"fid": False, "kid_mean": False}

    def __init__(
        self,
        extractor: ImageFeatureExtractor,
        split: str = "benchmark",
        cache_dir: str | os.PathLike | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        self.extractor = extractor
        self.cache = (
            FeatureCache(cache_dir, split, f"{extractor.name}-{module_fingerprint(extractor, length=16)}")
            if cache_dir
            else None
        )
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        self.batch_size = batch_size
        self.progress = progress
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._fake: dict[str, np.ndarray] = {}
        self._real: dict[str, tuple[str, np.ndarray]] = {}  # the real set of this run
        self._cached: dict[str, tuple[str, np.ndarray]] = self.cache.load() if self.cache else {}
        self._cache_dirty = False

    def _extract(self, images: list[np.ndarray]) -> np.ndarray:
        return self.extractor.extract(images, batch_size=self.batch_size, progress=self.progress)

    def add_real(self, keys: list[str], images: list[np.ndarray]) -> None:
        """Add real photos to the real set; features of a photo already in the cache are not recomputed."""
        todo = []
        for key, image in zip(keys, images):
            digest = image_digest(image)
            cached = self._cached.get(key)
            if cached is not None and cached[0] == digest:
                self._real[key] = cached
            else:
                todo.append((key, digest, image))
        if todo:
            features = self._extract([image for _, _, image in todo])
            for (key, digest, _), row in zip(todo, features):
                self._real[key] = self._cached[key] = (digest, row)
            self._cache_dirty = True

    def score(self, batch: EvalBatch) -> list[Row]:
        features = self._extract([sample.composited for sample in batch])
        self._fake.update({sample.key: row for sample, row in zip(batch, features)})
        self.add_real(batch.keys, [sample.photo for sample in batch])
        return [{} for _ in batch]

    def compute(self) -> dict[str, float]:
        if self.cache is not None and self._cache_dirty:
            self.cache.save(self._cached)
            self._cache_dirty = False
        real = (
            np.stack([self._real[key][1] for key in sorted(self._real)]) if self._real else np.zeros((0, 1))
        )
        fake = np.stack([self._fake[key] for key in sorted(self._fake)]) if self._fake else np.zeros((0, 1))
        if len(real) < 2 or len(fake) < 2:
            raise InvalidInputError(
                f"FID/KID need at least 2 real and 2 generated images, got {len(real)} and {len(fake)}"
            )
        kid_mean, kid_std, kid_size = kernel_inception_distance(
            real, fake, self.kid_subsets, self.kid_subset_size, self.seed
        )
        return {
            "fid": fid_from_features(real, fake),
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "kid_subset_size": float(kid_size),
            "fid_real_images": float(len(real)),
            "fid_generated_images": float(len(fake)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fake": dict(self._fake), "real": dict(self._real)}

    def merge_state(self, states: list[dict[str, Any]]) -> None:
        super().merge_state(states)
        for state in states:
            self._fake.update(state["fake"])
            self._real.update(state["real"])
            new = {k: v for k, v in state["real"].items() if self._cached.get(k, ("",))[0] != v[0]}
            self._cached.update(new)
            self._cache_dirty |= bool(new)


__all__ = [
    "FeatureCache",
    "ImageQualityMetric",
    "fid_from_features",
    "frechet_distance",
    "gaussian_statistics",
    "kernel_inception_distance",
    "polynomial_mmd",
]
