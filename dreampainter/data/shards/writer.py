"""Write DreamEcom shards: numbered tar files plus ``index.json``, atomically and deterministically.

Each shard is written to a hidden temporary name (``.<prefix>-000000.tar.partial``) and renamed
into place only once complete, and ``index.json`` is written last, so a killed run never leaves a
file that looks like a complete shard. Tar headers carry fixed metadata (mtime 0, uid/gid 0, no user
names) and members are written in :meth:`EncodedSample.members` order, so the same samples always give
the same bytes and checksums.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from dreampainter.data.shards.format import (
    IMAGE_EXTENSIONS,
    INDEX_FILENAME,
    EncodedSample,
    ShardIndex,
    ShardInfo,
    check_key,
)
from dreampainter.data.shards.manifest import (
    BadRow,
    EncodeOptions,
    ManifestRow,
    PreparedRow,
    WriteReport,
    prepare_row,
    read_rows,
)
from dreampainter.data.shards.tar import (
    END_OF_ARCHIVE,
    HashingReader,
    TarFormatError,
    iter_tar_samples,
    member_bytes,
)
from dreampainter.errors import InvalidInputError, MissingFileError

logger = logging.getLogger(__name__)

_PARTIAL_SUFFIX = ".partial"


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


class _HashingFile:
    """A binary file that hashes and counts what is written to it."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 - closed by ShardSetWriter
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.num_bytes += len(data)


class ShardSetWriter:
    """Append samples to numbered shards, starting a new shard by sample count or size.

    ``max_bytes`` bounds a shard's file size, except that a single sample larger than it gets a
    shard of its own. Call :meth:`close` to finish the last shard, or :meth:`abort` to drop it.
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, max_samples_per_shard: int, max_bytes: int | None, prefix: str
    ):
        self.out_dir = Path(out_dir)
        self.max_samples = max_samples_per_shard
        self.max_bytes = max_bytes
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self._file: _HashingFile | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _temp_path(self, name: str) -> Path:
        return self.out_dir / f".{name}{_PARTIAL_SUFFIX}"

    def _open(self) -> None:
        self._file = _HashingFile(self._temp_path(shard_name(self.prefix, len(self.shards))))
        self._count = 0

    def _finish(self) -> None:
        assert self._file is not None
        name = shard_name(self.prefix, len(self.shards))
        self._file.write(END_OF_ARCHIVE)
        self._file.file.flush()
        os.fsync(self._file.file.fileno())
        self._file.file.close()
        os.replace(self._temp_path(name), self.out_dir / name)
        self.shards.append(ShardInfo(name, self._count, self._file.num_bytes, self._file.sha256.hexdigest()))
        self._file = None

    def write(self, sample: EncodedSample) -> None:
        check_key(sample.key)
        if sample.key in self._keys:
            raise InvalidInputError(f"sample key {sample.key!r}: duplicate key")
        for role, ext in (("photo", sample.photo_ext), ("reference", sample.reference_ext)):
            if ext not in IMAGE_EXTENSIONS:
                raise InvalidInputError(
                    f"sample {sample.key}: {role} extension {ext!r} is not one of {IMAGE_EXTENSIONS}"
                )
        data = b"".join(
            member_bytes(f"{sample.key}.{suffix}", blob) for suffix, blob in sample.members().items()
        )
        if self._file is not None:
            full = self._count >= self.max_samples
            too_big = (
                self.max_bytes is not None
                and self._file.num_bytes + len(data) + len(END_OF_ARCHIVE) > self.max_bytes
            )
            if full or too_big:
                self._finish()
        if self._file is None:
            self._open()
        assert self._file is not None
        self._file.write(data)
        self._count += 1
        self._keys.add(sample.key)

    def close(self) -> list[ShardInfo]:
        if self._file is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Close and delete the shard being written (completed shards stay)."""
        if self._file is not None:
            self._file.file.close()
            self._temp_path(shard_name(self.prefix, len(self.shards))).unlink(missing_ok=True)
            self._file = None


def _check_write_arguments(max_samples_per_shard: int, max_bytes: int | None, prefix: str) -> None:
    if not isinstance(max_samples_per_shard, int) or max_samples_per_shard < 1:
        raise InvalidInputError(
            f"samples per shard: must be a positive integer, got {max_samples_per_shard!r}"
        )
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
        raise InvalidInputError(f"max bytes: must be a positive integer, got {max_bytes!r}")
    if not prefix or "/" in prefix or "\\" in prefix or prefix.startswith("."):
        raise InvalidInputError(f"shard prefix {prefix!r}: must be a plain file-name prefix")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse to replace a complete shard set unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"output folder {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_FILENAME
    if index_path.exists():
        if not overwrite:
            raise InvalidInputError(
                f"output folder {out_dir}: already holds a shard set ({INDEX_FILENAME}); pass overwrite"
            )
        index_path.unlink()  # from here on the folder is visibly incomplete until the new index lands


