"""Streaming a tar shard as WebDataset sample groups, counting what cannot be read."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

from webdataset.tariterators import base_plus_ext

from dreampainter.data.loading.skips import SkipLog
from dreampainter.data.shards.sources import open_shard


def iter_tar_groups(url: str, log: SkipLog, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream a tar shard as ``{"__key__", "__url__", suffix: bytes, ...}`` groups (WebDataset rules).

    A shard that cannot be opened or ends early is counted and logged; its complete samples are kept.
    """
    produced = 0
    try:
        stream = open_shard(url)
    except Exception as error:
        log.skip("unreadable_shard", url, error)
        return
    current: dict[str, Any] | None = None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                if not info.isreg():
                    continue
                data = archive.extractfile(info).read()
                archive.members = []  # streaming: do not keep every TarInfo
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None or info.name.startswith("__"):
                    continue
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        produced += 1
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                current[suffix.lower()] = data
        if current is not None:
            produced += 1
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        log.skip("truncated_tar", url, error)
        return
    if expected is not None and produced < expected:
        log.skip(
            "missing_samples", url, f"{produced} of {expected} samples in the index", expected - produced
        )
