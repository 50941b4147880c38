"""Toy DreamEcom generator: scene/mask/reference consistency, prompts, determinism, shards, fixture."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy import ndimage

from dreampainter.data.shards.format import ShardIndex
from dreampainter.errors import InvalidInputError
from dreampainter.toy.data import (
    DEFAULT_SPLITS,
    encode_toy_sample,
    make_toy_sample,
    split_counts,
    write_toy_dataset,
)
from dreampainter.toy.vocab import CATEGORIES, LIGHT_TINTS, LIGHTS, MATERIALS, PALETTE, material_word

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "toy"
RES = 48


@pytest.fixture(scope="module")
def samples():
    return [make_toy_sample(seed, RES) for seed in range(240)]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_sample_arrays_and_meta(samples):
    for sample in samples[:20]:
        assert sample.photo.shape == sample.reference.shape == (RES, RES, 3)
        assert sample.mask.shape == sample.shadow.shape == sample.reflection.shape == (RES, RES)
        for array in (sample.photo, sample.reference, sample.mask):
            assert array.dtype == np.uint8
        assert set(np.unique(sample.mask)) <= {0, 255}
        meta = sample.meta
        assert meta["source"] == "toy" and meta["category"] in CATEGORIES and meta["resolution"] == RES
        assert meta["material"] in MATERIALS and meta["light"] in LIGHTS and meta["light_tint"] in LIGHT_TINTS
        for role in ("product", "floor", "wall"):
            name, rgb = meta[f"{role}_colour"], np.array(meta[f"{role}_rgb"])
            assert name in PALETTE and np.abs(rgb - PALETTE[name].rgb).max() <= 8
        assert len({meta["product_colour"], meta["floor_colour"], meta["wall_colour"]}) == 3
        json.dumps(meta)  # plain JSON types only


def test_product_fully_in_frame_and_bbox_matches_mask(samples):
    for sample in samples:
        mask = sample.mask > 0
        assert 0 < mask.mean() < 0.6
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        ys, xs = np.nonzero(mask)
        assert sample.meta["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        # the product stands on the floor: its lowest pixel is below the horizon
        assert ys.max() + 0.5 > sample.meta["horizon"]


def test_photo_differs_from_reference_only_at_product_shadow_and_reflection(samples):
    for sample in samples:
        mask = sample.mask > 0
        differs = (sample.photo != sample.reference).any(axis=-1)
        assert not (differs & ~mask & (sample.effects == 0)).any()
        # the mask is the product itself: (almost) every pixel inside it shows the product
        interior = ndimage.binary_erosion(mask)
        assert differs[interior].mean() > 0.97
        # shadow and reflection lie on the floor, below the horizon
        rows = np.nonzero(sample.effects.any(axis=1))[0]
        assert rows.size == 0 or rows.min() + 0.5 >= sample.meta["horizon"]


def test_shadow_follows_the_light(samples):
    checked = {"left": 0, "right": 0, "back": 0}
    for sample in samples:
        light = sample.meta["light"]
        mask = sample.mask > 0
        shadow = (sample.shadow > 0) & ~mask
        if light not in checked or not shadow.any():
            continue
        ys, xs = np.nonzero(shadow)
        my, mx = np.nonzero(mask)
        if light == "left":  # the shadow falls away from the light
            assert xs.mean() > mx.mean()
        elif light == "right":
            assert xs.mean() < mx.mean()
        else:  # lit from behind: the shadow comes towards the camera, below the product's base
            assert ys.mean() > my.max()
        # and it darkens the floor (where no reflection lightens it)
        dark = shadow & (sample.reflection == 0)
        assert sample.photo[dark].astype(int).sum() < sample.reference[dark].astype(int).sum()
        checked[light] += 1
    assert min(checked.values()) >= 5


def test_reflection_only_on_glossy_floors_and_below_the_product(samples):
    glossy = 0
    for sample in samples:
        reflection = sample.reflection > 0
        assert reflection.any() == sample.meta["glossy"]
        if reflection.any():
            glossy += 1
            x0, _, x1, y1 = sample.meta["bbox"]
            ys, xs = np.nonzero(reflection)
            assert ys.min() >= y1 - 1 and xs.min() >= x0 and xs.max() < x1
    assert glossy >= 30
    assert all(s.meta["glossy"] for s in samples if s.meta["material"] == "marble")
    assert not any(s.meta["glossy"] for s in samples if s.meta["material"] in ("wood", "fabric"))


def test_prompts_name_what_the_meta_says(samples):
    for sample in samples:
        meta = sample.meta
        words = _words(meta["prompt"])
        assert {meta["product_colour"], meta["category"], meta["floor_colour"], meta["wall_colour"]} <= words
        assert material_word(meta["material"], meta["glossy"]) in words
        assert meta["surface"] in words and meta["light_tint"] in words
        assert LIGHTS[meta["light"]][1] in meta["prompt"]
        # no other palette colour is named, so the prompt pins the colours down
        assert words & set(PALETTE) == {meta["product_colour"], meta["floor_colour"], meta["wall_colour"]}
        zh = meta["prompt_zh"]
        for role in ("product", "floor", "wall"):
            assert PALETTE[meta[f"{role}_colour"]].zh in zh
        assert CATEGORIES[meta["category"]] in zh and LIGHTS[meta["light"]][2] in zh
        assert not re.search(r"[a-z]", zh)


def test_scenes_are_diverse(samples):
    metas = [s.meta for s in samples]
    for field, values in (
        ("floor_colour", PALETTE),
        ("wall_colour", PALETTE),
        ("material", MATERIALS),
        ("category", CATEGORIES),
        ("light", LIGHTS),
    ):
        seen = {m[field] for m in metas}
        assert seen == set(values), field
    assert {m["surface"] for m in metas} == {"table", "floor"}
    # placement and scale vary
    boxes = np.array([m["bbox"] for m in metas], dtype=float)
    assert np.std((boxes[:, 0] + boxes[:, 2]) / 2) > RES * 0.1
    assert np.std(boxes[:, 3] - boxes[:, 1]) > RES * 0.05


def test_same_seed_same_sample_and_rng_forms():
    a = make_toy_sample(7, 40)
    b = make_toy_sample(np.random.default_rng(7), 40)
    c = make_toy_sample(8, 40)
    for name in ("photo", "mask", "reference", "shadow", "reflection"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.meta == b.meta
    assert not np.array_equal(a.photo, c.photo)


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(InvalidInputError, match="resolution"):
        make_toy_sample(0, 8)
    with pytest.raises(InvalidInputError, match="rng_or_seed"):
        make_toy_sample("seed")
    with pytest.raises(InvalidInputError, match="num"):
        write_toy_dataset(tmp_path / "x", num=2, seed=0, progress=False)
    with pytest.raises(InvalidInputError, match="splits"):
        write_toy_dataset(tmp_path / "x", num=10, seed=0, splits={"train": 0.0}, progress=False)
    with pytest.raises(InvalidInputError, match="image_format"):
        write_toy_dataset(tmp_path / "x", num=10, seed=0, image_format="gif", progress=False)


def test_split_counts():
    assert split_counts(1000, DEFAULT_SPLITS) == {"train": 900, "val": 50, "bench": 50}
    assert split_counts(6, DEFAULT_SPLITS) == {"train": 4, "val": 1, "bench": 1}
    counts = split_counts(101, {"a": 1, "b": 1, "c": 1})
    assert sum(counts.values()) == 101 and max(counts.values()) - min(counts.values()) <= 1


def test_encoding_round_trip():
    sample = make_toy_sample(3, 40)
    png = encode_toy_sample(sample, "k", image_format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.photo))), sample.photo)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.reference))), sample.reference)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.mask))), sample.mask)
    jpg = encode_toy_sample(sample, "k")
    photo = np.asarray(Image.open(io.BytesIO(jpg.photo))).astype(int)
    assert jpg.photo_ext == "jpg" and np.abs(photo - sample.photo).mean() < 3


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dataset_deterministic_across_runs_and_workers(tmp_path):
    kwargs = dict(num=24, seed=5, resolution=32, samples_per_shard=5, progress=False)
    first = write_toy_dataset(tmp_path / "a", workers=1, **kwargs)
    write_toy_dataset(tmp_path / "b", workers=1, **kwargs)
    write_toy_dataset(tmp_path / "c", workers=2, **kwargs)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") == _files(tmp_path / "c")
    assert {name: index.num_samples for name, index in first.items()} == split_counts(24, DEFAULT_SPLITS)
    assert len(first["train"].shards) == 5  # 21 samples, 5 per shard
    # another seed gives other data
    write_toy_dataset(tmp_path / "d", workers=1, **{**kwargs, "seed": 6})
    assert _files(tmp_path / "d")["train/toy-train-000000.tar"] != files["train/toy-train-000000.tar"]


def test_splits_disjoint_and_readable_by_webdataset(tmp_path):
    indexes = write_toy_dataset(tmp_path, num=40, seed=1, resolution=32, samples_per_shard=16, progress=False)
    keys: dict[str, set[str]] = {}
    photos: dict[str, set[bytes]] = {}
    for split, index in indexes.items():
        assert ShardIndex.load(tmp_path / split).to_json() == index.to_json()
        assert index.meta["split"] == split and index.meta["source"] == "toy"
        urls = [str(tmp_path / split / shard.name) for shard in index.shards]
        rows = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert len(rows) == index.num_samples
        keys[split], photos[split] = set(), set()
        for row in rows:
            assert {"jpg", "mask.png", "ref.jpg", "json"} <= set(row)
            photo = Image.open(io.BytesIO(row["jpg"]))
            mask = np.asarray(Image.open(io.BytesIO(row["mask.png"])))
            reference = Image.open(io.BytesIO(row["ref.jpg"]))
            meta = json.loads(row["json"])
            assert photo.mode == "RGB" and photo.size == reference.size == (32, 32)
            assert mask.dtype == np.uint8 and mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
            assert meta["prompt"] and meta["prompt_zh"] and meta["source"] == "toy"
            keys[split].add(row["__key__"])
            photos[split].add(row["jpg"])
    assert sum(len(k) for k in keys.values()) == 40
    splits = list(keys)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not keys[a] & keys[b] and not photos[a] & photos[b]


def _photos_by_key(folder: Path) -> dict[str, bytes]:
    index = ShardIndex.load(folder)
    urls = [str(folder / shard.name) for shard in index.shards]
    return {row["__key__"]: row["jpg"] for row in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_growing_num_keeps_the_samples_of_each_split(tmp_path):
    write_toy_dataset(tmp_path / "small", num=20, seed=3, resolution=32, progress=False)
    write_toy_dataset(tmp_path / "large", num=40, seed=3, resolution=32, progress=False)
    for split in ("train", "val", "bench"):
        small = _photos_by_key(tmp_path / "small" / split)
        large = _photos_by_key(tmp_path / "large" / split)
        assert small.items() <= large.items()


def test_committed_fixture_regenerates_identically(tmp_path):
    """data/fixtures/toy was made by the generator; regenerating it must give the same bytes."""
    committed = _files(FIXTURE)
    assert committed, f"fixture missing: {FIXTURE}"
    indexes = {split: ShardIndex.load(FIXTURE / split) for split in ("train", "val", "bench")}
    meta = indexes["train"].meta
    num = sum(index.num_samples for index in indexes.values())
    write_toy_dataset(tmp_path, num=num, seed=meta["seed"], resolution=meta["resolution"], progress=False)
    regenerated = {name: data for name, data in _files(tmp_path).items()}
    assert regenerated.keys() == committed.keys()
    for name, data in committed.items():
        assert regenerated[name] == data, (
            f"{name} drifted: regenerate with the command in data/fixtures/README.md"
        )