def _remove_stale_shards(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Remove shards and partial files of ``prefix`` left by an earlier, larger or killed run."""
    pattern = re.compile(rf"^\.?{re.escape(prefix)}-\d{{6,}}\.tar({re.escape(_PARTIAL_SUFFIX)})?$")
    for path in out_dir.iterdir():
        if pattern.match(path.name) and path.name not in keep:
            path.unlink()


def write_shards(
    samples: Iterable[EncodedSample],
    out_dir: str | os.PathLike,
    *,
    max_samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    prefix: str = "shard",
    progress: bool = True,
    total: int | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ShardIndex:
    """Write ``samples`` to ``out_dir/<prefix>-000000.tar, ...`` and ``out_dir/index.json``.

    A folder that already holds an ``index.json`` is only replaced with ``overwrite``; shards of
    ``prefix`` that an earlier run left behind (and the new set does not use) are removed before the
    index is written. If ``samples`` raises, the shard in progress is deleted and no index is written.
    """
    _check_write_arguments(max_samples_per_shard, max_bytes, prefix)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    writer = ShardSetWriter(
        out_dir, max_samples_per_shard=max_samples_per_shard, max_bytes=max_bytes, prefix=prefix
    )
    try:
        for sample in tqdm(samples, total=total, disable=not progress, desc="write shards", unit="sample"):
            writer.write(sample)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    _remove_stale_shards(out_dir, prefix, keep={shard.name for shard in shards})
    index = ShardIndex(shards=shards, meta=dict(meta or {}))
    index.save(out_dir / INDEX_FILENAME)
    if not shards:
        logger.warning("wrote an empty shard set to %s (no samples)", out_dir)
    return index


def index_shards(
    folder: str | os.PathLike,
    *,
    pattern: str = "*.tar",
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardIndex:
    """Write ``index.json`` for shards made elsewhere (WebDataset ``ShardWriter``, ``tar``, ...).

    Each shard matching ``pattern`` (sorted by name) is read completely to count its samples and hash
    it; a truncated or corrupt shard raises :class:`InvalidInputError` naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"shard folder not found: {folder}")
    if (folder / INDEX_FILENAME).exists() and not overwrite:
        raise InvalidInputError(f"{folder / INDEX_FILENAME}: already exists; pass overwrite to replace it")
    paths = sorted(path for path in folder.glob(pattern) if path.is_file())
    if not paths:
        raise MissingFileError(f"no shards matching {pattern} in {folder}")
    shards = []
    for path in tqdm(paths, disable=not progress, desc="index shards", unit="shard"):
        with open(path, "rb") as file:
            reader = HashingReader(file)
            try:
                count = sum(1 for _ in iter_tar_samples(reader, name=path.name))
            except TarFormatError as error:
                raise InvalidInputError(f"cannot index {path.name}: {error}") from None
            reader.drain()
        shards.append(
            ShardInfo(path.relative_to(folder).as_posix(), count, reader.num_bytes, reader.sha256.hexdigest())
        )
    index = ShardIndex(shards=shards, meta=dict(meta or {}))
    index.save(folder / INDEX_FILENAME)
    return index


def _prepared_rows(rows: list[ManifestRow], options: EncodeOptions, workers: int) -> Iterator[PreparedRow]:
    """Prepare rows in order, in ``workers`` processes when more than one (order never depends on it)."""
    task = partial(prepare_row, options=options)
    if workers == 1 or len(rows) <= 1:
        yield from map(task, rows)
        return
    chunksize = max(1, min(16, len(rows) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(task, rows, chunksize=chunksize)


def write_shards_from_manifest(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    on_error: Literal["skip", "fail"] = "skip",
    reencode: bool = False,
    max_side: int | None = None,
    jpeg_quality: int = 95,
    max_samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    prefix: str = "shard",
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[ShardIndex, WriteReport]:
    """Build a shard set from a JSONL/CSV manifest or a folder layout (see ``docs/data_format.md``).

    Original encoded bytes are kept unless ``reencode`` or a ``max_side`` resize applies. Bad rows
    (missing file, undecodable image, mask size != photo size, unusable mask, empty prompt) are
    reported by row and skipped, or raise :class:`InvalidInputError` with ``on_error="fail"``.
    """
    if on_error not in ("skip", "fail"):
        raise InvalidInputError(f"on_error: must be 'skip' or 'fail', got {on_error!r}")
    if not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers: must be a positive integer, got {workers!r}")
    options = EncodeOptions(reencode=reencode, max_side=max_side, jpeg_quality=jpeg_quality)
    options.check()
    _check_write_arguments(max_samples_per_shard, max_bytes, prefix)
    source, rows, unparsed = read_rows(manifest)
    report = WriteReport(source=source, num_rows=len(rows) + len(unparsed))
    unparsed = sorted(unparsed, key=lambda bad: bad.row)
    start = time.perf_counter()

    def reject(bad: BadRow) -> None:
        if on_error == "fail":
            raise InvalidInputError(str(bad))
        report.bad_rows.append(bad)
        logger.warning("skipped %s", bad)

    def samples() -> Iterator[EncodedSample]:
        seen: dict[str, int] = {}
        pending = iter(unparsed)  # rows that failed to parse, merged in row order
        next_unparsed = next(pending, None)
        bar = tqdm(total=len(rows), disable=not progress, desc="write shards", unit="row")
        with bar:
            for prepared in _prepared_rows(rows, options, workers):
                bar.update(1)
                while next_unparsed is not None and next_unparsed.row < prepared.row.row:
                    reject(next_unparsed)
                    next_unparsed = next(pending, None)
                error = prepared.error
                if error is None and prepared.sample.key in seen:
                    error = f"duplicate key {prepared.sample.key!r} (first used at row {seen[prepared.sample.key]})"
                if error is not None:
                    reject(BadRow(prepared.row.location, prepared.row.row, error))
                    continue
                seen[prepared.sample.key] = prepared.row.row
                report.count(prepared)
                yield prepared.sample
        for bad in [next_unparsed, *pending] if next_unparsed is not None else []:
            reject(bad)

    index = write_shards(
        samples(),
        out_dir,
        max_samples_per_shard=max_samples_per_shard,
        max_bytes=max_bytes,
        prefix=prefix,
        progress=False,
        meta=meta,
        overwrite=overwrite,
    )
    report.num_shards = len(index.shards)
    report.num_bytes = sum(shard.num_bytes for shard in index.shards)
    report.seconds = time.perf_counter() - start
    return index, report
