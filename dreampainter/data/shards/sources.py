"""Shard sources: resolve a folder / index / brace pattern / URL list, open shards, split them.

A shard source is any of

* a local folder: its ``index.json`` when present (exact sample counts), else every ``*.tar`` in it;
* an ``index.json`` path or URL: shard names are resolved relative to the index;
* a brace pattern (``/data/train-{000000..000127}.tar``) or a ``::``-separated list of them;
* one URL or a list of URLs: ``pipe:<command>``, ``http(s)://``, ``file://`` and, through fsspec, any
  other scheme fsspec knows (``s3://``, ``gs://``, ``hf://``, ...).

Splitting is explicit: the caller passes ``rank`` / ``world_size`` (e.g. from accelerate) and the
DataLoader worker id; nothing here reads environment variables.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import gopen

from dreampainter.data.shards.format import INDEX_FILENAME, ShardIndex
from dreampainter.errors import InvalidInputError, MissingFileError

# Schemes webdataset's gopen handles itself; everything else with a scheme goes through fsspec.
_GOPEN_SCHEMES = ("pipe", "http", "https", "file")


@dataclass
class ShardSet:
    """Resolved shard URLs and, when an index was found, their exact sample counts."""

    urls: list[str]
    counts: list[int] | None = None
    source: str = ""

    @property
    def num_samples(self) -> int | None:
        return None if self.counts is None else sum(self.counts)


def _is_url(text: str) -> bool:
    scheme = urlparse(text).scheme
    return len(scheme) > 1  # a Windows drive letter is not a scheme


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for streaming reads: local path, ``pipe:``, ``http(s)://`` or any fsspec URL."""
    scheme = urlparse(url).scheme if _is_url(url) else ""
    if scheme == "":
        return open(url, "rb")  # noqa: SIM115 - the caller closes the stream
    if scheme in _GOPEN_SCHEMES:
        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with the project's dependencies
        raise InvalidInputError(f"{url}: scheme '{scheme}' needs fsspec (pip install fsspec)") from None
    return fsspec.open(url, "rb").open()


def _read_text(url: str) -> str:
    with open_shard(url) as stream:
        return stream.read().decode("utf-8")


def _join(base: str, name: str) -> str:
    if _is_url(name) or os.path.isabs(name):
        return name
    if _is_url(base):
        return base.rsplit("/", 1)[0] + "/" + name
    return str(Path(base).parent / name)


def _from_index(index_url: str) -> ShardSet:
    if _is_url(index_url):
        try:
            data = json.loads(_read_text(index_url))
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{index_url}: invalid JSON ({error.msg})") from None
        index = ShardIndex.from_json(data, source=index_url)
    else:
        index = ShardIndex.load(index_url)
    if not index.shards:
        raise InvalidInputError(f"{index_url}: the index lists no shards")
    urls = [_join(index_url, shard.name) for shard in index.shards]
    return ShardSet(urls, [shard.num_samples for shard in index.shards], source=index_url)


def resolve_shards(source: str | os.PathLike | Sequence[str] | ShardSet) -> ShardSet:
    """Turn a folder, an index, a brace pattern or URLs into a :class:`ShardSet`."""
    if isinstance(source, ShardSet):
        return source
    if isinstance(source, (list, tuple)):
        urls = [url for item in source for url in resolve_shards(str(item)).urls]
        if not urls:
            raise InvalidInputError("shard list is empty")
        return ShardSet(urls, None, source=f"{len(urls)} urls")
    text = os.fspath(source)
    if not _is_url(text) and os.path.isdir(text):
        if os.path.exists(os.path.join(text, INDEX_FILENAME)):
            return _from_index(os.path.join(text, INDEX_FILENAME))
        urls = sorted(str(path) for path in Path(text).glob("*.tar"))
        if not urls:
            raise MissingFileError(f"{text}: no {INDEX_FILENAME} and no *.tar shards in this folder")
        return ShardSet(urls, None, source=text)
    if text.endswith(".json"):
        return _from_index(text)
    urls = [url for part in text.split("::") for url in braceexpand.braceexpand(part)]
    missing = [url for url in urls if not _is_url(url) and not os.path.exists(url)]
    if missing:
        raise MissingFileError(f"{len(missing)} of {len(urls)} shard(s) not found, first: {missing[0]}")
    return ShardSet(urls, None, source=text)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool, pass_index: int = 0) -> list[int]:
    """The epoch's shard order, identical on every rank and worker (seeded by seed, epoch, pass)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}/{pass_index}").shuffle(order)
    return order


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Without resampling each (rank, worker) needs a shard of its own; say so clearly otherwise."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        raise InvalidInputError(
            f"{num_shards} shard(s) cannot be split over {world_size} rank(s) x {max(1, num_workers)} "
            f"loader worker(s) = {needed} readers: write at least {needed} shards (smaller shards), use "
            "fewer loader workers, or enable resampled mode"
        )


def split_shards(
    order: Sequence[int], rank: int, world_size: int, worker: int, num_workers: int
) -> list[int]:
    """The shards one (rank, worker) reads: every ``world_size``-th by rank, then by worker.

    Disjoint over all (rank, worker) pairs and together complete.
    """
    if not 0 <= rank < world_size:
        raise InvalidInputError(f"rank {rank} is outside world size {world_size}")
    num_workers = max(1, num_workers)
    return list(order[rank::world_size][worker::num_workers])


def distributed_rank_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` from an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
