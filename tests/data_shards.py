"""Synthetic DreamEcom shards for the loader tests, written with plain ``tarfile`` (no writer dependency)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from dreampainter.data.shards.format import ShardIndex, ShardInfo


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def make_members(
    key: str,
    seed: int,
    size: tuple[int, int] = (48, 40),
    box: tuple[int, int, int, int] | None = None,
    prompt: str | None = None,
    ref_size: tuple[int, int] = (40, 32),
) -> dict[str, bytes]:
    """One sample's members: a noisy JPEG photo, a PNG product mask (a rectangle), a JPEG reference, JSON."""
    rng = np.random.default_rng(seed)
    width, height = size
    photo = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box or (width // 4, height // 4, width // 2, height // 2)
    mask[y0:y1, x0:x1] = 255
    reference = rng.integers(0, 256, (ref_size[1], ref_size[0], 3), dtype=np.uint8)
    meta = {
        "prompt": prompt if prompt is not None else f"a product {key}",
        "prompt_zh": f"产品 {key}",
        "category": "box",
    }
    return {
        "jpg": encode(photo, "JPEG", quality=95),
        "mask.png": encode(mask, "PNG"),
        "ref.jpg": encode(reference, "JPEG", quality=95),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 0
                archive.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path,
    num_shards: int,
    per_shard: int,
    *,
    sizes: list[tuple[int, int]] | None = None,
    index: bool = True,
    prefix: str = "s",
) -> list[str]:
    """Write ``num_shards`` shards of ``per_shard`` samples (+ index.json); return all keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, infos = [], []
    for shard in range(num_shards):
        samples = []
        for i in range(per_shard):
            n = shard * per_shard + i
            key = f"{prefix}{n:05d}"
            size = sizes[n % len(sizes)] if sizes else (48, 40)
            samples.append((key, make_members(key, n, size=size)))
            keys.append(key)
        name = f"shard-{shard:04d}.tar"
        write_tar(folder / name, samples)
        data = (folder / name).read_bytes()
        infos.append(ShardInfo(name, per_shard, len(data), hashlib.sha256(data).hexdigest()))
    if index:
        ShardIndex(infos).save(folder / "index.json")
    return keys
