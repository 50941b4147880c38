"""Toy DreamEcom: procedural product photos with known backgrounds, for CPU training and tests.

A sample is a product (bottle, box, can, jar, sphere or shoe) standing on a textured floor or
table (wood, marble, fabric, plain) in front of a painted wall, lit from one side, with the cast
shadow the light implies and a reflection on glossy surfaces. It comes with the product mask, the
same scene without the product (the reference, as in DreamEcom) and prompts in English and Chinese
that name the product, its colour, the floor's colour and material, the wall colour and the light.

``meta`` holds, besides ``prompt``, ``prompt_zh``, ``category`` and ``source="toy"``, the scene
parameters evaluation can score against: ``product_colour``/``product_rgb``, ``floor_colour``/
``floor_rgb``, ``wall_colour``/``wall_rgb`` (palette names from :data:`toy_vocab.PALETTE` and the
jittered RGB actually painted), ``material``, ``glossy``, ``surface``, ``light``, ``light_tint``,
``horizon`` (y of the wall/floor line, pixels), ``bbox`` (``[x0, y0, x1, y1]`` of the product mask,
``x1``/``y1`` exclusive) and ``resolution``.

Every sample is a pure function of its seed, so datasets are byte-identical for the same
``(num, seed, resolution)`` whatever the number of worker processes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreampainter.data.shards.format import EncodedSample, ShardIndex
from dreampainter.errors import InvalidInputError
from dreampainter.toy.product import FAMILY_ASPECT, build_product, render_product, silhouette
from dreampainter.toy.scene import Scene, first_row_below, pixel_grid, render_background
from dreampainter.toy.vocab import LIGHT_TINTS, LIGHTS, MATERIAL_GLOSSY, MATERIALS, PALETTE, make_prompts

GENERATOR_VERSION = 1
DEFAULT_SPLITS: dict[str, float] = {"train": 0.9, "val": 0.05, "bench": 0.05}
MIN_RESOLUTION = 16


@dataclass
class ToySample:
    """One toy sample as arrays: ``photo`` and ``reference`` (H, W, 3) uint8, ``mask`` (H, W) uint8
    (255 = product). ``shadow`` and ``reflection`` (H, W) uint8 mark (255) the background pixels
    the product's shadow and reflection touch; they are not stored in shards but let tests and
    metrics tell product, effects and untouched background apart."""

    photo: np.ndarray
    mask: np.ndarray
    reference: np.ndarray
    shadow: np.ndarray
    reflection: np.ndarray
    meta: dict[str, Any]

    @property
    def effects(self) -> np.ndarray:
        """Where the product changed the background: shadow or reflection (255)."""
        return np.maximum(self.shadow, self.reflection)


def _as_rng(rng_or_seed: np.random.Generator | np.random.SeedSequence | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (np.random.SeedSequence, int, np.integer)) and not isinstance(
        rng_or_seed, bool
    ):
        return np.random.default_rng(rng_or_seed)
    raise InvalidInputError(
        f"rng_or_seed: expected a numpy Generator, SeedSequence or int, got {type(rng_or_seed).__name__}"
    )


def _pick_colours(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` different palette names."""
    names = list(PALETTE)
    return [names[i] for i in rng.choice(len(names), size=count, replace=False)]


def _jittered(rng: np.random.Generator, name: str) -> np.ndarray:
    rgb = np.asarray(PALETTE[name].rgb) + rng.uniform(-8, 8, size=3)
    return np.clip(np.round(rgb), 0, 255)


def _light_vector(rng: np.random.Generator, name: str) -> np.ndarray:
    vector = np.asarray(LIGHTS[name][0], dtype=np.float64) + rng.normal(0, 0.06, size=3)
    return vector / np.linalg.norm(vector)


