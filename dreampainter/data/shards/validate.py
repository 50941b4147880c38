"""Check a shard set: every sample decodes and is usable, and ``index.json`` matches the shards.

Per sample: all members present (photo, ``mask.png``, ``ref.*``, ``json``); photo and reference
decode (truncated images count as bad); the mask is an 8-bit single-channel PNG of the photo's size,
near-binary and neither empty nor full (thresholds in :mod:`dreampainter.data.shards.checks`); the JSON
record has a non-empty ``prompt``; keys are unique across the set. Per shard: the tar is complete
and its sample count, size and sha256 match the index; shards missing from disk or from the index
are reported. Shards without an index (e.g. from WebDataset's ``ShardWriter`` or ``tar``) are
still checked sample by sample.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile
from tqdm.auto import tqdm

from dreampainter.data.decode import load_image, load_mask
from dreampainter.data.shards.checks import MASK_MODES, mask_problems, mask_size_problem, meta_problems
from dreampainter.data.shards.format import (
    INDEX_FILENAME,
    MASK_EXTENSION,
    META_EXTENSION,
    ShardIndex,
    find_photo_suffix,
    find_reference_suffix,
    parse_meta,
    sample_member_problems,
)
from dreampainter.data.shards.tar import HashingReader, TarFormatError, TruncatedTarError, iter_tar_samples
from dreampainter.errors import DreamPainterError, InvalidInputError, MissingFileError


@dataclass
class BadSample:
    shard: str
    key: str
    reasons: list[str]

    def __str__(self) -> str:
        return f"{self.shard} {self.key}: {'; '.join(self.reasons)}"


@dataclass
class ShardResult:
    """What reading one shard found (before comparing with the index)."""

    name: str
    num_samples: int = 0
    num_bytes: int = 0
    sha256: str = ""
    keys: list[str] = field(default_factory=list)
    bad_samples: list[BadSample] = field(default_factory=list)
    error: str | None = None


@dataclass
class ValidationReport:
    """Totals, bad samples (with reasons) and shard/index problems of a shard set."""

    source: str
    index_found: bool
    num_shards: int = 0
    num_samples: int = 0
    bad_samples: list[BadSample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad_samples and not self.problems

    @property
    def bad_keys(self) -> list[str]:
        return [bad.key for bad in self.bad_samples]

    def summary(self, max_listed: int = 50) -> str:
        lines = [
            f"{self.source}: {self.num_shards} shards, {self.num_samples} samples, "
            f"{len(self.bad_samples)} bad samples, {len(self.problems)} shard/index problems"
            + ("" if self.index_found else " (no index)")
        ]
        lines.extend(f"  {problem}" for problem in self.problems)
        lines.extend(f"  {bad}" for bad in self.bad_samples[:max_listed])
        if len(self.bad_samples) > max_listed:
            lines.append(f"  ... and {len(self.bad_samples) - max_listed} more bad samples")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL refuse truncated images even if another module relaxed that globally."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _mask_format_problem(data: bytes, name: str) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode = image.format, image.mode
    except Exception:
        return None  # load_mask names the decoding error
    if fmt != "PNG" or mode not in MASK_MODES:
        return f"{name}: not an 8-bit single-channel PNG ({fmt}, mode {mode})"
    return None


def check_sample(key: str, members: Mapping[str, bytes]) -> list[str]:
    """Every reason this sample is unusable (empty when it is fine)."""
    problems = sample_member_problems(key, members)
    if META_EXTENSION in members:
        try:
            problems += meta_problems(parse_meta(key, members[META_EXTENSION]))
        except DreamPainterError as error:
            problems.append(str(error))
    photo_suffix, reference_suffix = find_photo_suffix(members), find_reference_suffix(members)
    photo = None
    with _strict_decoding():
        if photo_suffix is not None:
            try:
                photo = load_image(members[photo_suffix], f"{key}.{photo_suffix}")
            except DreamPainterError as error:
                problems.append(str(error))
        if MASK_EXTENSION in members:
            name = f"{key}.{MASK_EXTENSION}"
            format_problem = _mask_format_problem(members[MASK_EXTENSION], name)
            if format_problem:
                problems.append(format_problem)
            try:
                mask = load_mask(members[MASK_EXTENSION], name)
            except DreamPainterError as error:
                problems.append(str(error))
            else:
                size_problem = mask_size_problem(mask, photo) if photo is not None else None
                problems += [size_problem] if size_problem else []
                problems += mask_problems(mask)
        if reference_suffix is not None:
            try:
                load_image(members[reference_suffix], f"{key}.{reference_suffix}")
            except DreamPainterError as error:
                problems.append(str(error))
    return problems


def validate_shard(path: str | os.PathLike, name: str | None = None, on_sample=None) -> ShardResult:
    """Read one shard completely, checking each sample; never raises for a corrupt shard."""
    name = name or Path(path).name
    result = ShardResult(name)
    with open(path, "rb") as file:
        reader = HashingReader(file)
        try:
            for key, members in iter_tar_samples(reader, name=name):
                result.num_samples += 1
                result.keys.append(key)
                problems = check_sample(key, members)
                if problems:
                    result.bad_samples.append(BadSample(name, key, problems))
                if on_sample is not None:
                    on_sample()
        except TarFormatError as error:
            result.error = str(error)
            if error.pending_key is not None:
                truncated = isinstance(error, TruncatedTarError)
                reason = (
                    "incomplete: the shard ends inside it"
                    if truncated
                    else "unreadable: the tar is corrupt there"
                )
                result.bad_samples.append(BadSample(name, error.pending_key, [reason]))
        reader.drain()  # hash the whole file, including what follows the end marker
    result.num_bytes, result.sha256 = reader.num_bytes, reader.sha256.hexdigest()
    return result


def _validate_shard_task(task: tuple[str, str]) -> ShardResult:
    path, name = task
    return validate_shard(path, name)


def _resolve(source: Path) -> tuple[Path, ShardIndex | None, list[str], list[str]]:
    """(root folder, index or None, shard names to read, problems found so far)."""
    if not source.exists():
        raise MissingFileError(f"shard folder or index not found: {source}")
    if source.is_file() and source.suffix == ".tar":
        return source.parent, None, [source.name], []
    if source.is_file():
        root, index_path = source.parent, source
    elif source.is_dir():
        root, index_path = source, source / INDEX_FILENAME
    else:
        raise InvalidInputError(f"{source}: expected a shard folder, an {INDEX_FILENAME} or a .tar shard")
    on_disk = sorted(path.name for path in root.glob("*.tar"))
    if not index_path.exists():
        if not on_disk:
            nested = sorted(path.parent.name for path in root.glob(f"*/{INDEX_FILENAME}"))
            hint = f" (sub-folders with an index: {', '.join(nested)})" if nested else ""
            raise MissingFileError(f"no {INDEX_FILENAME} and no .tar shards in {root}{hint}")
        return (
            root,
            None,
            on_disk,
            [f"{INDEX_FILENAME} missing in {root}: sample counts and checksums not checked"],
        )
    try:
        index = ShardIndex.load(index_path)
    except InvalidInputError as error:
        if source.is_file():
            raise
        return root, None, on_disk, [f"{INDEX_FILENAME} unreadable ({error}); checked the .tar files found"]
    listed = [shard.name for shard in index.shards]
    problems = [f"{name}: on disk but not in {INDEX_FILENAME}" for name in on_disk if name not in set(listed)]
    seen: set[str] = set()
    for name in listed:
        if name in seen:
            problems.append(f"{name}: listed twice in {INDEX_FILENAME}")
        seen.add(name)
    return root, index, list(dict.fromkeys(listed)), problems


def _compare_with_index(result: ShardResult, index: ShardIndex) -> list[str]:
    entry = next(shard for shard in index.shards if shard.name == result.name)
    problems = []
    if entry.num_samples != result.num_samples:
        problems.append(f"{result.name}: {result.num_samples} samples, index says {entry.num_samples}")
    if entry.num_bytes != result.num_bytes:
        problems.append(f"{result.name}: {result.num_bytes} bytes, index says {entry.num_bytes}")
    if entry.sha256 != result.sha256:
        problems.append(
            f"{result.name}: sha256 mismatch (file {result.sha256[:12]}..., index {entry.sha256[:12]}...)"
        )
    return problems


def validate_shards(
    folder_or_index: str | os.PathLike, *, progress: bool = True, workers: int = 1
) -> ValidationReport:
    """Check every sample of a shard set (a folder, its ``index.json``, or one ``.tar``) and its index.

    ``workers > 1`` reads shards in parallel processes; the report is the same either way.
    """
    if not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers: must be a positive integer, got {workers!r}")
    source = Path(folder_or_index)
    root, index, names, problems = _resolve(source)
    report = ValidationReport(str(source), index_found=index is not None, problems=problems)
    present = []
    for name in names:
        if (root / name).is_file():
            present.append(name)
        else:
            report.problems.append(f"{name}: listed in {INDEX_FILENAME} but missing on disk")
    total = index.num_samples if index is not None else None
    bar = tqdm(total=total, disable=not progress, desc="validate", unit="sample")
    with bar:
        if workers == 1 or len(present) <= 1:
            results = (validate_shard(root / name, name, on_sample=lambda: bar.update(1)) for name in present)
            _collect(report, results, index, None)
        else:
            tasks = [(str(root / name), name) for name in present]
            with multiprocessing.get_context().Pool(min(workers, len(present))) as pool:
                _collect(report, pool.imap(_validate_shard_task, tasks), index, bar)
    return report


def _collect(report: ValidationReport, results, index: ShardIndex | None, bar) -> None:
    first_shard: dict[str, str] = {}
    for result in results:
        if bar is not None:
            bar.update(result.num_samples)
        report.num_shards += 1
        report.num_samples += result.num_samples
        if result.error:
            report.problems.append(result.error)
        if index is not None:
            report.problems += _compare_with_index(result, index)
        report.bad_samples += result.bad_samples
        for key in result.keys:
            if key in first_shard:
                report.bad_samples.append(
                    BadSample(result.name, key, [f"duplicate key (also in {first_shard[key]})"])
                )
            else:
                first_shard[key] = result.name
