"""The DreamEcom shard format: member names, the sample record and the shard-set index.

A shard is a plain tar file (WebDataset layout). One sample is a group of members sharing a key:

=====================  ============================================================
``<key>.jpg|png|webp``  the product photo (RGB)
``<key>.mask.png``      the product mask: 8-bit, 255 = product, same size as the photo
``<key>.ref.jpg|...``   the background reference image (any size)
``<key>.json``          ``{"prompt": str, "prompt_zh": str?, "category": str?, ...}``
=====================  ============================================================

Beside the shards, ``index.json`` lists every shard with its sample count, size and sha256, so that
epoch length and resume positions are exact (see ``docs/data_format.md``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.utils import atomic_write_json

INDEX_FILENAME = "index.json"
INDEX_FORMAT = "dreamecom-shards"
INDEX_VERSION = 1

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PHOTO_EXTENSIONS = IMAGE_EXTENSIONS
MASK_EXTENSION = "mask.png"
REFERENCE_EXTENSIONS = tuple(f"ref.{ext}" for ext in IMAGE_EXTENSIONS)
META_EXTENSION = "json"


@dataclass
class EncodedSample:
    """One sample as encoded bytes, ready to be written to a shard.

    ``photo_ext`` / ``reference_ext`` are bare image extensions (``"jpg"``, ``"png"``, ``"webp"``);
    the reference member is written as ``<key>.ref.<reference_ext>``.
    """

    key: str
    photo: bytes
    photo_ext: str
    mask: bytes
    reference: bytes
    reference_ext: str
    meta: dict[str, Any]

    def members(self) -> dict[str, bytes]:
        """Member suffix -> bytes, in the order they are written to the tar."""
        return {
            self.photo_ext: self.photo,
            MASK_EXTENSION: self.mask,
            f"ref.{self.reference_ext}": self.reference,
            META_EXTENSION: json.dumps(self.meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        }

    @classmethod
    def from_members(cls, key: str, members: Mapping[str, bytes]) -> EncodedSample:
        """Rebuild a sample from a shard's ``{suffix: bytes}`` group (see :func:`sample_member_problems`)."""
        problems = sample_member_problems(key, members)
        if problems:
            raise InvalidInputError(f"sample {key}: " + "; ".join(problems))
        photo_ext = find_photo_suffix(members)
        reference_suffix = find_reference_suffix(members)
        assert photo_ext is not None and reference_suffix is not None
        return cls(
            key=key,
            photo=members[photo_ext],
            photo_ext=photo_ext,
            mask=members[MASK_EXTENSION],
            reference=members[reference_suffix],
            reference_ext=reference_suffix[len("ref.") :],
            meta=parse_meta(key, members[META_EXTENSION]),
        )


def check_key(key: str) -> None:
    """Raise :class:`InvalidInputError` unless ``key`` names a sample's members unambiguously.

    Keys may contain ``/`` (WebDataset allows folders) but no dots, since the key ends at the first dot.
    """
    if not isinstance(key, str) or not key:
        raise InvalidInputError(f"sample key {key!r}: must be a non-empty string")
    if "." in key or "\\" in key or any(ord(char) < 32 for char in key):
        raise InvalidInputError(f"sample key {key!r}: must not contain dots, backslashes or control characters")
    if key.startswith("/") or key.endswith("/") or "//" in key:
        raise InvalidInputError(f"sample key {key!r}: must be a relative path without empty parts")


def find_photo_suffix(members: Mapping[str, bytes]) -> str | None:
    """The suffix of the photo member (``jpg``, ``png``, ...) or None; the first by extension order."""
    return next((ext for ext in PHOTO_EXTENSIONS if ext in members), None)


def find_reference_suffix(members: Mapping[str, bytes]) -> str | None:
    """The suffix of the reference member (``ref.jpg``, ...) or None."""
    return next((ext for ext in REFERENCE_EXTENSIONS if ext in members), None)


def sample_member_problems(key: str, members: Mapping[str, bytes]) -> list[str]:
    """What is missing or ambiguous in a sample's members (empty when the sample is complete)."""
    problems = []
    photos = [ext for ext in PHOTO_EXTENSIONS if ext in members]
    references = [ext for ext in REFERENCE_EXTENSIONS if ext in members]
    if not photos:
        problems.append(f"missing member {key}.jpg|png|webp (the photo)")
    elif len(photos) > 1:
        problems.append(f"several photo members: {', '.join(f'{key}.{ext}' for ext in photos)}")
    if MASK_EXTENSION not in members:
        problems.append(f"missing member {key}.{MASK_EXTENSION} (the product mask)")
    if not references:
        problems.append(f"missing member {key}.ref.jpg|png|webp (the reference)")
    elif len(references) > 1:
        problems.append(f"several reference members: {', '.join(f'{key}.{ext}' for ext in references)}")
    if META_EXTENSION not in members:
        problems.append(f"missing member {key}.{META_EXTENSION} (the prompt record)")
    return problems


def parse_meta(key: str, data: bytes) -> dict[str, Any]:
    """Decode a ``<key>.json`` member to a dict; raises :class:`InvalidInputError` when it is not one."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{key}.{META_EXTENSION}: invalid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise InvalidInputError(f"{key}.{META_EXTENSION}: expected a JSON object, got {type(meta).__name__}")
    return meta


@dataclass
class ShardInfo:
    """One shard of a shard set, as listed in ``index.json``."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass
class ShardIndex:
    """The index of a shard set: shard names (relative to the index), counts and checksums."""

    shards: list[ShardInfo] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "num_samples": self.num_samples,
            "shards": [asdict(shard) for shard in self.shards],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "index.json") -> ShardIndex:
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise InvalidInputError(f"{source}: not a DreamEcom shard index (expected format '{INDEX_FORMAT}')")
        try:
            shards = [ShardInfo(**shard) for shard in data["shards"]]
        except (KeyError, TypeError) as error:
            raise InvalidInputError(f"{source}: malformed shard list ({error})") from None
        return cls(shards=shards, meta=dict(data.get("meta", {})))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file renamed over ``path``."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardIndex:
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_FILENAME
        if not path.exists():
            raise MissingFileError(f"shard index not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{path}: invalid JSON ({error.msg} at line {error.lineno})") from None
        return cls.from_json(data, source=str(path))