def _sample_scene(rng: np.random.Generator, res: int, floor_colour: str, wall_colour: str) -> Scene:
    material = MATERIALS[int(rng.integers(len(MATERIALS)))]
    glossy = MATERIAL_GLOSSY[material]
    if glossy is None:
        glossy = bool(rng.random() < 0.5)
    table = rng.random() < 0.5
    light = list(LIGHTS)[int(rng.integers(len(LIGHTS)))]
    tint = list(LIGHT_TINTS)[int(rng.integers(len(LIGHT_TINTS)))]
    return Scene(
        resolution=res,
        horizon=float(rng.uniform(0.28, 0.55) * res),
        edge=float(res - rng.uniform(0.07, 0.14) * res) if table else float(res),
        floor_rgb=_jittered(rng, floor_colour),
        wall_rgb=_jittered(rng, wall_colour),
        material=material,
        glossy=glossy,
        light=_light_vector(rng, light),
        tint=np.asarray(LIGHT_TINTS[tint][0]),
        surface="table" if table else "floor",
        light_name=light,
        tint_name=tint,
    )


def _place_product(rng: np.random.Generator, scene: Scene, family: str) -> tuple[float, float, float, float]:
    """(centre x, base y, width, height): on the surface, fully inside the frame with a margin."""
    res = scene.resolution
    margin = max(2.0, 0.04 * res)
    low = scene.horizon + 0.12 * res
    high = min(scene.edge - 0.02 * res, res - margin)
    base = float(rng.uniform(low, high))
    aspect = float(rng.uniform(*FAMILY_ASPECT[family]))
    height = float(rng.uniform(0.25, 0.7) * res)
    width = aspect * height
    shrink = min(1.0, (res - 2 * margin) * 0.9 / width, (base - margin) / height)
    width, height = width * shrink, height * shrink
    cx = float(rng.uniform(margin + width / 2, res - margin - width / 2))
    return cx, base, width, height


def _shadow(scene: Scene, sil, cx: float, base: float, width: float, height: float, x, y) -> np.ndarray:
    """Darkening in [0, 1): the silhouette cast along the light onto the floor, plus contact shade."""
    res = scene.resolution
    lx, ly, lz = (float(c) for c in scene.light)
    ly = max(ly, 0.2)
    shear = float(np.clip(-lx / ly, -1.3, 1.3))  # sideways run per unit of product height
    rise = float(np.clip(lz / ly * 0.35, -0.7, 0.8))  # foreshortened run into (+) or out of the scene
    if abs(rise) < 0.08:
        rise = 0.08
    rows = slice(first_row_below(scene.horizon), first_row_below(scene.edge))
    x, y = x[rows], y[rows]
    lift = (base - y) / rise  # height on the product that casts onto this floor pixel
    sdf = sil(x - shear * lift, base - lift)
    softness = max(1.0, 0.015 * res) + 0.08 * np.abs(lift)
    cast = np.clip(0.5 - sdf / softness, 0, 1) * (lift >= 0) * np.clip(1 - 0.5 * lift / height, 0, 1)
    radial = np.hypot((x - cx) / (0.55 * width), (y - base) / max(0.06 * height, 1.0))
    contact = np.clip(1 - radial, 0, 1) ** 1.5
    shade = np.zeros((res, res))
    shade[rows] = np.maximum(0.45 * cast, 0.5 * contact)
    return shade


def _window(res: int, cx: float, base: float, width: float, height: float) -> tuple[slice, slice]:
    """Pixel rows/columns that can hold product coverage (its box plus a pixel of antialiasing)."""
    x0, x1 = int(np.floor(cx - width / 2 - 2)), int(np.ceil(cx + width / 2 + 2))
    y0, y1 = int(np.floor(base - height - 2)), int(np.ceil(base + 2))
    return slice(max(y0, 0), min(y1, res)), slice(max(x0, 0), min(x1, res))


