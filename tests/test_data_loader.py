"""The streaming loader on real tar shards: round trip, corrupt samples, splitting, resume, buckets."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_shards import encode, make_members, write_shards, write_tar

from dreampainter.data.loading.loader import (
    LoaderConfig,
    build_dataloader,
    iter_shard_groups,
    shuffle_buffer,
)
from dreampainter.data.loading.skips import SkipLog
from dreampainter.data.shards.sources import resolve_shards
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.data.shards.validate import validate_shards
from dreampainter.errors import InvalidInputError, MissingFileError

SMALL = {"resolution": 32, "reference_size": 16, "shuffle_buffer": 8}


def _keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


def test_round_trip_every_sample_once_with_the_documented_fields(tmp_path):
    keys = write_shards(tmp_path, 3, 5)
    loader = build_dataloader(tmp_path, {**SMALL, "epoch_mode": "exact", "drop_last": False}, batch_size=4)
    seen = []
    for batch in loader:
        n = len(batch["key"])
        assert batch["pixel_values"].shape == (n, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        assert batch["mask"].shape == batch["product_mask"].shape == (n, 1, 32, 32)
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(batch["mask"], 1 - batch["product_mask"])
        assert torch.equal(batch["masked_pixel_values"], batch["pixel_values"] * (1 - batch["mask"]))
        assert batch["reference_pixel_values"].shape == (n, 3, 16, 16)
        assert batch["drop_text"].dtype == torch.bool and batch["drop_reference"].shape == (n,)
        assert batch["prompt"] == [f"a product {key}" for key in batch["key"]]
        assert batch["category"] == ["box"] * n
        # the product (a quarter of the photo) is in every sample, and the background is repainted
        assert (batch["product_mask"].flatten(1).mean(1) > 0.03).all()
        assert (batch["mask"].flatten(1).mean(1) > 0.5).all()
        seen += batch["key"]
    assert sorted(seen) == sorted(keys)
    assert loader.skips.total == 0


def test_sources_folder_index_brace_list_and_pipe_agree(tmp_path):
    write_shards(tmp_path, 2, 3)
    config = {
        **SMALL,
        "epoch_mode": "exact",
        "shuffle_shards": False,
        "shuffle_buffer": 0,
        "drop_last": False,
    }
    expected = _keys(build_dataloader(tmp_path, config, batch_size=2))
    shards = [str(tmp_path / f"shard-{i:04d}.tar") for i in range(2)]
    assert resolve_shards(tmp_path).counts == [3, 3]
    assert _keys(build_dataloader(tmp_path / "index.json", config, batch_size=2)) == expected
    assert _keys(build_dataloader(str(tmp_path / "shard-{0000..0001}.tar"), config, batch_size=2)) == expected
    assert _keys(build_dataloader(shards, config, batch_size=2)) == expected
    pipes = [f"pipe:cat {path}" for path in shards]
    assert _keys(build_dataloader(pipes, config, batch_size=2)) == expected
    assert _keys(build_dataloader([f"file://{path}" for path in shards], config, batch_size=2)) == expected
    with pytest.raises(MissingFileError, match=r"8 of 10 shard\(s\) not found, first: .*shard-0002.tar"):
        resolve_shards(str(tmp_path / "shard-{0000..0009}.tar"))


def _corrupt_shard(path: Path) -> dict[str, int]:
    """A shard with one sample of each kind of damage (+ good ones); returns the expected skip counts."""
    good = [(f"good{i}", make_members(f"good{i}", 100 + i)) for i in range(4)]
    truncated_jpeg = make_members("tjpg", 1)
    truncated_jpeg["jpg"] = truncated_jpeg["jpg"][: len(truncated_jpeg["jpg"]) // 2]
    wrong_mask = make_members("wmask", 2)
    wrong_mask["mask.png"] = encode(np.zeros((10, 10), np.uint8), "PNG")
    missing = make_members("noref", 3)
    del missing["ref.jpg"]
    empty_prompt = make_members("noprompt", 4, prompt="  ")
    bad_json = make_members("badjson", 5)
    bad_json["json"] = b"{not json"
    garbage = make_members("garbage", 6)
    garbage["ref.jpg"] = b"this is not an image"
    samples = [good[0], ("tjpg", truncated_jpeg), good[1], ("wmask", wrong_mask), ("noref", missing)]
    samples += [good[2], ("noprompt", empty_prompt), ("badjson", bad_json), ("garbage", garbage), good[3]]
    write_tar(path, samples)
    return {
        "truncated_image": 1,
        "mask_size": 1,
        "missing_member": 1,
        "empty_prompt": 1,
        "bad_json": 1,
        "undecodable": 1,
    }


def test_corrupt_samples_and_a_truncated_tar_are_skipped_and_counted(tmp_path):
    expected = _corrupt_shard(tmp_path / "a.tar")
    write_tar(tmp_path / "b.tar", [(f"fine{i}", make_members(f"fine{i}", 200 + i)) for i in range(3)])
    whole = tmp_path / "whole.tar"
    write_tar(whole, [(f"cut{i}", make_members(f"cut{i}", 300 + i)) for i in range(6)])
    data = whole.read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: int(len(data) * 0.6)])  # ends in the middle of a member
    whole.unlink()
    config = {**SMALL, "epoch_mode": "exact", "drop_last": False}
    loader = build_dataloader(tmp_path, config, batch_size=3)
    keys = _keys(loader)
    good = {f"good{i}" for i in range(4)} | {f"fine{i}" for i in range(3)}
    assert good <= set(keys)
    cut = sorted(k for k in keys if k.startswith("cut"))
    assert 1 <= len(cut) < 6 and cut == [f"cut{i}" for i in range(len(cut))]  # the complete ones survive
    assert len(keys) == len(set(keys)) == len(good) + len(cut)
    counts = loader.skips.as_dict()
    assert counts.pop("truncated_tar") == 1
    assert counts == expected


def _damaged_shard(path: Path, damage: str) -> list[str]:
    """Six samples, damaged inside the fourth (``cut3``); returns the keys of the complete samples before it."""
    samples = [(f"cut{i}", make_members(f"cut{i}", 300 + i)) for i in range(6)]
    write_tar(path, samples)
    data = path.read_bytes()
    with tarfile.open(path) as archive:
        members = {info.name: info for info in archive.getmembers()}
    mask = members["cut3.mask.png"]
    if damage == "inside_member":  # ends in the middle of cut3.mask.png's data
        data = data[: mask.offset_data + mask.size // 2]
    elif damage == "member_boundary":  # ends right after cut3.mask.png, no end-of-archive marker
        data = data[: mask.offset_data + mask.size + (-mask.size % 512)]
    else:  # cut3.mask.png's header overwritten: the rest of the file is unreachable
        data = data[: mask.offset] + b"garbage!" * 64 + data[mask.offset + 512 :]
    path.write_bytes(data)
    return ["cut0", "cut1", "cut2"]


@pytest.mark.parametrize(
    "damage, reason, message",
    [
        ("inside_member", "truncated_tar", "truncated tar: member cut3.mask.png declares"),
        ("member_boundary", "truncated_tar", "truncated tar: ends without its end-of-archive marker"),
        ("garbage_header", "corrupt_tar", "corrupt tar header at byte"),
    ],
)
def test_a_damaged_shard_is_an_error_for_the_validator_and_a_counted_skip_for_the_loader(
    tmp_path, damage, reason, message
):
    """One reader, one rule: what the validator reports, the loader skips, keeping what came before."""
    before = _damaged_shard(tmp_path / "damaged.tar", damage)
    write_tar(tmp_path / "fine.tar", [(f"fine{i}", make_members(f"fine{i}", 200 + i)) for i in range(3)])
    report = validate_shards(tmp_path, progress=False)
    assert [p for p in report.problems if "damaged.tar" in p] == [
        next(p for p in report.problems if p.startswith(f"damaged.tar: {message}"))
    ]
    assert {bad.key for bad in report.bad_samples} == {"cut3"} and report.num_samples == 3 + len(before)

    config = {**SMALL, "epoch_mode": "exact", "drop_last": False, "shuffle_shards": False}
    loader = build_dataloader(tmp_path, {**config, "shuffle_buffer": 0}, batch_size=2)
    assert _keys(loader) == before + ["fine0", "fine1", "fine2"]
    assert loader.skips.as_dict() == {reason: 1}
    log = SkipLog(0, quiet=True)
    groups = list(iter_shard_groups(str(tmp_path / "damaged.tar"), log, expected=6))
    assert [group["__key__"] for group in groups] == before
    assert dict(log.totals) == {reason: 1}  # no missing_samples on top of the truncation


def test_a_missing_shard_is_counted_not_raised(tmp_path):
    log = SkipLog(0, quiet=True)
    assert list(iter_shard_groups(str(tmp_path / "nowhere.tar"), log)) == []
    assert dict(log.totals) == {"unreadable_shard": 1}


# Member names and what the loader made of them before it shared the validator's reader (tarfile +
# webdataset's base_plus_ext): a leading "./" stays in the key, "__"-prefixed names are skipped, the
# suffix is lower-cased, a hidden base name keys on its folder.
ODD_NAMES = [
    "__meta__", "__x.json", "./a/b.jpg", "./a/b.json", "dir/.x.jpg", "dir/.x.json", "A.JPG",
    "A.Mask.PNG", "nodot", "a.b/c", "a.b/c.d", "x.", "y..z", ".hidden", "d/e/f.tar.gz", "./__k.txt",
    "__a__/b.txt",
]  # fmt: skip
ODD_GROUPS = [
    {"__key__": "./a/b", "jpg": "./a/b.jpg", "json": "./a/b.json"},
    {"__key__": "dir/", "x.jpg": "dir/.x.jpg", "x.json": "dir/.x.json"},
    {"__key__": "A", "jpg": "A.JPG", "mask.png": "A.Mask.PNG"},
    {"__key__": "a.b/c", "d": "a.b/c.d"},
    {"__key__": "x", "": "x."},
    {"__key__": "y", ".z": "y..z"},
    {"__key__": "d/e/f", "tar.gz": "d/e/f.tar.gz"},
    {"__key__": "./__k", "txt": "./__k.txt"},
]


def test_member_names_follow_webdataset_rules_as_the_loader_always_did(tmp_path):
    with tarfile.open(tmp_path / "odd.tar", "w") as archive:
        for name in ODD_NAMES:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            archive.addfile(info, io.BytesIO(name.encode()))
    url = str(tmp_path / "odd.tar")
    groups = list(iter_shard_groups(url, SkipLog(0)))
    as_text = [
        {k: v if k == "__key__" else v.decode() for k, v in g.items() if k != "__url__"} for g in groups
    ]
    assert as_text == ODD_GROUPS
    assert [key for key, _ in iter_tar_samples(url)] == [group["__key__"] for group in ODD_GROUPS]


# Keys in the order the loader gave them with webdataset's private _shuffle (recorded before it was
# replaced): seeds and resumed runs must keep their order. Shards: write_shards(tmp, 3, 7).
RECORDED_ORDERS = {
    ("exact", 8, 7, 0): [
        "s00017", "s00014", "s00015", "s00010", "s00009", "s00012", "s00016", "s00007", "s00000", "s00013",
        "s00018", "s00002", "s00004", "s00011", "s00019", "s00005", "s00003", "s00008", "s00001", "s00020",
        "s00006",
    ],
    ("balanced", 30, 3, 0): [
        "s00018", "s00002", "s00013", "s00016", "s00004", "s00012", "s00001", "s00017", "s00008", "s00014",
        "s00015", "s00005", "s00010", "s00019", "s00007", "s00006", "s00009", "s00000", "s00011", "s00003",
    ],
    ("exact", 8, 7, 6): [
        "s00016", "s00007", "s00000", "s00013", "s00018", "s00002", "s00004", "s00011", "s00019", "s00005",
        "s00003", "s00008", "s00001", "s00020", "s00006",
    ],
}  # fmt: skip


def test_sample_order_for_a_seed_is_unchanged(tmp_path):
    write_shards(tmp_path, 3, 7)
    for (mode, buffer, seed, resume), expected in RECORDED_ORDERS.items():
        config = {"resolution": 32, "reference_size": 16, "shuffle_buffer": buffer, "epoch_mode": mode}
        if mode == "exact":
            config["drop_last"] = False
        loader = build_dataloader(tmp_path, config, batch_size=2, seed=seed, resume_samples=resume)
        assert _keys(loader) == expected, (mode, buffer, seed, resume)


def test_shuffle_buffer_draws_as_webdatasets_shuffle_did():
    # recorded from webdataset 1.0.2's shuffle(bufsize=size, initial=size, rng=random.Random(seed))
    recorded = {
        (25, 6, "x"): [5, 2, 4, 7, 3, 0, 9, 8, 11, 14, 13, 15, 1, 16, 18, 12, 20, 21, 10, 6, 22, 23, 19, 17, 24],
        (5, 8, "y"): [1, 2, 3, 0, 4],
        (1, 4, 0): [0],
        (0, 4, 0): [],
    }  # fmt: skip
    for (n, size, seed), expected in recorded.items():
        assert list(shuffle_buffer(range(n), size, random.Random(seed))) == expected


def test_undecodable_pixels_behind_a_valid_header_are_skipped_without_breaking_the_batch(tmp_path):
    broken = make_members("broken", 7)
    del broken["jpg"]
    png = bytearray(encode(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8), "PNG"))
    data_start = png.index(b"IDAT") + 4
    png[data_start + 10 : data_start + 200] = bytes(190)  # header and IEND intact, pixel stream broken
    broken["png"] = bytes(png)
    samples = [("ok0", make_members("ok0", 1)), ("broken", broken), ("ok1", make_members("ok1", 2))]
    write_tar(tmp_path / "x.tar", samples)
    loader = build_dataloader(tmp_path, {**SMALL, "epoch_mode": "exact", "drop_last": False}, batch_size=3)
    batches = list(loader)
    assert len(batches) == 1 and sorted(batches[0]["key"]) == [
        "ok0",
        "ok1",
    ]  # planned batch of 3, one dropped
    assert loader.skips.as_dict() == {"undecodable": 1}


def test_index_shortfall_is_reported(tmp_path):
    write_shards(tmp_path, 2, 3)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][1]["num_samples"] = 5
    (tmp_path / "index.json").write_text(json.dumps(index))
    loader = build_dataloader(tmp_path, {**SMALL, "epoch_mode": "exact", "drop_last": False}, batch_size=2)
    assert len(_keys(loader)) == 6
    assert loader.skips.as_dict() == {"missing_samples": 2}


@pytest.mark.parametrize("mode", ["exact", "balanced"])
def test_two_ranks_two_workers_are_disjoint_and_complete(tmp_path, mode):
    keys = write_shards(tmp_path, 8, 4)
    config = {**SMALL, "epoch_mode": mode, "drop_last": mode == "balanced"}
    per_rank = []
    for rank in range(2):
        loader = build_dataloader(
            tmp_path, config, batch_size=2, rank=rank, world_size=2, num_workers=2, seed=5
        )
        batches = list(loader)
        if mode == "balanced":
            assert len(batches) == len(loader) == 8  # same count on every rank: DDP-safe
        per_rank.append([key for batch in batches for key in batch["key"]])
    assert not set(per_rank[0]) & set(per_rank[1])
    for keys_of_rank in per_rank:
        assert len(keys_of_rank) == len(set(keys_of_rank))
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


def test_too_few_shards_is_a_clear_error(tmp_path):
    write_shards(tmp_path, 3, 2)
    with pytest.raises(InvalidInputError, match=r"3 shard\(s\) cannot be split over 2 rank\(s\) x 2"):
        build_dataloader(tmp_path, SMALL, batch_size=1, rank=0, world_size=2, num_workers=2)
    loader = build_dataloader(
        tmp_path, {**SMALL, "resampled": True}, batch_size=1, rank=0, world_size=2, num_workers=2
    )
    assert len(loader) == 4  # ceil(6 samples / (2 ranks x 2 workers x 1)) = 2 per worker


def test_resampled_mode_is_endless_without_a_count_and_deterministic(tmp_path):
    write_shards(tmp_path, 2, 3, index=False)
    config = {**SMALL, "resampled": True}
    loader = build_dataloader(tmp_path, config, batch_size=2, seed=3)
    iterator = iter(loader)
    first = [next(iterator)["key"] for _ in range(10)]  # 20 samples from 6: it wraps around
    again = iter(build_dataloader(tmp_path, config, batch_size=2, seed=3))
    assert first == [next(again)["key"] for _ in range(10)]
    # a sample drawn again later in the stream is augmented afresh
    variants: dict[str, set] = {}
    for batch in (next(again) for _ in range(40)):
        for key, pixels in zip(batch["key"], batch["pixel_values"]):
            variants.setdefault(key, set()).add(round(float(pixels.sum()), 3))
    assert any(len(seen) > 1 for seen in variants.values())


def _fingerprint(batch) -> tuple:
    return (
        tuple(batch["key"]),
        tuple(batch["pixel_values"].shape),
        round(float(batch["pixel_values"].double().sum()), 4),
        round(float(batch["mask"].double().sum()), 4),
        round(float(batch["reference_pixel_values"].double().sum()), 4),
        tuple(batch["drop_text"].tolist()),
        tuple(batch["prompt"]),
    )


@pytest.mark.parametrize("buckets", [False, True])
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, buckets):
    sizes = [(48, 40), (40, 64), (64, 40)] if buckets else None
    write_shards(tmp_path, 4, 9, sizes=sizes)
    _corrupt_shard(tmp_path / "shard-0004.tar")  # not in the index: the folder's index lists 4 shards
    (tmp_path / "shard-0004.tar").unlink()
    config = {
        **SMALL,
        "buckets": [[32, 32], [24, 40], [40, 24]] if buckets else None,
        "max_zoom": 1.5,
        "language": "random",
        "mask_grow_px": [-1, 2],
        "p_drop_text": 0.3,
    }
    args = {"batch_size": 2, "rank": 1, "world_size": 2, "num_workers": 2, "epoch": 3, "seed": 11}
    full = [_fingerprint(batch) for batch in build_dataloader(tmp_path, config, **args)]
    assert len(full) == 8
    if buckets:
        assert len({f[1] for f in full}) > 1  # several bucket sizes were used
    for consumed in (1, 3, 6):
        resumed = [
            _fingerprint(b) for b in build_dataloader(tmp_path, config, resume_samples=2 * consumed, **args)
        ]
        assert resumed == full[consumed:]
    other_seed = [_fingerprint(batch) for batch in build_dataloader(tmp_path, config, **{**args, "seed": 12})]
    assert other_seed != full
    with pytest.raises(InvalidInputError, match="multiple of batch_size"):
        build_dataloader(tmp_path, config, resume_samples=3, **args)


def test_resume_is_exact_with_corrupt_samples_in_the_stream(tmp_path):
    write_shards(tmp_path, 2, 6, index=False)
    _corrupt_shard(tmp_path / "shard-0002.tar")
    config = {**SMALL, "epoch_mode": "exact", "samples_per_epoch": None}
    args = {"batch_size": 2, "num_workers": 0, "seed": 2}
    loader = build_dataloader(tmp_path, config, **args)
    batches = list(loader)
    full = [_fingerprint(batch) for batch in batches]
    assert loader.skips.total == 6
    resumed_loader = build_dataloader(tmp_path, config, resume_samples=6, **args)
    assert [_fingerprint(batch) for batch in resumed_loader] == full[3:]
    # skip counts are not double-counted across the interruption
    before = sum(sum(batch["skipped"].values()) for batch in batches[:3])
    assert before + resumed_loader.skips.total == 6


def test_buckets_group_batches_by_aspect(tmp_path):
    write_shards(tmp_path, 2, 8, sizes=[(60, 40), (40, 60), (50, 50), (64, 32)])
    config = {**SMALL, "buckets": [[32, 32], [24, 40], [40, 24]], "epoch_mode": "exact", "drop_last": False}
    shapes = {}
    for batch in build_dataloader(tmp_path, config, batch_size=2):
        shape = tuple(batch["pixel_values"].shape[-2:])
        assert batch["mask"].shape[-2:] == shape
        for key in batch["key"]:
            shapes[key] = shape
    by_size = {(60, 40): (24, 40), (40, 60): (40, 24), (50, 50): (32, 32), (64, 32): (24, 40)}
    sizes = [(60, 40), (40, 60), (50, 50), (64, 32)]
    for key, shape in shapes.items():
        assert shape == by_size[sizes[int(key[1:]) % 4]]
    assert len(shapes) == 16


def test_balanced_mode_needs_counts(tmp_path):
    write_shards(tmp_path, 2, 2, index=False)
    with pytest.raises(InvalidInputError, match="index.json"):
        build_dataloader(tmp_path, SMALL, batch_size=1)
    assert len(build_dataloader(tmp_path, {**SMALL, "samples_per_epoch": 4}, batch_size=1)) == 4


def test_shards_written_by_webdataset_shardwriter_are_read(tmp_path):
    import webdataset as wds

    with wds.ShardWriter(str(tmp_path / "wds-%04d.tar"), maxcount=3) as sink:
        for i in range(5):
            members = make_members(f"w{i}", i)
            sink.write({"__key__": f"w{i}", **members})
    config = {**SMALL, "epoch_mode": "exact", "drop_last": False}
    assert sorted(_keys(build_dataloader(tmp_path, config, batch_size=2))) == [f"w{i}" for i in range(5)]


def test_tar_entries_outside_samples_are_ignored(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("__meta__")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
        for suffix, data in make_members("only", 0).items():
            info = tarfile.TarInfo(f"only.{suffix}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "x.tar").write_bytes(buffer.getvalue())
    loader = build_dataloader(tmp_path, {**SMALL, "epoch_mode": "exact", "drop_last": False}, batch_size=1)
    assert _keys(loader) == ["only"] and loader.skips.total == 0


def test_loader_config_accepts_plain_and_omegaconf_mappings(tmp_path):
    from omegaconf import OmegaConf

    config = LoaderConfig.from_dict({"resolution": [48, 64], "buckets": True})
    assert config.size == (48, 64)
    assert (64, 64) in config.bucket_sizes()
    yaml = OmegaConf.create(
        {"resolution": 32, "reference_size": 16, "mask_grow_px": [1, 2], "epoch_mode": "exact"}
    )
    write_shards(tmp_path, 1, 2)
    loader = build_dataloader(tmp_path, yaml, batch_size=2)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def test_fsspec_urls_and_a_remote_index(tmp_path):
    import fsspec

    keys = write_shards(tmp_path, 2, 3)
    fs = fsspec.filesystem("memory")
    for path in sorted(tmp_path.iterdir()):
        fs.pipe(f"/dreamecom/{path.name}", path.read_bytes())
    config = {**SMALL, "epoch_mode": "exact", "drop_last": False}
    shards = resolve_shards("memory://dreamecom/index.json")
    assert shards.urls == ["memory://dreamecom/shard-0000.tar", "memory://dreamecom/shard-0001.tar"]
    assert shards.counts == [3, 3]
    assert sorted(_keys(build_dataloader("memory://dreamecom/index.json", config, batch_size=2))) == keys


def test_http_shards_through_webdataset_gopen(tmp_path):
    import functools
    import http.server
    import threading

    keys = write_shards(tmp_path, 2, 2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.json"
        config = {**SMALL, "epoch_mode": "exact", "drop_last": False}
        loader = build_dataloader(url, config, batch_size=2)
        assert sorted(_keys(loader)) == keys and loader.skips.total == 0
    finally:
        server.shutdown()
        server.server_close()


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    samples = [(f"bad{i:02d}", make_members(f"bad{i:02d}", i, prompt="")) for i in range(25)]
    samples.append(("ok", make_members("ok", 99)))
    write_tar(tmp_path / "x.tar", samples)
    with caplog.at_level("WARNING", logger="dreampainter.data.loading.skips"):
        loader = build_dataloader(
            tmp_path, {**SMALL, "epoch_mode": "exact", "drop_last": False}, batch_size=1
        )
        assert _keys(loader) == ["ok"]
    assert loader.skips.as_dict() == {"empty_prompt": 25}
    warned = [record for record in caplog.records if "empty_prompt" in record.getMessage()]
    assert len(warned) == 6  # the first five, then the tenth


def test_exact_mode_resume_is_exact_in_the_ragged_tail(tmp_path):
    # uneven shards: the two workers run dry at different batches
    for shard, size in enumerate([2, 9, 3, 8]):
        samples = [(f"u{shard}x{i}", make_members(f"u{shard}x{i}", 10 * shard + i)) for i in range(size)]
        write_tar(tmp_path / f"u{shard}.tar", samples)
    config = {**SMALL, "epoch_mode": "exact", "drop_last": False, "shuffle_shards": False}
    args = {"batch_size": 2, "num_workers": 2, "seed": 4}
    full = [_fingerprint(batch) for batch in build_dataloader(tmp_path, config, **args)]
    assert sum(len(f[0]) for f in full) == 22
    for consumed in range(1, len(full)):
        resumed = build_dataloader(tmp_path, config, resume_samples=2 * consumed, **args)
        assert [_fingerprint(batch) for batch in resumed] == full[consumed:], consumed


def test_reads_the_committed_toy_fixture_written_by_the_shard_writer():
    folder = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "toy" / "train"
    index = json.loads((folder / "index.json").read_text())
    config = {**SMALL, "epoch_mode": "exact", "drop_last": False, "language": "zh", "reference_aligned": True}
    loader = build_dataloader(folder, config, batch_size=3)
    batches = list(loader)
    assert sum(len(batch["key"]) for batch in batches) == index["num_samples"]
    assert loader.skips.total == 0
    for batch in batches:
        assert all(prompt and not prompt.isascii() for prompt in batch["prompt"])  # the Chinese prompts
        assert (batch["product_mask"].flatten(1).mean(1) > 0.01).all()
