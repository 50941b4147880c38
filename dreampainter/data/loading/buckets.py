"""Aspect-ratio buckets: non-square catalogue photos are trained at a close-aspect size, not cropped square.

Each sample goes to the bucket whose aspect ratio is closest (in log space) to its photo's, and
batches are formed within a bucket, so every batch has one (height, width).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from dreampainter.errors import InvalidInputError

T = TypeVar("T")


def make_buckets(base: int = 512, multiple: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes ``(height, width)``, multiples of ``multiple``, with area <= ``base**2``.

    For every width the tallest height that keeps the area within ``base**2`` is taken; sizes whose
    aspect ratio exceeds ``max_aspect`` are dropped. ``make_buckets(512)`` gives 512x512, 448x576,
    576x448, 384x640 and 640x384.
    """
    if base % multiple or base <= 0 or multiple <= 0:
        raise InvalidInputError(f"bucket base {base} must be a positive multiple of {multiple}")
    area = base * base
    buckets = []
    for width in range(multiple, area // multiple + 1, multiple):
        height = (area // width) // multiple * multiple
        if height >= multiple and max(height, width) / min(height, width) <= max_aspect:
            buckets.append((height, width))
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to an image of ``size`` ``(width, height)``."""
    width, height = size
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - aspect))


def bucket_batches(
    items: Iterable[T], bucket_of: Callable[[T], int], batch_size: int, drop_last: bool = True
) -> Iterator[tuple[int, list[T]]]:
    """Group a stream into ``(bucket, batch)`` pairs; a batch is yielded as soon as its bucket is full.

    Deterministic for a deterministic input stream. At the end the partial batches are yielded in
    bucket order unless ``drop_last``.
    """
    pending: dict[int, list[T]] = {}
    for item in items:
        bucket = bucket_of(item)
        batch = pending.setdefault(bucket, [])
        batch.append(item)
        if len(batch) == batch_size:
            del pending[bucket]
            yield bucket, batch
    if not drop_last:
        for bucket in sorted(pending):
            yield bucket, pending[bucket]
