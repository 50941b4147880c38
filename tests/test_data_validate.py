"""Shard validator, tar reader and the ``dreampainter data`` CLI, on real tar files in tmp_path."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from dreampainter import cli
from dreampainter.data.shards.format import INDEX_FILENAME, EncodedSample, ShardIndex
from dreampainter.data.shards.tar import TarFormatError, TruncatedTarError, iter_tar_samples, member_bytes
from dreampainter.data.shards.validate import validate_shards
from dreampainter.data.shards.writer import index_shards, write_shards
from dreampainter.errors import InvalidInputError, MissingFileError


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _photo(seed: int, size=(32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "JPEG")


def _mask_array(size=(32, 24), value=255) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[6:18, 8:24] = value
    return mask


def _sample(i: int, **changes) -> EncodedSample:
    fields = dict(
        key=f"s{i:03d}",
        photo=_photo(i),
        photo_ext="jpg",
        mask=_encode(_mask_array(), "PNG"),
        reference=_photo(100 + i, size=(16, 16)),
        reference_ext="jpg",
        meta={"prompt": f"a red cup number {i}", "prompt_zh": "红色杯子"},
    )
    fields.update(changes)
    return EncodedSample(**fields)


def _write(folder, samples, per_shard=3) -> ShardIndex:
    return write_shards(samples, folder, max_samples_per_shard=per_shard, progress=False)


def _bad(report) -> dict[str, str]:
    return {bad.key: "; ".join(bad.reasons) for bad in report.bad_samples}


def test_clean_set_validates(tmp_path):
    _write(tmp_path, [_sample(i) for i in range(7)])
    for source in (tmp_path, tmp_path / INDEX_FILENAME):
        report = validate_shards(source, progress=False)
        assert report.ok, report.summary()
        assert (report.num_shards, report.num_samples, report.index_found) == (3, 7, True)
    assert validate_shards(tmp_path / "shard-000001.tar", progress=False).num_samples == 3


def test_bad_samples_are_named_with_reasons(tmp_path):
    full = _mask_array(value=255)
    full[:] = 255
    gradient = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))
    samples = [
        _sample(0),
        _sample(1, photo=_photo(1)[:-200]),  # truncated JPEG
        _sample(2, mask=_encode(_mask_array(size=(30, 24)), "PNG")),  # wrong mask size
        _sample(3, meta={"prompt": ""}),
        _sample(4, mask=_encode(_mask_array(value=0), "PNG")),  # empty mask
        _sample(5, mask=_encode(full, "PNG")),  # full mask
        _sample(6, mask=_encode(gradient, "PNG")),  # soft, not near-binary
        _sample(7, mask=_encode(np.stack([_mask_array()] * 3, -1), "PNG")),  # RGB mask
        _sample(8, meta={"prompt_zh": "只有中文"}),
        _sample(9, reference=b"GIF89a garbage"),
    ]
    _write(tmp_path, samples)
    report = validate_shards(tmp_path, progress=False)
    bad = _bad(report)
    assert not report.ok and report.num_samples == 10 and not report.problems
    assert sorted(bad) == [f"s{i:03d}" for i in range(1, 10)]
    assert "image file is truncated" in bad["s001"]
    assert bad["s002"] == "mask is 30x24 but the photo is 32x24"
    assert bad["s003"] == "empty prompt"
    assert bad["s004"].startswith("mask is empty")
    assert bad["s005"].startswith("mask is full")
    assert bad["s006"].startswith("mask is not near-binary")
    assert bad["s007"] == "s007.mask.png: not an 8-bit single-channel PNG (PNG, mode RGB)"
    assert bad["s008"] == "prompt missing"
    assert bad["s009"] == "s009.ref.jpg: not a decodable image"
    assert "FAILED" in report.summary() and "s002: mask is 30x24" in report.summary()


def test_truncated_jpeg_is_caught_even_when_pil_is_lenient(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _write(tmp_path, [_sample(0), _sample(1, photo=_photo(1)[:-200])])
    assert list(_bad(validate_shards(tmp_path, progress=False))) == ["s001"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def _tar(members: list[tuple[str, bytes]], end: bool = True) -> bytes:
    return b"".join(member_bytes(name, data) for name, data in members) + (b"\0" * 1024 if end else b"")


def _members(sample: EncodedSample, skip: str | None = None) -> list[tuple[str, bytes]]:
    return [(f"{sample.key}.{suffix}", data) for suffix, data in sample.members().items() if suffix != skip]


def test_missing_member_and_duplicate_key(tmp_path):
    (tmp_path / "a.tar").write_bytes(_tar(_members(_sample(0)) + _members(_sample(1), skip="json")))
    (tmp_path / "b.tar").write_bytes(_tar(_members(_sample(0)) + _members(_sample(2), skip="mask.png")))
    report = validate_shards(tmp_path, progress=False)
    assert report.problems == [
        f"{INDEX_FILENAME} missing in {tmp_path}: sample counts and checksums not checked"
    ]
    assert [str(bad) for bad in report.bad_samples] == [
        "a.tar s001: missing member s001.json (the prompt record)",
        "b.tar s002: missing member s002.mask.png (the product mask)",
        "b.tar s000: duplicate key (also in a.tar)",
    ]


def test_truncated_tar_and_index_mismatches(tmp_path):
    index = _write(tmp_path, [_sample(i) for i in range(6)])
    first = tmp_path / index.shards[0].name
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # cut inside the second sample
    report = validate_shards(tmp_path, progress=False)
    assert not report.ok
    assert any("truncated tar" in problem for problem in report.problems)
    assert "shard-000000.tar: 1 samples, index says 3" in report.problems
    assert any(problem.startswith("shard-000000.tar: sha256 mismatch") for problem in report.problems)
    assert _bad(report) == {"s001": "incomplete: the shard ends inside it"}

    # same length, one changed byte in a prompt: only the checksum can tell
    second = tmp_path / index.shards[1].name
    second.write_bytes(second.read_bytes().replace(b"a red cup number 4", b"a red cap number 4"))
    (tmp_path / "stray.tar").write_bytes(_tar(_members(_sample(50))))
    (tmp_path / index.shards[0].name).unlink()
    problems = validate_shards(tmp_path, progress=False).problems
    assert problems[0] == f"stray.tar: on disk but not in {INDEX_FILENAME}"
    assert f"shard-000000.tar: listed in {INDEX_FILENAME} but missing on disk" in problems
    assert any(problem.startswith("shard-000001.tar: sha256 mismatch") for problem in problems)
    assert not any(problem.startswith("shard-000001.tar: 3 samples") for problem in problems)


def test_parallel_validation_gives_the_same_report(tmp_path):
    _write(tmp_path, [_sample(i) for i in range(5)] + [_sample(5, meta={"prompt": " "})], per_shard=2)
    one = validate_shards(tmp_path, progress=False)
    two = validate_shards(tmp_path, progress=False, workers=2)
    assert one == two and _bad(two) == {"s005": "empty prompt"}


# ----------------------------------------------------------------------------- tar reader


def test_reader_groups_members_and_reports_truncation(tmp_path):
    samples = [_sample(0), _sample(1)]
    complete = _tar(_members(samples[0]) + _members(samples[1]))
    got = list(iter_tar_samples(io.BytesIO(complete)))
    assert [key for key, _ in got] == ["s000", "s001"]
    assert got[1][1] == {suffix: data for suffix, data in samples[1].members().items()}

    no_end = _tar(_members(samples[0]) + _members(samples[1]), end=False)  # cut at a member boundary
    reader = iter_tar_samples(io.BytesIO(no_end), name="cut.tar")
    assert next(reader)[0] == "s000"
    with pytest.raises(
        TruncatedTarError, match="cut.tar: truncated tar: ends without its end-of-archive marker"
    ) as info:
        next(reader)
    assert info.value.pending_key == "s001"

    with pytest.raises(TruncatedTarError, match="declares"):
        list(iter_tar_samples(io.BytesIO(complete[:1500])))
    with pytest.raises(TarFormatError, match="checksum mismatch"):
        list(iter_tar_samples(io.BytesIO(b"x" * 5000)))
    with pytest.raises(TruncatedTarError):
        list(iter_tar_samples(io.BytesIO(b"")))


def test_reader_handles_gnu_tar_long_names_and_pipes(tmp_path):
    import webdataset as wds

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    long_key = "k" * 120  # beyond the 100-byte ustar name field
    for key in ("a1", long_key):
        for suffix, data in _sample(0, key=key).members().items():
            (src / "sub" / f"{key}.{suffix}").write_bytes(data)
    for fmt in ("gnu", "posix"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(
            ["tar", f"--format={fmt}", "--sort=name", "-cf", str(out), "-C", str(src), "."], check=True
        )
        keys = [key for key, _ in iter_tar_samples(out)]
        assert keys == ["./sub/a1", f"./sub/{long_key}"]  # WebDataset's keys: "./" stays, as in the loader
        assert keys == [s["__key__"] for s in wds.WebDataset(str(out), shardshuffle=False, empty_check=False)]
    stream = subprocess.Popen(["cat", str(tmp_path / "gnu.tar")], stdout=subprocess.PIPE)
    assert len(list(iter_tar_samples(stream.stdout))) == 2
    stream.wait()


def test_shards_from_standard_tools_validate(tmp_path):
    import webdataset as wds

    wds_dir = tmp_path / "wds"
    wds_dir.mkdir()
    with wds.ShardWriter(str(wds_dir / "part-%06d.tar"), maxcount=2, verbose=0) as sink:
        for i in range(3):
            sample = _sample(i, meta={"prompt": "" if i == 2 else f"cup {i}"})
            sink.write({"__key__": sample.key, **sample.members()})
    report = validate_shards(wds_dir, progress=False)
    assert (report.num_shards, report.num_samples, report.index_found) == (2, 3, False)
    assert _bad(report) == {"s002": "empty prompt"}
    assert report.problems[0].startswith(f"{INDEX_FILENAME} missing")
    index = index_shards(wds_dir, progress=False)
    assert [(shard.name, shard.num_samples) for shard in index.shards] == [
        ("part-000000.tar", 2),
        ("part-000001.tar", 1),
    ]
    report = validate_shards(wds_dir, progress=False)
    assert report.index_found and not report.problems and _bad(report) == {"s002": "empty prompt"}
    with pytest.raises(InvalidInputError, match="already exists"):
        index_shards(wds_dir, progress=False)
    data = (wds_dir / "part-000000.tar").read_bytes()
    (wds_dir / "part-000000.tar").write_bytes(data[:3000])
    with pytest.raises(InvalidInputError, match="cannot index part-000000.tar: .*truncated tar"):
        index_shards(wds_dir, progress=False, overwrite=True)

    files = tmp_path / "files"
    files.mkdir()
    for i in range(2):
        for suffix, data in _sample(i).members().items():
            (files / f"s{i:03d}.{suffix}").write_bytes(data)
    names = sorted(path.name for path in files.iterdir())
    (tmp_path / "plain").mkdir()
    subprocess.run(["tar", "-cf", str(tmp_path / "plain/a.tar"), "-C", str(files), *names], check=True)
    report = validate_shards(tmp_path / "plain", progress=False)
    assert report.num_samples == 2 and not report.bad_samples

    # and our shards are readable by webdataset itself
    _write(tmp_path / "ours", [_sample(i) for i in range(2)])
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "ours/shard-000000.tar"), shardshuffle=False)]
    assert keys == ["s000", "s001"]


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``dreampainter.cli.main`` with the command modules that exist so far (others land in parallel)."""
    assert "data" in cli.COMMAND_MODULES
    present = [
        name for name in cli.COMMAND_MODULES if importlib.util.find_spec(f"dreampainter.commands.{name}")
    ]
    monkeypatch.setattr(cli, "COMMAND_MODULES", present)

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _catalogue(root, num=3, empty_prompt_row=None) -> None:
    root.mkdir()
    lines = []
    for i in range(num):
        sample = _sample(i)
        (root / f"{i}.jpg").write_bytes(sample.photo)
        (root / f"{i}.png").write_bytes(sample.mask)
        (root / f"{i}.ref.jpg").write_bytes(sample.reference)
        prompt = "" if i == empty_prompt_row else f"cup {i}"
        lines.append(
            json.dumps(
                {"photo": f"{i}.jpg", "mask": f"{i}.png", "reference": f"{i}.ref.jpg", "prompt": prompt}
            )
        )
    (root / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_cli_write_and_validate(tmp_path, run_cli):
    _catalogue(tmp_path / "cat", empty_prompt_row=1)
    code, out, err = run_cli(
        "data",
        "write-shards",
        str(tmp_path / "cat/m.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
        "--samples-per-shard",
        "1",
        "--workers",
        "2",
    )
    assert code == 0, err
    assert "3 rows, 2 samples written to 2 shards" in out and "m.jsonl:2: empty prompt" in out

    code, out, _ = run_cli("data", "validate", str(tmp_path / "o"), "--quiet")
    assert code == 0 and out.strip().endswith("OK")

    (tmp_path / "o/shard-000001.tar").write_bytes(b"\0" * 100)
    code, out, _ = run_cli("data", "validate", str(tmp_path / "o/index.json"), "--quiet")
    assert code == 1 and "truncated tar" in out and out.strip().endswith("FAILED")


def test_cli_errors_are_one_line(tmp_path, run_cli):
    _catalogue(tmp_path / "cat", empty_prompt_row=1)
    cases = [
        (
            ["data", "validate", str(tmp_path / "nope")],
            f"error: shard folder or index not found: {tmp_path / 'nope'}",
        ),
        (
            [
                "data",
                "write-shards",
                str(tmp_path / "cat/m.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--on-error",
                "fail",
            ],
            "error: m.jsonl:2: empty prompt",
        ),
        (
            [
                "data",
                "write-shards",
                str(tmp_path / "cat/m.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--samples-per-shard",
                "0",
            ],
            "error: samples per shard: must be a positive integer, got 0",
        ),
        (
            ["data", "write-shards", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
            f"error: manifest not found: {tmp_path / 'missing.jsonl'}",
        ),
    ]
    for argv, message in cases:
        code, _, err = run_cli(*argv, "--quiet")
        assert code == 2
        assert err.strip() == message


def test_cli_toy_calls_the_generator(tmp_path, run_cli, monkeypatch):
    calls = []
    fake = types.ModuleType("dreampainter.toy.data")
    fake.write_toy_dataset = lambda out_dir, **kwargs: calls.append((out_dir, kwargs))
    monkeypatch.setitem(sys.modules, "dreampainter.toy.data", fake)
    code, out, _ = run_cli(
        "data", "toy", "--out", str(tmp_path), "--num", "12", "--seed", "3", "--workers", "2"
    )
    assert code == 0 and calls == [(str(tmp_path), {"num": 12, "seed": 3, "resolution": 128, "workers": 2})]


def test_duplicate_member_and_sample_records(tmp_path):
    sample = _sample(0)
    members = _members(sample)
    (tmp_path / "dup.tar").write_bytes(_tar(members + [members[-1]] + _members(_sample(1))))
    with pytest.raises(TarFormatError, match="member s000.json appears twice in sample s000"):
        list(iter_tar_samples(tmp_path / "dup.tar"))
    report = validate_shards(tmp_path / "dup.tar", progress=False)
    assert report.num_samples == 0 and "appears twice" in report.problems[0]
    assert _bad(report) == {"s000": "unreadable: the tar is corrupt there"}

    key, group = next(iter_tar_samples(io.BytesIO(_tar(members))))
    assert EncodedSample.from_members(key, group) == sample
    del group["ref.jpg"]
    with pytest.raises(InvalidInputError, match=r"sample s000: missing member s000\.ref\.jpg\|png\|webp"):
        EncodedSample.from_members(key, group)


def test_nested_split_folders_get_a_hint(tmp_path):
    _write(tmp_path / "train", [_sample(0)])
    with pytest.raises(
        MissingFileError, match=r"no index.json and no .tar shards in .* \(sub-folders with an index: train\)"
    ):
        validate_shards(tmp_path, progress=False)
