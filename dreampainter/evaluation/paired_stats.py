"""Paired statistics of one system against another over the same samples: the mean difference with a
paired bootstrap confidence interval, and the exact two-sided sign test.

``differences[i] = system[i] - reference[i]`` over the samples both measured (NaN on either side is
left out). The bootstrap resamples *samples* (pairs) with replacement and takes the percentile
interval of the resampled mean difference; the sign test counts the samples where the system is
above / below the reference (ties dropped) against a fair coin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np


@dataclass
class PairedResult:
    """The paired comparison of one value: ``n`` pairs, mean difference and its interval, sign test."""

    n: int
    mean_difference: float
    ci_low: float
    ci_high: float
    above: int  # samples where the system's value is higher than the reference's
    below: int
    ties: int
    sign_test_p: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_differences(system: dict[str, float], reference: dict[str, float]) -> np.ndarray:
    """``system[key] - reference[key]`` for the keys both measured (not NaN), in key order."""
    keys = sorted(set(system) & set(reference))
    pairs = [(system[key], reference[key]) for key in keys]
    return np.array([a - b for a, b in pairs if not (math.isnan(a) or math.isnan(b))], dtype=np.float64)


def bootstrap_interval(
    differences: np.ndarray, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean of ``differences`` over ``resamples`` paired bootstrap resamples.

    Resampling is seeded, so the same differences give the same interval; NaN for no differences.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, 256):  # bounded memory for large splits
        stop = min(resamples, start + 256)
        indices = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def sign_test(above: int, below: int) -> float:
    """Exact two-sided sign test: P(a split at least this uneven | each sign has probability 1/2).

    Ties are not counted (pass only the samples that differ); 1.0 when there are none.
    """
    n = above + below
    if n == 0:
        return 1.0
    k = min(above, below)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def paired_comparison(
    system: dict[str, float],
    reference: dict[str, float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedResult:
    """The paired statistics of ``system`` against ``reference`` (per-sample values by key)."""
    differences = paired_differences(system, reference)
    above, below = int((differences > 0).sum()), int((differences < 0).sum())
    low, high = bootstrap_interval(differences, resamples, confidence, seed)
    return PairedResult(
        n=int(differences.size),
        mean_difference=float(differences.mean()) if differences.size else math.nan,
        ci_low=low,
        ci_high=high,
        above=above,
        below=below,
        ties=int(differences.size) - above - below,
        sign_test_p=sign_test(above, below),
    )


__all__ = ["PairedResult", "bootstrap_interval", "paired_comparison", "paired_differences", "sign_test"]