def make_toy_sample(
    rng_or_seed: np.random.Generator | np.random.SeedSequence | int, resolution: int = 128
) -> ToySample:
    """Draw one toy sample (scene, product, shadow, reflection, prompts) from ``rng_or_seed``."""
    if not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION:
        raise InvalidInputError(f"resolution: must be an integer >= {MIN_RESOLUTION}, got {resolution!r}")
    rng = _as_rng(rng_or_seed)
    res = int(resolution)
    product_colour, floor_colour, wall_colour = _pick_colours(rng, 3)
    scene = _sample_scene(rng, res, floor_colour, wall_colour)
    family = list(FAMILY_ASPECT)[int(rng.integers(len(FAMILY_ASPECT)))]
    cx, base, width, height = _place_product(rng, scene, family)
    product_rgb = _jittered(rng, product_colour)
    parts = build_product(family, rng, cx, base, width, height, product_rgb, scene.light)

    background = render_background(scene, rng)
    x, y = pixel_grid(res)
    rows, cols = _window(res, cx, base, width, height)
    colour = np.zeros((res, res, 3))
    coverage = np.zeros((res, res))
    colour[rows, cols], coverage[rows, cols] = render_product(parts, x[rows, cols], y[rows, cols])
    colour *= scene.tint

    # Reflection: the product mirrored about its base line, fading with distance, on glossy floors.
    photo = background.copy()
    reflect = np.zeros((res, res))
    if scene.glossy:
        strength = float(rng.uniform(0.2, 0.45))
        source = np.floor(2 * base - y[:, 0]).astype(np.int64)
        valid = (y[:, 0] > base) & (source >= 0)
        source = np.clip(source, 0, res - 1)
        fade = np.clip(1 - (y[:, 0] - base) / (0.5 * height), 0, 1) * valid * strength
        reflect = coverage[source] * fade[:, None] * scene.floor_region(y)
        mirrored = colour[source] * (fade[:, None] * scene.floor_region(y))[..., None]
        photo = photo * (1 - reflect[..., None]) + mirrored
    shadow = _shadow(scene, silhouette(parts), cx, base, width, height, x, y)
    photo = photo * (1 - shadow[..., None])
    photo = photo * (1 - coverage[..., None]) + colour

    mask = np.where(coverage > 0, 255, 0).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    meta: dict[str, Any] = {
        "category": family,
        "source": "toy",
        "product_colour": product_colour,
        "product_rgb": [int(c) for c in product_rgb],
        "floor_colour": floor_colour,
        "floor_rgb": [int(c) for c in scene.floor_rgb],
        "wall_colour": wall_colour,
        "wall_rgb": [int(c) for c in scene.wall_rgb],
        "material": scene.material,
        "glossy": scene.glossy,
        "surface": scene.surface,
        "light": scene.light_name,
        "light_tint": scene.tint_name,
        "horizon": round(scene.horizon, 2),
        "bbox": bbox,
        "resolution": res,
        "generator_version": GENERATOR_VERSION,
    }
    meta["prompt"], meta["prompt_zh"] = make_prompts(meta, rng)
    return ToySample(
        photo=_to_uint8(photo),
        mask=mask,
        reference=_to_uint8(background),
        shadow=np.where(shadow > 0, 255, 0).astype(np.uint8),
        reflection=np.where(reflect > 0, 255, 0).astype(np.uint8),
        meta=meta,
    )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _encode(array: np.ndarray, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def encode_toy_sample(
    sample: ToySample, key: str, image_format: str = "jpg", quality: int = 95
) -> EncodedSample:
    """Encode photo and reference as JPEG (``quality``) or PNG, and the mask as PNG."""
    if image_format not in ("jpg", "png"):
        raise InvalidInputError(f"image_format: must be 'jpg' or 'png', got {image_format!r}")
    return EncodedSample(
        key=key,
        photo=_encode(sample.photo, image_format, quality),
        photo_ext=image_format,
        mask=_encode(sample.mask, "png", quality),
        reference=_encode(sample.reference, image_format, quality),
        reference_ext=image_format,
        meta=sample.meta,
    )


def sample_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of sample ``index`` of ``split``: independent streams per split, so splits are
    disjoint and a split's first samples do not change when ``num`` grows."""
    return np.random.SeedSequence(seed, spawn_key=(zlib.crc32(split.encode("utf-8")), index))


def split_counts(num: int, splits: dict[str, float]) -> dict[str, int]:
    """Share ``num`` samples by the ``splits`` fractions (largest remainder), at least one each."""
    if not splits or any(not isinstance(f, (int, float)) or f <= 0 for f in splits.values()):
        raise InvalidInputError(f"splits: must map split names to positive fractions, got {splits!r}")
    if num < len(splits):
        raise InvalidInputError(f"num: {num} samples cannot fill {len(splits)} splits ({', '.join(splits)})")
    total = float(sum(splits.values()))
    exact = {name: num * fraction / total for name, fraction in splits.items()}
    counts = {name: int(np.floor(value)) for name, value in exact.items()}
    by_remainder = sorted(splits, key=lambda name: (counts[name] - exact[name], list(splits).index(name)))
    for name in by_remainder[: num - sum(counts.values())]:
        counts[name] += 1
    for name in splits:  # every split gets a sample, taken from the largest
        if counts[name] == 0:
            counts[max(counts, key=counts.__getitem__)] -= 1
            counts[name] = 1
    return counts


def _toy_job(job: tuple[int, str, int, int, str, int]) -> EncodedSample:
    seed, split, index, resolution, image_format, quality = job
    sample = make_toy_sample(sample_seed(seed, split, index), resolution)
    return encode_toy_sample(sample, f"toy{seed}_{split}_{index:07d}", image_format, quality)


def write_toy_dataset(
    out_dir: str | os.PathLike,
    num: int,
    seed: int,
    resolution: int = 128,
    workers: int = 1,
    splits: dict[str, float] | None = None,
    samples_per_shard: int = 1000,
    progress: bool = True,
    image_format: str = "jpg",
    quality: int = 95,
    overwrite: bool = False,
) -> dict[str, ShardIndex]:
    """Write ``num`` toy samples as shard sets ``out_dir/<split>/`` (default 90/5/5 % train/val/bench).

    Same ``(num, seed, resolution)`` -> byte-identical shards, whatever ``workers``. Sample ``i`` of
    a split depends only on ``(seed, split, i)``, so splits are disjoint and growing ``num`` keeps
    the earlier samples. ``workers > 1`` starts spawned processes (a script calling this must guard
    its entry point with ``if __name__ == "__main__":``). ``image_format`` ("jpg" or "png") applies to
    photo and reference; the mask is always PNG.
    """
    from dreampainter.data.shards.writer import write_shards

    if not isinstance(num, int) or num < 1:
        raise InvalidInputError(f"num: must be a positive integer, got {num!r}")
    if not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed: must be a non-negative integer, got {seed!r}")
    if not isinstance(workers, int) or workers < 1:
        raise InvalidInputError(f"workers: must be a positive integer, got {workers!r}")
    if image_format not in ("jpg", "png"):
        raise InvalidInputError(f"image_format: must be 'jpg' or 'png', got {image_format!r}")
    if not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise InvalidInputError(f"resolution: must be an integer >= {MIN_RESOLUTION}, got {resolution!r}")
    counts = split_counts(num, dict(DEFAULT_SPLITS if splits is None else splits))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    indexes: dict[str, ShardIndex] = {}
    try:
        for split, count in counts.items():
            jobs = [(seed, split, i, resolution, image_format, quality) for i in range(count)]
            chunksize = max(1, min(32, count // (workers * 4)))
            samples = pool.imap(_toy_job, jobs, chunksize=chunksize) if pool else map(_toy_job, jobs)
            meta = {
                "source": "toy",
                "split": split,
                "seed": seed,
                "resolution": resolution,
                "image_format": image_format,
                "generator_version": GENERATOR_VERSION,
            }
            indexes[split] = write_shards(
                samples,
                Path(out_dir) / split,
                max_samples_per_shard=samples_per_shard,
                prefix=f"toy-{split}",
                progress=progress,
                total=count,
                meta=meta,
                overwrite=overwrite,
            )
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return indexes
