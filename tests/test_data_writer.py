"""Shard writer: manifests / folder layout -> tar shards + index.json, on real files in tmp_path."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from dreampainter.data.shards.format import INDEX_FILENAME, EncodedSample, ShardIndex
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.data.shards.validate import validate_shards
from dreampainter.data.shards.writer import write_shards, write_shards_from_manifest
from dreampainter.errors import InvalidInputError


def _image_bytes(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int, size=(40, 30), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    return _image_bytes(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), fmt)


def _mask(size=(40, 30), box=(10, 8, 30, 22), mode="L", value=255) -> bytes:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    if mode == "RGB":
        mask = np.stack([mask] * 3, axis=-1)
    return _image_bytes(mask, "PNG")


def _make_catalogue(root, num: int, *, photo_fmt="JPEG") -> list[dict]:
    """Write photos/masks/refs for ``num`` rows; return manifest rows (paths relative to ``root``)."""
    for folder in ("photos", "masks", "refs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    ext = {"JPEG": "jpg", "PNG": "png"}[photo_fmt]
    for i in range(num):
        (root / f"photos/p{i}.{ext}").write_bytes(_photo(i, fmt=photo_fmt))
        (root / f"masks/p{i}.png").write_bytes(_mask(box=(5 + i, 5, 25 + i, 20)))
        (root / f"refs/p{i}.jpg").write_bytes(_photo(100 + i, size=(24, 24)))
        rows.append(
            {
                "key": f"item{i:03d}",
                "photo": f"photos/p{i}.{ext}",
                "mask": f"masks/p{i}.png",
                "reference": f"refs/p{i}.jpg",
                "prompt": f"a product number {i} on a wooden table",
                "prompt_zh": f"木桌上的产品 {i}",
                "category": "cup",
                "sku": 1000 + i,
            }
        )
    return rows


def _write_jsonl(path, rows, extra_lines=()) -> None:
    lines = [json.dumps(row, ensure_ascii=False) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_all(folder) -> dict[str, dict[str, bytes]]:
    index = ShardIndex.load(folder)
    samples = {}
    for shard in index.shards:
        samples.update(dict(iter_tar_samples(folder / shard.name)))
    return samples


def _shard_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_jsonl_round_trip_keeps_bytes_and_validates(tmp_path):
    rows = _make_catalogue(tmp_path / "cat", 5)
    _write_jsonl(tmp_path / "cat/manifest.jsonl", rows)
    out = tmp_path / "shards"
    index, report = write_shards_from_manifest(
        tmp_path / "cat/manifest.jsonl", out, max_samples_per_shard=2, progress=False
    )

    assert [shard.name for shard in index.shards] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert [shard.num_samples for shard in index.shards] == [2, 2, 1]
    assert report.num_written == 5 and not report.bad_rows
    for shard in index.shards:
        data = (out / shard.name).read_bytes()
        assert shard.num_bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
    assert ShardIndex.load(out / INDEX_FILENAME).to_json() == index.to_json()

    samples = _read_all(out)
    assert list(samples) == [row["key"] for row in rows]
    for row in rows:
        members = samples[row["key"]]
        assert sorted(members) == ["jpg", "json", "mask.png", "ref.jpg"]
        assert members["jpg"] == (tmp_path / "cat" / row["photo"]).read_bytes()
        assert members["mask.png"] == (tmp_path / "cat" / row["mask"]).read_bytes()
        assert members["ref.jpg"] == (tmp_path / "cat" / row["reference"]).read_bytes()
        meta = json.loads(members["json"])
        assert meta == {key: row[key] for key in ("prompt", "prompt_zh", "category", "sku")}

    validation = validate_shards(out, progress=False)
    assert validation.ok, validation.summary()
    assert validation.num_samples == 5 and validation.num_shards == 3


def test_csv_manifest_round_trip(tmp_path):
    rows = _make_catalogue(tmp_path, 3, photo_fmt="PNG")
    with open(tmp_path / "list.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(
            file, fieldnames=["photo", "mask", "reference", "prompt", "prompt_zh", "note"]
        )
        writer.writeheader()
        for i, row in enumerate(rows):
            note = "" if i == 0 else f"note {i}"
            writer.writerow(
                {
                    **{k: row[k] for k in ("photo", "mask", "reference", "prompt")},
                    "prompt_zh": "",
                    "note": note,
                }
            )
    out = tmp_path / "out"
    index, report = write_shards_from_manifest(tmp_path / "list.csv", out, progress=False)

    samples = _read_all(out)
    # no key column: keys are the manifest line numbers (header = line 1)
    assert list(samples) == ["00000002", "00000003", "00000004"]
    first = samples["00000002"]
    assert first["png"] == (tmp_path / rows[0]["photo"]).read_bytes()
    assert json.loads(first["json"]) == {"prompt": rows[0]["prompt"]}  # empty cells are left out
    assert json.loads(samples["00000004"]["json"])["note"] == "note 2"
    assert validate_shards(out, progress=False).ok

    tsv = tmp_path / "list.tsv"
    tsv.write_text((tmp_path / "list.csv").read_text(encoding="utf-8").replace(",", "\t"), encoding="utf-8")
    write_shards_from_manifest(tsv, tmp_path / "tsv", progress=False)
    assert _shard_bytes(tmp_path / "tsv") == _shard_bytes(out)


def test_folder_layout_with_text_prompts_and_prompts_jsonl(tmp_path):
    rows = _make_catalogue(tmp_path / "a", 3)
    (tmp_path / "a/prompts").mkdir()
    for row, stem in zip(rows, ("p0", "p1", "p2")):
        (tmp_path / f"a/prompts/{stem}.txt").write_text(row["prompt"] + "\n", encoding="utf-8")
    (tmp_path / "a/prompts/p1.zh.txt").write_text("中文提示", encoding="utf-8")
    write_shards_from_manifest(tmp_path / "a", tmp_path / "out_a", progress=False)
    samples = _read_all(tmp_path / "out_a")
    assert list(samples) == ["p0", "p1", "p2"]
    assert json.loads(samples["p1"]["json"]) == {"prompt": rows[1]["prompt"], "prompt_zh": "中文提示"}
    assert samples["p2"]["mask.png"] == (tmp_path / "a/masks/p2.png").read_bytes()

    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("prompts"))
    _write_jsonl(
        tmp_path / "b/prompts.jsonl",
        [{"key": "p0", "prompt": "x", "style": "warm"}, {"key": "p2", "prompt": "z"}],
    )
    index, report = write_shards_from_manifest(tmp_path / "b", tmp_path / "out_b", progress=False)
    assert index.num_samples == 2
    assert [(bad.location, bad.reason) for bad in report.bad_rows] == [("photos/p1.jpg", "prompt missing")]
    assert json.loads(_read_all(tmp_path / "out_b")["p0"]["json"]) == {"prompt": "x", "style": "warm"}


def test_output_is_deterministic_and_independent_of_workers(tmp_path):
    rows = _make_catalogue(tmp_path / "cat", 9)
    _write_jsonl(tmp_path / "cat/m.jsonl", rows)
    first, _ = write_shards_from_manifest(
        tmp_path / "cat/m.jsonl", tmp_path / "w1", max_samples_per_shard=4, progress=False
    )
    second, _ = write_shards_from_manifest(
        tmp_path / "cat/m.jsonl", tmp_path / "w1b", max_samples_per_shard=4, progress=False
    )
    parallel, _ = write_shards_from_manifest(
        tmp_path / "cat/m.jsonl", tmp_path / "w2", workers=2, max_samples_per_shard=4, progress=False
    )
    assert len(first.shards) == 3
    assert first.to_json() == second.to_json() == parallel.to_json()
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w1b") == _shard_bytes(tmp_path / "w2")


def _samples(num: int, fail_after: int | None = None):
    for i in range(num):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("simulated crash")
        yield EncodedSample(
            f"k{i:04d}", _photo(i), "jpg", _mask(), _photo(50 + i), "jpg", {"prompt": f"p {i}"}
        )


def test_crash_mid_write_leaves_no_partial_shard_and_no_index(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(_samples(10, fail_after=3), out, max_samples_per_shard=2, progress=False)
    # the first shard was complete and stays; the one being written (holding k0002) is gone
    assert sorted(path.name for path in out.iterdir()) == ["shard-000000.tar"]
    assert [key for key, _ in iter_tar_samples(out / "shard-000000.tar")] == ["k0000", "k0001"]

    # a rerun into the same folder (no index yet) succeeds and replaces everything
    index = write_shards(_samples(3), out, max_samples_per_shard=2, progress=False)
    assert sorted(path.name for path in out.iterdir()) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert index.num_samples == 3


def test_existing_shard_set_needs_overwrite_and_stale_shards_are_removed(tmp_path):
    out = tmp_path / "out"
    write_shards(_samples(6), out, max_samples_per_shard=2, progress=False)
    with pytest.raises(InvalidInputError, match="already holds a shard set"):
        write_shards(_samples(2), out, max_samples_per_shard=2, progress=False)
    index = write_shards(_samples(2), out, max_samples_per_shard=2, progress=False, overwrite=True)
    assert sorted(path.name for path in out.iterdir()) == ["index.json", "shard-000000.tar"]
    assert validate_shards(out, progress=False).ok and index.num_samples == 2


def test_max_bytes_bounds_shard_size(tmp_path):
    samples = list(_samples(6))
    one = sum(len(blob) for blob in samples[0].members().values())
    index = write_shards(samples, tmp_path / "o", max_bytes=3 * one + 4096, progress=False)
    assert len(index.shards) > 1
    assert all(shard.num_bytes <= 3 * one + 4096 for shard in index.shards)
    assert index.num_samples == 6
    tiny = write_shards(
        samples[:2], tmp_path / "t", max_bytes=100, progress=False
    )  # one oversized sample per shard
    assert [shard.num_samples for shard in tiny.shards] == [1, 1]


@pytest.mark.parametrize(
    "bad_key, message",
    [("a.b", "must not contain dots"), ("", "non-empty"), ("/abs", "relative path")],
)
def test_write_shards_rejects_bad_and_duplicate_keys(tmp_path, bad_key, message):
    sample = next(_samples(1))
    sample.key = bad_key
    with pytest.raises(InvalidInputError, match=message):
        write_shards([sample], tmp_path / "o", progress=False)
    with pytest.raises(InvalidInputError, match="duplicate key"):
        write_shards([next(_samples(1)), next(_samples(1))], tmp_path / "d", progress=False)
    assert not list((tmp_path / "o").glob("*.tar")) and not (tmp_path / "o" / INDEX_FILENAME).exists()


def _bad_catalogue(root) -> None:
    """Rows (by manifest line): 1 good, 2 missing file, 3 undecodable, 4 mask size, 5 empty prompt,
    6 invalid JSON, 7 empty mask, 8 good, 9 duplicate key, 10 missing field."""
    rows = _make_catalogue(root, 9)
    rows[1]["photo"] = "photos/nothere.jpg"
    (root / "photos/p2.jpg").write_bytes(b"this is not an image")
    (root / "masks/p3.png").write_bytes(_mask(size=(20, 30), box=(2, 2, 10, 10)))
    rows[4]["prompt"] = "   "
    (root / "masks/p6.png").write_bytes(_mask(value=0))
    rows[8]["key"] = rows[0]["key"]
    no_mask = dict(rows[5])
    no_mask.pop("mask")
    no_mask["key"] = "nomask"
    lines = [json.dumps(row) for row in rows]
    lines[5] = "{not json"
    lines.append(json.dumps(no_mask))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_bad_rows_are_reported_by_row_and_skipped(tmp_path):
    _bad_catalogue(tmp_path / "cat")
    index, report = write_shards_from_manifest(
        tmp_path / "cat/manifest.jsonl", tmp_path / "o", workers=2, progress=False
    )
    assert index.num_samples == 2 and report.num_written == 2 and report.num_rows == 10
    reasons = {bad.row: bad.reason for bad in report.bad_rows}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 9, 10]
    assert reasons[2] == "photo file not found: photos/nothere.jpg"
    assert reasons[3] == "photo photos/p2.jpg: not a decodable image"
    assert reasons[4] == "mask is 20x30 but the photo is 40x30"
    assert reasons[5] == "empty prompt"
    assert reasons[6].startswith("invalid JSON")
    assert reasons[7].startswith("mask is empty")
    assert reasons[9] == "duplicate key 'item000' (first used at row 1)"
    assert reasons[10] == "missing field 'mask'"
    assert str(report.bad_rows[0]) == "manifest.jsonl:2: photo file not found: photos/nothere.jpg"
    summary = report.summary()
    assert "10 rows, 2 samples written" in summary and "manifest.jsonl:4: mask is 20x30" in summary
    assert validate_shards(tmp_path / "o", progress=False).ok


def test_missing_field_row(tmp_path):
    rows = _make_catalogue(tmp_path, 2)
    del rows[1]["reference"]
    _write_jsonl(tmp_path / "m.jsonl", rows)
    _, report = write_shards_from_manifest(tmp_path / "m.jsonl", tmp_path / "o", progress=False)
    assert [str(bad) for bad in report.bad_rows] == ["m.jsonl:2: missing field 'reference'"]


def test_bad_row_is_fatal_with_on_error_fail(tmp_path):
    _bad_catalogue(tmp_path / "cat")
    with pytest.raises(
        InvalidInputError, match=r"^manifest\.jsonl:2: photo file not found: photos/nothere\.jpg$"
    ):
        write_shards_from_manifest(
            tmp_path / "cat/manifest.jsonl", tmp_path / "o", on_error="fail", progress=False
        )
    assert list((tmp_path / "o").iterdir()) == []  # the shard in progress was dropped, no index


def test_reencode_and_max_side(tmp_path):
    rows = _make_catalogue(tmp_path, 2, photo_fmt="PNG")
    for i in range(2):  # product edges on even pixels: halving keeps the mask binary
        (tmp_path / f"masks/p{i}.png").write_bytes(_mask(box=(6, 6, 24 + 2 * i, 20)))
    _write_jsonl(tmp_path / "m.jsonl", rows)
    index, report = write_shards_from_manifest(
        tmp_path / "m.jsonl", tmp_path / "o", max_side=20, progress=False
    )
    samples = _read_all(tmp_path / "o")
    members = samples["item000"]
    assert sorted(members) == ["jpg", "json", "mask.png", "ref.jpg"]
    photo, mask = Image.open(io.BytesIO(members["jpg"])), Image.open(io.BytesIO(members["mask.png"]))
    assert photo.format == "JPEG" and photo.size == (20, 15) and mask.size == (20, 15) and mask.mode == "L"
    assert Image.open(io.BytesIO(members["ref.jpg"])).size == (20, 20)
    assert report.changes["photo resized"] == 2 and report.changes["mask resized"] == 2
    assert validate_shards(tmp_path / "o", progress=False).ok

    write_shards_from_manifest(tmp_path / "m.jsonl", tmp_path / "r", reencode=True, progress=False)
    members = _read_all(tmp_path / "r")["item001"]
    assert Image.open(io.BytesIO(members["jpg"])).format == "JPEG"
    assert (
        members["mask.png"] == (tmp_path / rows[1]["mask"]).read_bytes()
    )  # masks are never re-encoded needlessly
    with pytest.raises(InvalidInputError, match="max side"):
        write_shards_from_manifest(tmp_path / "m.jsonl", tmp_path / "x", max_side=0, progress=False)


def test_masks_in_other_encodings_are_converted_to_8bit_png(tmp_path):
    rows = _make_catalogue(tmp_path, 3)
    (tmp_path / "masks/p0.png").write_bytes(_mask(mode="RGB"))
    (tmp_path / "masks/p1.png").write_bytes(_mask(value=1))  # a 0/1 mask
    _write_jsonl(tmp_path / "m.jsonl", rows)
    _, report = write_shards_from_manifest(tmp_path / "m.jsonl", tmp_path / "o", progress=False)
    samples = _read_all(tmp_path / "o")
    expected = np.asarray(Image.open(io.BytesIO(_mask())))
    for key in ("item000", "item001"):
        stored = Image.open(io.BytesIO(samples[key]["mask.png"]))
        assert stored.mode == "L" and np.array_equal(np.asarray(stored), expected)
    assert samples["item002"]["mask.png"] == (tmp_path / "masks/p2.png").read_bytes()
    assert report.changes == {"mask converted": 2}


def test_manifest_errors_are_one_line_and_name_the_file(tmp_path):
    (tmp_path / "bad.csv").write_text("image,prompt\nx.jpg,hi\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"bad\.csv: missing column\(s\) photo, mask, reference"):
        write_shards_from_manifest(tmp_path / "bad.csv", tmp_path / "o", progress=False)
    (tmp_path / "m.txt").write_text("", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="unknown manifest type"):
        write_shards_from_manifest(tmp_path / "m.txt", tmp_path / "o", progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InvalidInputError, match="not a catalogue folder"):
        write_shards_from_manifest(tmp_path / "empty_dir", tmp_path / "o", progress=False)


def test_shards_are_readable_by_gnu_tar(tmp_path):
    index = write_shards(_samples(3), tmp_path, progress=False)
    listing = subprocess.run(
        ["tar", "-tvf", str(tmp_path / index.shards[0].name)], check=True, capture_output=True, text=True
    )
    names = [line.split()[-1] for line in listing.stdout.splitlines()]
    assert names[:4] == ["k0000.jpg", "k0000.mask.png", "k0000.ref.jpg", "k0000.json"]
    assert len(names) == 12 and not listing.stderr


KILLED_WRITER = """
import os, signal, sys
import numpy as np
from dreampainter.data.shards.format import EncodedSample
from dreampainter.data.shards.writer import write_shards

