"""Reading a benchmark split for the runner: listing, checking and decoding samples, split by index.

Every process reads the shard listing in the same order, so sample ``i`` (counting every sample
found, good or bad) is checked by process ``i % world_size`` whatever the shard layout. A process
checks and decodes only the samples it owns (the runner then fetches the few more it generates); a bad sample (missing member, undecodable image,
unusable mask, no prompt, duplicate key) is reported with its key and reason instead of stopping
the run, and a corrupt or truncated shard is reported once (by process 0) after its readable samples.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dreampainter.data.decode import load_image, load_mask
from dreampainter.data.shards.format import (
    MASK_EXTENSION,
    META_EXTENSION,
    find_photo_suffix,
    find_reference_suffix,
    parse_meta,
)
from dreampainter.data.shards.sources import open_shard, resolve_shards
from dreampainter.data.shards.tar import TarFormatError, iter_tar_samples
from dreampainter.data.shards.validate import check_sample
from dreampainter.errors import DreamPainterError, InvalidInputError


@dataclass
class BenchSample:
    """One decoded benchmark sample: RGB photo, product mask (uint8, 255 = product), RGB reference."""

    index: int
    key: str
    shard: str
    photo: Image.Image
    product_mask: np.ndarray
    reference: Image.Image
    meta: dict[str, Any]

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]


@dataclass
class BadSample:
    """A sample (or a shard, ``key`` None) that could not be evaluated, and why."""

    key: str | None
    shard: str
    reason: str
    index: int | None = None  # position in the listing (None for a shard that could not be read)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "shard": self.shard, "index": self.index, "reason": self.reason}


@dataclass
class EncodedEntry:
    """A checked sample's members, kept encoded (decoding happens batch by batch)."""

    index: int
    shard: str
    key: str
    members: dict[str, bytes]

    def decode(self) -> BenchSample:
        return decode_sample(self.index, self.shard, self.key, self.members)

    def decode_reference(self) -> Image.Image:
        suffix = find_reference_suffix(self.members)
        return load_image(self.members[suffix], f"{self.key}.{suffix}")


@dataclass
class BenchmarkShare:
    """What one process read: every listed key (in order), and for the samples it checked, the good
    ones (encoded, with their photo size) and the bad ones."""

    source: str
    keys: list[str] = field(default_factory=list)
    good: dict[int, EncodedEntry] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    bad: list[BadSample] = field(default_factory=list)


def _shard_name(url: str) -> str:
    return os.path.basename(url.rstrip("/")) or url


def iter_benchmark(
    source: str | os.PathLike, limit: int | None = None
) -> Iterator[tuple[int, str, str, dict[str, bytes] | None, str | None]]:
    """Yield ``(index, shard, key, members, shard_error)`` over the first ``limit`` samples.

    A shard that cannot be opened or read to its end yields one ``(-1, shard, pending_key, None,
    reason)`` record after the samples read before the damage.
    """
    shards = resolve_shards(os.fspath(source) if isinstance(source, os.PathLike) else source)
    index = 0
    for url in shards.urls:
        if limit is not None and index >= limit:
            return
        shard = _shard_name(url)
        try:
            with open_shard(url) as stream:
                for key, members in iter_tar_samples(stream, name=shard):
                    if limit is not None and index >= limit:
                        return
                    yield index, shard, key, members, None
                    index += 1
        except TarFormatError as error:
            yield -1, shard, error.pending_key, None, str(error)
        except OSError as error:
            yield -1, shard, None, None, f"{shard}: cannot read the shard ({error})"


def decode_sample(index: int, shard: str, key: str, members: dict[str, bytes]) -> BenchSample:
    """Check a sample as the shard validator does, then decode it; raises with every reason it is unusable."""
    from dreampainter.pipelines.image_processing import prepare_product_input

    problems = check_sample(key, members)
    if problems:
        raise InvalidInputError("; ".join(problems))
    photo_suffix, reference_suffix = find_photo_suffix(members), find_reference_suffix(members)
    product = prepare_product_input(
        load_image(members[photo_suffix], f"{key}.{photo_suffix}"),
        load_mask(members[MASK_EXTENSION], f"{key}.{MASK_EXTENSION}"),
        name=f"{key}.{photo_suffix}",
        mask_name=f"{key}.{MASK_EXTENSION}",
    )
    return BenchSample(
        index=index,
        key=key,
        shard=shard,
        photo=product.image,
        product_mask=product.product_mask,
        reference=load_image(members[reference_suffix], f"{key}.{reference_suffix}"),
        meta=parse_meta(key, members[META_EXTENSION]),
    )


def read_benchmark_share(
    source: str | os.PathLike, rank: int = 0, world_size: int = 1, limit: int | None = None
) -> BenchmarkShare:
    """List the benchmark and decode the samples with ``index % world_size == rank``."""
    share = BenchmarkShare(source=os.fspath(source))
    first_shard: dict[str, str] = {}
    for index, shard, key, members, shard_error in iter_benchmark(source, limit):
        if shard_error is not None:
            if rank == 0:
                share.bad.append(BadSample(key, shard, shard_error))
            continue
        share.keys.append(key)
        duplicate_of = first_shard.get(key)
        first_shard.setdefault(key, shard)
        if index % world_size != rank:
            continue
        if duplicate_of is not None:
            share.bad.append(
                BadSample(key, shard, f"duplicate key: sample {key} already read from {duplicate_of}", index)
            )
            continue
        try:
            share.sizes[index] = decode_sample(index, shard, key, members).photo.size
            share.good[index] = EncodedEntry(index, shard, key, members)
        except DreamPainterError as error:
            share.bad.append(BadSample(key, shard, str(error), index))
    return share


def read_encoded(
    source: str | os.PathLike, indices: Collection[int], limit: int | None = None
) -> dict[int, EncodedEntry]:
    """The members of the samples at these listing positions: e.g. those another process checked."""
    wanted = set(indices)
    found: dict[int, EncodedEntry] = {}
    if not wanted:
        return found
    for index, shard, key, members, shard_error in iter_benchmark(source, limit):
        if shard_error is None and index in wanted:
            found[index] = EncodedEntry(index, shard, key, members)
            if len(found) == len(wanted):
                break
    return found


def read_samples(
    source: str | os.PathLike, indices: Collection[int], limit: int | None = None
) -> dict[int, BenchSample]:
    """Decode the (good) samples at these listing positions."""
    return {index: entry.decode() for index, entry in read_encoded(source, indices, limit).items()}


def shuffled_partners(keys: list[str], seed: int) -> dict[str, str]:
    """A fixed derangement of ``keys``: each key -> another key whose reference it is shown.

    The sorted keys are put in a random order (seeded by ``seed``) and each is paired with the next
    one around that circle, so nobody keeps their own reference; the pairing is the same for any
    number of processes or batch size.
    """
    order = sorted(set(keys))
    if len(order) < 2:
        raise InvalidInputError(f"a shuffled reference needs at least 2 samples, got {len(order)}")
    circle = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    return {circle[i]: circle[(i + 1) % len(circle)] for i in range(len(circle))}


__all__ = [
    "BadSample",
    "BenchSample",
    "BenchmarkShare",
    "EncodedEntry",
    "decode_sample",
    "iter_benchmark",
    "read_benchmark_share",
    "read_encoded",
    "read_samples",
    "shuffled_partners",
]
