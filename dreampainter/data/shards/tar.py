"""The one tar reader of shards (validator, index, loader, benchmarks, validation grids) and the
deterministic tar writer.

Reading groups members into samples exactly as WebDataset does (``base_plus_ext`` and
``group_by_keys``): the key is the member path up to the first dot of its base name, the suffix is
the rest, lower-cased (``a/0001.ref.JPG`` -> key ``a/0001``, suffix ``ref.jpg``); consecutive members
with the same key form one sample; names starting with ``__`` and names whose base name has no dot
belong to no sample. Unlike :mod:`tarfile`, the reader treats a missing end-of-archive marker as
truncation instead of a clean end, and a corrupt header as an error instead of the end of the
archive, so a shard cut short, even at a member boundary, is reported rather than silently read as
complete. What each caller does about it is its own choice: the validator reports the shard, the
loader keeps the samples read before the damage and counts a skip.

It understands ustar, GNU (``tar`` long names, base-256 sizes) and pax (``ShardWriter``/Python)
headers; links, directories and device entries are skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from dreampainter.errors import InvalidInputError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_ZERO_BLOCK = b"\0" * BLOCK
_REGULAR_TYPES = {b"0", b"\0", b"7"}
_SKIPPED_TYPES = {b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"K", b"D", b"V"}
# webdataset.tariterators.base_plus_ext: (path up to the first dot of the base name, the rest).
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class TarFormatError(InvalidInputError):
    """A tar file is malformed. ``pending_key`` names the sample that was being read, if any."""

    def __init__(self, message: str, pending_key: str | None = None):
        super().__init__(message)
        self.pending_key = pending_key


class TruncatedTarError(TarFormatError):
    """A tar file ends early: inside a header, inside member data, or without its end marker."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/0001.ref.JPG"`` -> ``("dir/0001", "ref.jpg")``; None for a member outside any sample.

    WebDataset's rules, to the character: the key is ``base_plus_ext``'s prefix (a leading ``./``
    stays in it), the suffix is lower-cased, and names starting with ``__`` (``__meta__``, ...) or
    whose base name has no dot are not sample members.
    """
    if name.startswith("__"):
        return None
    match = _MEMBER_NAME.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def _read_exact(fileobj: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of file (pipes and sockets may return short reads)."""
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = fileobj.read(min(remaining, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit of the first byte is set."""
    if field and field[0] & 0x80:
        value = field[0] & 0x7F
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum (its bytes summed, the checksum field counted as 8 spaces) matches."""
    field = header[148:156]
    try:
        stored = _number(field)
    except ValueError:
        return False
    unsigned = sum(header) - sum(field) + 8 * ord(" ")
    if stored == unsigned:
        return True
    # Some old writers summed signed bytes.
    return stored == unsigned - 256 * sum(1 for byte in header if byte > 127) + 256 * sum(
        1 for byte in field if byte > 127
    )


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        keyword, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[keyword.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _label(source: str | os.PathLike | BinaryIO, name: str | None) -> str:
    """What error messages call the tar: ``name``, else the file's name."""
    return name or str(getattr(source, "name", None) or "tar stream")


def iter_tar_members(
    source: str | os.PathLike | BinaryIO, *, name: str | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, bytes)`` for each regular file of a tar, in archive order.

    Raises :class:`TruncatedTarError` when the archive ends early (including a missing end-of-archive
    marker) and :class:`TarFormatError` for a corrupt header. ``name`` is used in error messages.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fileobj:
            yield from iter_tar_members(fileobj, name=name or os.fspath(source))
        return
    label = _label(source, name)
    offset = 0
    count = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(source, BLOCK)
        if len(header) < BLOCK:
            where = "ends without its end-of-archive marker" if not header else "ends inside a header"
            raise TruncatedTarError(
                f"{label}: truncated tar: {where} at byte {offset + len(header)} (after {count} members)"
            )
        if header == _ZERO_BLOCK:
            return
        if not _checksum_ok(header):
            raise TarFormatError(f"{label}: corrupt tar header at byte {offset} (checksum mismatch)")
        typeflag = header[156:157]
        try:
            size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        except ValueError:
            raise TarFormatError(f"{label}: corrupt tar header at byte {offset} (bad size field)") from None
        member_name = long_name or pax.get("path")
        if member_name is None:
            member_name = _text(header[0:100])
            prefix = _text(header[345:500]) if header[257:263] == b"ustar\0" else ""
            if prefix:
                member_name = f"{prefix}/{member_name}"
        offset += BLOCK
        if typeflag == b"S" or typeflag == b"M":
            raise TarFormatError(f"{label}: unsupported tar member type {typeflag!r} for {member_name}")
        data = _read_exact(source, size)
        padding = -size % BLOCK
        pad = _read_exact(source, padding) if padding else b""
        if len(data) < size or len(pad) < padding:
            raise TruncatedTarError(
                f"{label}: truncated tar: member {member_name} declares {size} bytes, only {len(data)} present"
            )
        offset += size + padding
        if typeflag == b"x":
            try:
                pax = _pax_records(data)
            except (ValueError, UnicodeDecodeError):
                raise TarFormatError(f"{label}: corrupt pax header for member at byte {offset}") from None
            continue
        if typeflag == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        long_name, pax = None, {}
        if typeflag in _REGULAR_TYPES:
            count += 1
            yield member_name, data
        elif typeflag not in _SKIPPED_TYPES:
            raise TarFormatError(f"{label}: unknown tar member type {typeflag!r} for {member_name}")


def iter_tar_samples(
    source: str | os.PathLike | BinaryIO, *, name: str | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` per sample, grouping consecutive members by key.

    Members are named as :func:`split_member_name` says (WebDataset's rules); the others are
    ignored. A sample is yielded only once the next key (or the end marker) shows it is complete:
    on truncation or a corrupt header the pending sample is dropped and named in the error's
    ``pending_key``. A suffix appearing twice in one sample is a :class:`TarFormatError` (WebDataset
    refuses it too).
    """
    if isinstance(source, (str, os.PathLike)):
        name = name or os.fspath(source)
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        for member_name, data in iter_tar_members(source, name=name):
            split = split_member_name(member_name)
            if split is None:
                continue
            member_key, suffix = split
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            if suffix in members:
                raise TarFormatError(
                    f"{_label(source, name)}: member {member_name} appears twice in sample {key}"
                )
            members[suffix] = data
    except TarFormatError as error:
        error.pending_key = key
        raise
    if key is not None:
        yield key, members


def member_header(name: str, size: int) -> bytes:
    """A deterministic tar header for a regular file (mtime 0, uid/gid 0, no user names, mode 644)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def member_bytes(name: str, data: bytes) -> bytes:
    """One complete tar member: header, data and zero padding to the block size."""
    return member_header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


class HashingReader:
    """Wrap a binary file: ``read`` passes through while ``sha256`` and ``num_bytes`` follow what was read."""

    def __init__(self, fileobj: BinaryIO):
        self.fileobj = fileobj
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest of the file."""
        while self.read(1 << 20):
            pass