def samples():
    rng = np.random.default_rng(0)
    for i in range(10):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # die mid-shard, like an OOM kill or a pre-empted node
        yield EncodedSample(f"k{i}", rng.bytes(3000), "jpg", rng.bytes(700), rng.bytes(900), "jpg", {"prompt": "p"})

write_shards(samples(), sys.argv[1], max_samples_per_shard=2, progress=False)
"""


def test_killed_run_leaves_only_complete_shards_and_no_index(tmp_path):
    import signal
    import sys

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    names = sorted(path.name for path in out.iterdir())
    assert names == [".shard-000002.tar.partial", "shard-000000.tar", "shard-000001.tar"]
    for name in ("shard-000000.tar", "shard-000001.tar"):  # complete, end marker included
        assert len(list(iter_tar_samples(out / name))) == 2
    report = validate_shards(out, progress=False)
    assert not report.ok and report.problems[0].startswith(f"{INDEX_FILENAME} missing")
    write_shards(_samples(1), out, progress=False)  # a rerun cleans up
    assert sorted(path.name for path in out.iterdir()) == ["index.json", "shard-000000.tar"]


def test_exif_rotated_photo_is_kept_and_checked_upright(tmp_path):
    rows = _make_catalogue(tmp_path, 1)
    stored = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)  # 30 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: upright it is 40x30, the mask's size
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", exif=exif.tobytes())
    (tmp_path / "photos/p0.jpg").write_bytes(buffer.getvalue())
    _write_jsonl(tmp_path / "m.jsonl", rows)
    index, report = write_shards_from_manifest(tmp_path / "m.jsonl", tmp_path / "o", progress=False)
    assert index.num_samples == 1, report.summary()
    assert _read_all(tmp_path / "o")["item000"]["jpg"] == buffer.getvalue()
    assert validate_shards(tmp_path / "o", progress=False).ok
