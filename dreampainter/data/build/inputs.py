"""What ``data build`` reads: a folder of photos, a JSONL/CSV manifest, or existing shards.

* **Folder**: ``manifest.jsonl`` / ``manifest.csv`` inside it is used when present; otherwise the
  photos are the image files of ``photos/`` (or of the folder itself), in file-name order, with
  optional ``masks/<name>.*``, ``refs/<name>.*``, ``prompts.jsonl`` (``{"key": name, ...}``) or
  ``prompts/<name>.txt`` and ``prompts/<name>.zh.txt``. The key is ``<name>`` with dots and spaces
  replaced by ``_``.
* **Manifest** (``.jsonl`` / ``.csv``): ``photo`` is required; ``mask``, ``reference`` (paths relative
  to the manifest), ``key`` (default: the row number as 8 digits) are optional; every other field goes
  into the sample's JSON (``prompt``, ``prompt_zh``, ``category``, ...).
* **Shards** (a folder with ``index.json`` or ``*.tar`` files, or one ``.tar``): every sample's
  photo, mask, reference and JSON record become the ``given`` inputs.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreampainter.data.shards.format import (
    INDEX_FILENAME,
    MASK_EXTENSION,
    META_EXTENSION,
    ShardIndex,
    check_key,
    find_photo_suffix,
    find_reference_suffix,
    parse_meta,
)
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.errors import InvalidInputError, MissingFileError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass
class BuildInput:
    """One input photo: files (paths, or ``shard`` + key) and the record fields given with it."""

    key: str
    location: str
    photo: str | None = None
    mask: str | None = None
    reference: str | None = None
    shard: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _key_of(name: str) -> str:
    return "".join("_" if char == "." or char.isspace() else char for char in name)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                if path.stem in found:
                    raise InvalidInputError(f"{path}: two files for {path.stem} ({found[path.stem].name})")
                found[path.stem] = path
    return found


def _read_folder(root: Path) -> list[BuildInput]:
    photos_dir = root / "photos" if (root / "photos").is_dir() else root
    masks, refs = _images_by_stem(root / "masks"), _images_by_stem(root / "refs")
    records: dict[str, dict[str, Any]] = {}
    if (root / "prompts.jsonl").is_file():
        for number, line in enumerate((root / "prompts.jsonl").read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    records[str(record.pop("key"))] = record
                except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                    raise InvalidInputError(f"{root / 'prompts.jsonl'}:{number}: expected a JSON object with a 'key'") from None
    items = []
    for stem, photo in _images_by_stem(photos_dir).items():
        meta = dict(records.get(stem, {}))
        for field_name, suffix in (("prompt", ".txt"), ("prompt_zh", ".zh.txt")):
            text = root / "prompts" / f"{stem}{suffix}"
            if field_name not in meta and text.is_file():
                meta[field_name] = text.read_text(encoding="utf-8-sig").strip()
        mask, ref = masks.get(stem), refs.get(stem)
        items.append(BuildInput(_key_of(stem), str(photo.relative_to(root)), str(photo),
                                str(mask) if mask else None, str(ref) if ref else None, meta=meta))  # fmt: skip
    return items


def _manifest_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if "photo" not in (reader.fieldnames or []):
                raise InvalidInputError(f"{path}: missing column 'photo'")
            line = reader.line_num + 1
            for fields in reader:
                fields.pop(None, None)
                yield line, {name: value for name, value in fields.items() if value not in (None, "")}
                line = reader.line_num + 1
        return
    with open(path, encoding="utf-8-sig") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidInputError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(fields, dict):
                raise InvalidInputError(f"{path}:{number}: expected a JSON object")
            yield number, {name: value for name, value in fields.items() if value is not None}


def _read_manifest(path: Path) -> list[BuildInput]:
    items = []
    for row, fields in _manifest_rows(path):
        if "photo" not in fields:
            raise InvalidInputError(f"{path.name}:{row}: missing field 'photo'")
        files = {name: str(path.parent / str(fields.pop(name))) if name in fields else None
                 for name in ("photo", "mask", "reference")}  # fmt: skip
        key = str(fields.pop("key", f"{row:08d}"))
        items.append(BuildInput(key, f"{path.name}:{row}", files["photo"], files["mask"], files["reference"], meta=fields))
    return items


def _read_shards(paths: list[Path]) -> list[BuildInput]:
    items = []
    for path in paths:
        for key, members in iter_tar_samples(str(path), name=path.name):
            meta = parse_meta(key, members[META_EXTENSION]) if META_EXTENSION in members else {}
            items.append(BuildInput(key, f"{path.name}:{key}", shard=str(path), meta=meta))
    return items


def read_inputs(source: str | os.PathLike) -> list[BuildInput]:
    """Every input of a folder, manifest or shard set, in a fixed order; keys checked and unique."""
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"input not found: {path}")
    if path.is_file() and path.suffix.lower() == ".tar":
        items = _read_shards([path])
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        items = _read_manifest(path)
    elif path.is_file():
        raise InvalidInputError(f"{path}: unknown input type (expected a folder, .jsonl, .csv or .tar)")
    elif (path / INDEX_FILENAME).is_file():
        items = _read_shards([path / shard.name for shard in ShardIndex.load(path).shards])
    elif any(path.glob("*.tar")):
        items = _read_shards(sorted(path.glob("*.tar")))
    elif (path / "manifest.jsonl").is_file() or (path / "manifest.csv").is_file():
        name = "manifest.jsonl" if (path / "manifest.jsonl").is_file() else "manifest.csv"
        items = _read_manifest(path / name)
    else:
        items = _read_folder(path)
    if not items:
        raise InvalidInputError(f"{path}: no photos found (see docs/data_building.md for the input layouts)")
    seen: dict[str, str] = {}
    for item in items:
        try:
            check_key(item.key)
        except InvalidInputError as error:
            raise InvalidInputError(f"{item.location}: {error}") from None
        if item.key in seen:
            raise InvalidInputError(f"{item.location}: duplicate key {item.key!r} (also {seen[item.key]})")
        seen[item.key] = item.location
    return items


def read_files(items: list[BuildInput]) -> dict[str, dict[str, bytes | None]]:
    """``key -> {"photo", "mask", "reference": bytes or None}`` for a chunk of inputs (one pass per shard)."""
    wanted: dict[str, set[str]] = {}
    found: dict[str, dict[str, bytes | None]] = {}
    for item in items:
        if item.shard is not None:
            wanted.setdefault(item.shard, set()).add(item.key)
            continue
        files: dict[str, bytes | None] = {}
        for role in ("photo", "mask", "reference"):
            name = getattr(item, role)
            files[role] = Path(name).read_bytes() if name and Path(name).is_file() else None
        found[item.key] = files
    for shard, keys in wanted.items():
        for key, members in iter_tar_samples(shard, name=Path(shard).name):
            if key in keys:
                photo, reference = find_photo_suffix(members), find_reference_suffix(members)
                found[key] = {
                    "photo": members[photo] if photo else None,
                    "mask": members.get(MASK_EXTENSION),
                    "reference": members[reference] if reference else None,
                }
    return found
