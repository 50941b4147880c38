"""Turn a user's catalogue (JSONL/CSV manifest or folder layout) into encoded samples.

A manifest row names a photo, a product mask and a reference (paths relative to the manifest's
folder, or absolute) and carries the prompt fields; every other field is kept in the sample's JSON.
A folder holds either ``manifest.jsonl`` / ``manifest.csv``, or ``photos/``, ``masks/``, ``refs/``
with ``prompts.jsonl`` or ``prompts/<name>.txt`` (see ``docs/data_format.md``).

:func:`prepare_row` checks one row (files exist and decode, mask size and content, prompt) and
returns the encoded sample or the reason it is bad; it runs in worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreampainter.data.decode import load_image, load_mask
from dreampainter.data.shards.checks import MASK_MODES, mask_problems, mask_size_problem, meta_problems
from dreampainter.data.shards.format import EncodedSample, check_key
from dreampainter.errors import DreamPainterError, InvalidInputError, MissingFileError

FILE_FIELDS = ("photo", "mask", "reference")
KEY_FIELD = "key"
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
# PIL format name -> member extension for bytes that are stored as they are.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class FileRef:
    """A file named by a row: ``path`` to open, ``shown`` as the user wrote it (for messages)."""

    path: str
    shown: str


@dataclass
class ManifestRow:
    """One catalogue entry before its files are read. ``row`` is the manifest line (or position)."""

    row: int
    location: str
    key: str
    files: dict[str, FileRef | None]
    meta: dict[str, Any]
    prompt_files: dict[str, FileRef] = field(default_factory=dict)


@dataclass
class BadRow:
    """A row that could not become a sample, with the reason."""

    location: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass
class PreparedRow:
    """The outcome of :func:`prepare_row`: a sample, or an error message, plus what was changed."""

    row: ManifestRow
    sample: EncodedSample | None
    error: str | None
    changes: tuple[str, ...] = ()


@dataclass
class EncodeOptions:
    """How to store images: original bytes unless ``reencode`` or a ``max_side`` downscale applies."""

    reencode: bool = False
    max_side: int | None = None
    jpeg_quality: int = 95

    def check(self) -> None:
        if self.max_side is not None and (not isinstance(self.max_side, int) or self.max_side < 8):
            raise InvalidInputError(f"max side: must be an integer >= 8 pixels, got {self.max_side!r}")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise InvalidInputError(f"JPEG quality: must be an integer in 1..100, got {self.jpeg_quality!r}")


@dataclass
class WriteReport:
    """What :func:`~dreampainter.data.shards.writer.write_shards_from_manifest` did."""

    source: str
    num_rows: int
    bad_rows: list[BadRow] = field(default_factory=list)
    num_written: int = 0
    changes: dict[str, int] = field(default_factory=dict)
    num_shards: int = 0
    num_bytes: int = 0
    seconds: float = 0.0

    def count(self, prepared: PreparedRow) -> None:
        self.num_written += 1
        for change in prepared.changes:
            self.changes[change] = self.changes.get(change, 0) + 1

    def summary(self, max_listed: int = 50) -> str:
        lines = [
            f"{self.source}: {self.num_rows} rows, {self.num_written} samples written to {self.num_shards} shards "
            f"({self.num_bytes / 1e6:.1f} MB), {len(self.bad_rows)} bad rows skipped, {self.seconds:.1f} s"
        ]
        if self.changes:
            lines.append(
                "re-encoded: " + ", ".join(f"{name} {count}" for name, count in sorted(self.changes.items()))
            )
        lines.extend(f"  {bad}" for bad in self.bad_rows[:max_listed])
        if len(self.bad_rows) > max_listed:
            lines.append(f"  ... and {len(self.bad_rows) - max_listed} more bad rows")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading rows


def _file_ref(value: Any, base: Path) -> FileRef | None:
    if value is None or value == "":
        return None
    shown = str(value)
    return FileRef(str(base / shown), shown)


def _row_from_fields(fields: dict[str, Any], row: int, location: str, base: Path) -> ManifestRow:
    key = fields.get(KEY_FIELD)
    meta = {
        name: value.strip() if name in ("prompt", "prompt_zh") and isinstance(value, str) else value
        for name, value in fields.items()
        if name not in FILE_FIELDS
        and name != KEY_FIELD
        and value is not None
        and (value != "" or name == "prompt")
    }
    return ManifestRow(
        row=row,
        location=location,
        key=f"{row:08d}" if key in (None, "") else str(key),
        files={name: _file_ref(fields.get(name), base) for name in FILE_FIELDS},
        meta=meta,
    )


def _read_jsonl(path: Path) -> tuple[list[ManifestRow], list[BadRow]]:
    rows, bad = [], []
    with open(path, encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            location = f"{path.name}:{line_number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                bad.append(BadRow(location, line_number, f"invalid JSON ({error.msg})"))
                continue
            if not isinstance(fields, dict):
                bad.append(
                    BadRow(location, line_number, f"expected a JSON object, got {type(fields).__name__}")
                )
                continue
            rows.append(_row_from_fields(fields, line_number, location, path.parent))
    return rows, bad


def _read_csv(path: Path) -> tuple[list[ManifestRow], list[BadRow]]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        missing = [name for name in (*FILE_FIELDS, "prompt") if name not in (reader.fieldnames or [])]
        if missing:
            raise InvalidInputError(
                f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(reader.fieldnames or [])})"
            )
        start = reader.line_num + 1
        for fields in reader:
            fields.pop(None, None)  # cells beyond the header
            rows.append(_row_from_fields(fields, start, f"{path.name}:{start}", path.parent))
            start = reader.line_num + 1
    return rows, []


def _files_by_stem(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                found.setdefault(path.stem, []).append(path)
    return found


def _read_prompt_records(path: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidInputError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(KEY_FIELD), str):
                raise InvalidInputError(f"{path}:{line_number}: expected a JSON object with a string 'key'")
            if record[KEY_FIELD] in records:
                raise InvalidInputError(f"{path}:{line_number}: duplicate key {record[KEY_FIELD]!r}")
            records[record.pop(KEY_FIELD)] = record
    return records


def _pick(
    candidates: dict[str, list[Path]], stem: str, folder: str, root: Path
) -> tuple[FileRef | None, str | None]:
    paths = candidates.get(stem, [])
    if len(paths) > 1:
        return None, f"several {folder} files for {stem}: {', '.join(path.name for path in paths)}"
    if not paths:
        return FileRef(str(root / folder / f"{stem}.png"), f"{folder}/{stem}.*"), None
    return FileRef(str(paths[0]), f"{folder}/{paths[0].name}"), None


def _read_folder_layout(root: Path) -> tuple[list[ManifestRow], list[BadRow]]:
    if not (root / "photos").is_dir():
        raise InvalidInputError(
            f"{root}: not a catalogue folder: expected {' or '.join(MANIFEST_NAMES)}, or photos/, masks/ and refs/"
        )
    masks, refs = _files_by_stem(root / "masks"), _files_by_stem(root / "refs")
    prompts_path = root / "prompts.jsonl"
    records = _read_prompt_records(prompts_path) if prompts_path.exists() else None
    rows, bad = [], []
    photos = [path for paths in _files_by_stem(root / "photos").values() for path in paths]
    for number, photo in enumerate(sorted(photos, key=lambda path: path.name), start=1):
        stem = photo.stem
        location = f"photos/{photo.name}"
        mask, mask_error = _pick(masks, stem, "masks", root)
        reference, reference_error = _pick(refs, stem, "refs", root)
        if mask_error or reference_error:
            bad.append(BadRow(location, number, mask_error or reference_error or ""))
            continue
        row = ManifestRow(
            row=number,
            location=location,
            key="".join("_" if char == "." or char.isspace() else char for char in stem),
            files={"photo": FileRef(str(photo), location), "mask": mask, "reference": reference},
            meta={},
        )
        if records is not None:
            row.meta = {
                name: value.strip() if name in ("prompt", "prompt_zh") and isinstance(value, str) else value
                for name, value in records.get(stem, {}).items()
                if value is not None and value != ""
            }
        else:
            row.prompt_files["prompt"] = FileRef(str(root / "prompts" / f"{stem}.txt"), f"prompts/{stem}.txt")
            zh = root / "prompts" / f"{stem}.zh.txt"
            if zh.exists():
                row.prompt_files["prompt_zh"] = FileRef(str(zh), f"prompts/{stem}.zh.txt")
        rows.append(row)
    return rows, bad


def read_rows(source: str | os.PathLike) -> tuple[str, list[ManifestRow], list[BadRow]]:
    """Read a manifest (``.jsonl`` / ``.csv``) or catalogue folder: ``(name, rows, rows that failed to parse)``."""
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"manifest not found: {path}")
    if path.is_dir():
        for name in MANIFEST_NAMES:
            if (path / name).is_file():
                return read_rows(path / name)
        return str(path), *_read_folder_layout(path)
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            return str(path), *_read_jsonl(path)
        if path.suffix.lower() in (".csv", ".tsv"):
            return str(path), *_read_csv(path)
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    raise InvalidInputError(f"{path}: unknown manifest type (expected .jsonl, .csv or a folder)")


# ----------------------------------------------------------------------------- preparing samples


def _read_file(ref: FileRef | None, role: str) -> bytes:
    if ref is None:
        raise InvalidInputError(f"missing field '{role}'")
    try:
        with open(ref.path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise MissingFileError(f"{role} file not found: {ref.shown}") from None
    except OSError as error:
        raise InvalidInputError(f"{role} file {ref.shown}: cannot read ({error.strerror})") from None


def _format_and_mode(data: bytes) -> tuple[str | None, str | None]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format, image.mode
    except Exception:  # load_image reports why; here we only want the header
        return None, None


def _fitted(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _store_image(
    data: bytes, image: Image.Image, options: EncodeOptions, role: str, changes: list[str]
) -> tuple[bytes, str]:
    """Original bytes when allowed, else the upright (resized) image as JPEG."""
    fmt, _ = _format_and_mode(data)
    size = _fitted(image.size, options.max_side)
    if not options.reencode and size == image.size and fmt in KEPT_FORMATS:
        return data, KEPT_FORMATS[fmt]
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
        changes.append(f"{role} resized")
    changes.append(f"{role} re-encoded")
    return _encode(image, "JPEG", options.jpeg_quality), "jpg"


def _store_mask(
    data: bytes, mask: np.ndarray, size: tuple[int, int], changes: list[str]
) -> tuple[bytes, np.ndarray]:
    """Original bytes when they already are an 8-bit PNG with 255 = product, else a converted PNG."""
    if size != (mask.shape[1], mask.shape[0]):
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.BOX))
        changes.append("mask resized")
        return _encode(Image.fromarray(mask, mode="L"), "PNG", 0), mask
    fmt, mode = _format_and_mode(data)
    if fmt == "PNG" and mode in MASK_MODES:
        with Image.open(io.BytesIO(data)) as image:
            raw = np.asarray(image.convert("L"))
        if raw.shape == mask.shape and np.array_equal(raw, mask):
            return data, mask
    changes.append("mask converted")
    return _encode(Image.fromarray(mask, mode="L"), "PNG", 0), mask


def _prepare(row: ManifestRow, options: EncodeOptions) -> tuple[EncodedSample, tuple[str, ...]]:
    check_key(row.key)
    meta = dict(row.meta)
    for name, ref in row.prompt_files.items():
        meta[name] = _read_file(ref, f"{name} text").decode("utf-8", "replace").strip()
    problems = meta_problems(meta)
    if problems:
        raise InvalidInputError("; ".join(problems))
    files = row.files
    photo_bytes = _read_file(files["photo"], "photo")
    mask_bytes = _read_file(files["mask"], "mask")
    reference_bytes = _read_file(files["reference"], "reference")
    photo = load_image(photo_bytes, f"photo {files['photo'].shown}")  # type: ignore[union-attr]
    mask = load_mask(mask_bytes, f"mask {files['mask'].shown}")  # type: ignore[union-attr]
    size_problem = mask_size_problem(mask, photo)
    if size_problem:
        raise InvalidInputError(size_problem)
    reference = load_image(reference_bytes, f"reference {files['reference'].shown}")  # type: ignore[union-attr]
    changes: list[str] = []
    photo_data, photo_ext = _store_image(photo_bytes, photo, options, "photo", changes)
    mask_data, stored_mask = _store_mask(mask_bytes, mask, _fitted(photo.size, options.max_side), changes)
    problems = mask_problems(stored_mask)
    if problems:
        raise InvalidInputError("; ".join(problems))
    reference_data, reference_ext = _store_image(reference_bytes, reference, options, "reference", changes)
    sample = EncodedSample(row.key, photo_data, photo_ext, mask_data, reference_data, reference_ext, meta)
    return sample, tuple(changes)


def prepare_row(row: ManifestRow, options: EncodeOptions) -> PreparedRow:
    """Read, check and encode one row; never raises for a bad row (the error is returned)."""
    try:
        sample, changes = _prepare(row, options)
    except DreamPainterError as error:
        return PreparedRow(row, None, str(error))
    except Exception as error:  # an unexpected decoder failure must not stop a long job
        return PreparedRow(row, None, f"unexpected {type(error).__name__}: {error}")
    return PreparedRow(row, sample, None, changes)
