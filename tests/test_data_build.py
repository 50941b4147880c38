"""``dreampainter data build``: studio masks, the toy known-scene path, filters, resume, ranks, report."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dreampainter.data.build.components import MODEL_COMPONENTS, build_component
from dreampainter.data.build.config import BuildConfig, CleanupConfig
from dreampainter.data.build.filters import find_duplicates
from dreampainter.data.build.masks import StudioSegmenter, clean_mask
from dreampainter.data.build.pipeline import build_dataset
from dreampainter.data.shards.format import ShardIndex
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.data.shards.validate import validate_shards
from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.toy.data import encode_toy_sample, make_toy_sample, sample_seed
from dreampainter.toy.product import FAMILY_ASPECT, build_product, render_product
from dreampainter.toy.scene import pixel_grid
from dreampainter.utils.config import config_from_dict, config_to_yaml, load_config

REPO = Path(__file__).resolve().parents[1]
STUDIO_BACKGROUNDS = ([245, 245, 245], [228, 231, 236], [250, 240, 225], [40, 40, 45])


def studio_photo(seed: int, res: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A toy product on a plain studio background (slight vertical gradient, sensor noise) and its true mask.

    The product's body colour differs from the backdrop (by >= 60 in some channel), as a photographer
    would choose; trims (soles, caps) may still match it."""
    rng = np.random.default_rng(seed)
    family = list(FAMILY_ASPECT)[seed % len(FAMILY_ASPECT)]
    height = rng.uniform(0.4, 0.7) * res
    width = min(rng.uniform(*FAMILY_ASPECT[family]) * height, 0.8 * res)
    background = np.array(STUDIO_BACKGROUNDS[int(rng.integers(len(STUDIO_BACKGROUNDS)))], float)
    colour = rng.uniform(20, 235, 3)
    while np.abs(colour - background).max() < 60:  # a product the backdrop was chosen to contrast with
        colour = rng.uniform(20, 235, 3)
    parts = build_product(family, rng, res / 2, 0.85 * res, width, height, colour, np.array([0.3, 0.6, 0.74]))
    x, y = pixel_grid(res)
    colour, coverage = render_product(parts, x, y)
    plain = background * (1 - 0.06 * y / res)[..., None] + rng.normal(0, 1.5, (res, res, 3))
    photo = np.clip(np.round(plain * (1 - coverage[..., None]) + colour), 0, 255).astype(np.uint8)
    return photo, coverage >= 0.5


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _studio_config(**overrides) -> BuildConfig:
    values = {"filters": {"min_side": 32}, "output": {"samples_per_chunk": 4}}
    for key, value in overrides.items():
        values.setdefault(key, {}).update(value) if isinstance(value, dict) else values.__setitem__(key, value)
    return config_from_dict(BuildConfig, values, "test")


def _studio_folder(root: Path, num: int, res: int = 96) -> Path:
    prompts = []
    for seed in range(num):
        photo, _ = studio_photo(seed, res)
        _save(photo, root / "photos" / f"p{seed:03d}.png")
        prompts.append(json.dumps({"key": f"p{seed:03d}", "prompt": f"product {seed} on a kitchen table"}))
    (root / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    return root


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    index = ShardIndex.load(out)
    return {key: members for shard in index.shards for key, members in iter_tar_samples(str(out / shard.name))}


def test_studio_segmenter_reaches_iou_095_on_plain_backgrounds():
    segmenter, cleanup = StudioSegmenter(), CleanupConfig()
    ious = []
    for seed in range(24):
        photo, truth = studio_photo(seed, 128)
        mask, confidence = segmenter.segment(photo)
        predicted = clean_mask(photo, mask, cleanup) >= 128
        ious.append((predicted & truth).sum() / (predicted | truth).sum())
        assert confidence >= 0.5
    print(f"studio IoU: mean {np.mean(ious):.3f}, min {np.min(ious):.3f}")
    assert np.mean(ious) >= 0.95 and np.min(ious) >= 0.7  # the worst: a shoe whose white sole matches the backdrop


def test_studio_segmenter_has_low_confidence_on_busy_scenes():
    scenes = [make_toy_sample(sample_seed(0, "train", i), 96) for i in range(16)]
    confidences = [StudioSegmenter().segment(scene.photo)[1] for scene in scenes]
    assert max(confidences) < 0.5  # toy scenes (textured floor, painted wall, shadows) are dropped


def test_studio_build_end_to_end_validates_and_reports(tmp_path):
    source = _studio_folder(tmp_path / "in", 6)
    report = build_dataset(source, _studio_config(), tmp_path / "out", progress=False)
    assert report is not None and report.num_inputs == 6 and report.num_kept == 6, report.table()
    assert validate_shards(tmp_path / "out", progress=False).ok
    data = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert data["num_kept"] == 6 and data["samples_per_second"] > 0
    assert (tmp_path / "out" / "contact_kept.png").is_file()
    samples = _samples(tmp_path / "out")
    assert json.loads(samples["p002"]["json"])["prompt"] == "product 2 on a kitchen table"
    reference = np.asarray(Image.open(io.BytesIO(samples["p002"]["ref.jpg"])))
    photo, truth = studio_photo(2, 96)
    # The product is gone from the reference: inside the mask it looks like the background around it.
    assert np.abs(reference[truth].astype(float).mean(0) - photo[~truth].astype(float).mean(0)).max() < 25
    assert "kept" in report.table()


TOY_CONFIG = {
    "mask": {"kind": "toy"},
    "reference": {"kind": "toy"},
    "prompt": {"kind": "toy"},
    # Keep the toy masks as they are: no component or hole rules, no soft edge.
    "cleanup": {"keep_components_above": 0.0, "small_hole_share": 0.0, "hole_background_distance": 1e9, "soft_edge": 0.0},
    "filters": {"min_side": 16, "min_sharpness": 0.0, "min_mask_share": 0.001, "max_mask_share": 0.999,
                "max_border_touch": 1.0, "duplicate_distance": -1},
    "output": {"samples_per_chunk": 3},
}  # fmt: skip


def test_toy_known_scene_path_reproduces_the_generator_exactly(tmp_path):
    expected = {}
    for index in range(5):
        key = f"toy7_train_{index:07d}"
        encoded = encode_toy_sample(make_toy_sample(sample_seed(7, "train", index), 64), key, "jpg")
        (tmp_path / "in" / "photos").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "photos" / f"{key}.jpg").write_bytes(encoded.photo)
        expected[key] = encoded.members()
    _save(studio_photo(0, 64)[0], tmp_path / "in" / "photos" / "toy7_train_0000009.png")  # not its scene
    config = config_from_dict(BuildConfig, TOY_CONFIG, "toy")
    report = build_dataset(tmp_path / "in", config, tmp_path / "out", progress=False)
    assert report.dropped_keys == [["toy7_train_0000009", "mask_low_confidence"]]
    assert _samples(tmp_path / "out") == expected  # every member byte for byte, the JSON record included
    assert validate_shards(tmp_path / "out", progress=False).ok


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def _bad_corpus(root: Path) -> dict[str, str | None]:
    """Photos (128 px studio shots unless said) with given masks and prompts; ``name -> expected drop``."""
    expected: dict[str, str | None] = {}

    def add(name: str, photo: bytes | np.ndarray, mask: np.ndarray | None, drop: str | None) -> None:
        path = root / "photos" / f"{name}.{'png' if isinstance(photo, np.ndarray) else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(photo, path) if isinstance(photo, np.ndarray) else path.write_bytes(photo)
        if mask is not None:
            _save(np.where(mask, 255, 0).astype(np.uint8), root / "masks" / f"{name}.png")
        expected[name] = drop

    photo, truth = studio_photo(1, 128)
    add("a_good", photo, truth, None)
    add("z_duplicate", _jpeg(photo), truth, "duplicate")  # the same shot re-encoded
    other, other_truth = studio_photo(2, 128)
    add("b_good", other, other_truth, None)
    tiny, tiny_truth = studio_photo(3, 40)
    add("tiny", tiny, tiny_truth, "too_small")
    blurred, blurred_truth = studio_photo(4, 128)
    add("blurred", np.asarray(Image.fromarray(blurred).filter(ImageFilter.GaussianBlur(4))), blurred_truth, "blurry")
    upright, upright_truth = studio_photo(5, 128)
    upright, upright_truth = upright[8:120], upright_truth[8:120]  # 128 x 112, not square
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; EXIF says "turn 90 degrees clockwise"
    buffer = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif)
    add("rotated_exif", buffer.getvalue(), upright_truth, None)
    cmyk, cmyk_truth = studio_photo(6, 128)
    buffer = io.BytesIO()
    Image.fromarray(cmyk).convert("CMYK").save(buffer, "JPEG", quality=95)
    add("cmyk", buffer.getvalue(), cmyk_truth, None)
    add("truncated", _jpeg(studio_photo(7, 128)[0])[:1500], truth, "undecodable")
    add("not_an_image", b"this is not a JPEG", None, "undecodable")
    big, big_truth = studio_photo(8, 400)
    add("oversized", big, big_truth, "oversized")
    cut, cut_truth = studio_photo(9, 128)
    add("cut_off", cut[:, 64:].copy(), cut_truth[:, 64:], "cut_off")
    empty, _ = studio_photo(10, 128)
    add("empty_mask", empty, np.zeros((128, 128), bool), "mask_too_small")
    full, _ = studio_photo(11, 128)
    add("full_mask", full, np.ones((128, 128), bool), "mask_too_large")
    nomask, _ = studio_photo(12, 128)
    add("no_mask", nomask, None, "missing_mask")
    prompts = [json.dumps({"key": name, "prompt": f"{name} on a shelf"}) for name in expected]
    (root / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    return expected


def test_bad_inputs_give_exactly_the_expected_drop_reasons(tmp_path):
    expected = _bad_corpus(tmp_path / "in")
    config = _studio_config(mask={"kind": "given"}, filters={"min_side": 64, "max_pixels": 100_000})
    report = build_dataset(tmp_path / "in", config, tmp_path / "out", progress=False)
    assert dict(report.dropped_keys) == {name: drop for name, drop in expected.items() if drop}
    assert report.duplicates == {"z_duplicate": "a_good"}
    kept = _samples(tmp_path / "out")
    assert sorted(kept) == sorted(name for name, drop in expected.items() if drop is None)
    rotated = Image.open(io.BytesIO(kept["rotated_exif"]["jpg"]))
    assert rotated.size == (128, 112) and rotated.getexif().get(0x0112, 1) == 1  # stored upright
    assert validate_shards(tmp_path / "out", progress=False).ok
    assert (tmp_path / "out" / "contact_dropped.png").is_file()
    counts = json.loads((tmp_path / "out" / "build_report.json").read_text())["dropped"]
    assert counts["undecodable"] == 2 and counts["duplicate"] == 1


def test_find_duplicates_matches_brute_force():
    rng = np.random.default_rng(0)
    hashes = [int(value) for value in rng.integers(0, 2**63, 200)]
    hashes += [value ^ (1 << int(bit)) ^ (1 << int(bit2)) for value, bit, bit2 in zip(hashes[:30], rng.integers(0, 64, 30), rng.integers(0, 64, 30))]
    entries = [(f"k{i}", value) for i, value in enumerate(hashes)]
    kept: list[tuple[str, int]] = []
    brute = {}
    for key, value in entries:
        match = next((k for k, v in kept if bin(v ^ value).count("1") <= 4), None)
        if match is None:
            kept.append((key, value))
        else:
            brute[key] = match
    assert find_duplicates(entries, 4) == brute and len(brute) >= 30


KILLER = """
import os, signal, sys
from dreampainter.data.build.config import BuildConfig
from dreampainter.data.build.pipeline import build_dataset
from dreampainter.data.shards.writer import ShardSetWriter
from dreampainter.utils.config import load_config

original = ShardSetWriter.write

def write(self, sample):
    if sample.key == sys.argv[4]:
        os.kill(os.getpid(), signal.SIGKILL)  # die mid-shard, like an OOM kill or a pre-empted node
    original(self, sample)

ShardSetWriter.write = write
build_dataset(sys.argv[1], load_config(BuildConfig, sys.argv[2]), sys.argv[3], progress=False)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _write_config(config: BuildConfig, path: Path) -> Path:
    path.write_text(config_to_yaml(config))
    return path


def _index_entries(out: Path) -> list[tuple[str, int, str]]:
    return [(shard.name, shard.num_samples, shard.sha256) for shard in ShardIndex.load(out).shards]


def test_sigkilled_build_resumes_to_the_same_result(tmp_path):
    source = _studio_folder(tmp_path / "in", 10, res=64)
    config = _write_config(_studio_config(), tmp_path / "build.yaml")
    build_dataset(source, load_config(BuildConfig, config), tmp_path / "whole", progress=False)

    out = tmp_path / "killed"
    script = [sys.executable, "-c", KILLER, str(source), str(config), str(out), "p005"]
    done = subprocess.run(script, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (out / "index.json").exists()
    assert sorted(path.name for path in out.glob("*.tar")) == ["shard-000000-000000.tar"]  # chunk 1 unfinished
    assert list(out.glob(".shard-000001-*.partial"))  # ... and its partial file never looks complete
    first = (out / "shard-000000-000000.tar").stat().st_mtime_ns

    report = build_dataset(source, load_config(BuildConfig, config), out, progress=False)  # the same command
    assert (out / "shard-000000-000000.tar").stat().st_mtime_ns == first  # done work is not redone
    assert _index_entries(out) == _index_entries(tmp_path / "whole")
    assert report.num_kept == 10 and not list(out.glob(".*.partial"))
    assert validate_shards(out, progress=False).ok
    with pytest.raises(InvalidInputError, match="already holds a built shard set"):
        build_dataset(source, load_config(BuildConfig, config), out, progress=False)


def test_two_processes_give_the_same_samples_as_one(tmp_path):
    source = _studio_folder(tmp_path / "in", 10, res=64)
    config = REPO / "configs" / "build_studio.yaml"  # the shipped offline config
    overrides = ["filters.min_side=32", "output.samples_per_chunk=4"]
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "dreampainter.cli", "data", "build", "--input", str(source),
                           "--config", str(config), "--out", str(one), "--quiet", *overrides],
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kept" in done.stdout and "samples/s" in done.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(port), "-m", "dreampainter.cli", "data", "build", "--input", str(source),
        "--config", str(config), "--out", str(two), "--quiet", *overrides,
    ]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "build_report.json").read_text())["num_processes"] == 2
    assert len(_samples(one)) == 10
    assert _samples(two) == _samples(one)  # the same samples, byte for byte (shard order may differ)
    done = subprocess.run([*command, "--overwrite"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # both ranks start again from scratch
    assert _samples(two) == _samples(one)
    validated = subprocess.run([sys.executable, "-m", "dreampainter.cli", "data", "validate", str(two), "--quiet"],
                               env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert validated.returncode == 0, validated.stdout[-2000:]


def test_configs_load_and_component_errors_are_one_line(monkeypatch):
    studio = load_config(BuildConfig, REPO / "configs" / "build_studio.yaml")
    assert studio.mask["kind"] == "studio" and studio.reference["kind"] == "fill" and studio.prompt["kind"] == "given"
    lifestyle = load_config(BuildConfig, REPO / "configs" / "build_lifestyle.yaml")
    assert (lifestyle.mask["kind"], lifestyle.refine["kind"], lifestyle.reference["kind"]) == ("onnx", "sam", "lama")
    assert build_component("mask", dict(studio.mask), "cpu").__class__.__name__ == "StudioSegmenter"
    with pytest.raises(InvalidInputError, match="unknown kind 'magic'"):
        build_component("mask", {"kind": "magic"}, "cpu")
    with pytest.raises(InvalidInputError, match=r"reference \(kind 'fill'\): bad options"):
        build_component("reference", {"kind": "fill", "radiuss": 3}, "cpu")
    monkeypatch.setitem(MODEL_COMPONENTS, ("mask", "onnx"), "dreampainter.data.build.models.absent:Segmenter")
    with pytest.raises(MissingFileError, match="mask.kind 'onnx': its module .* is not available"):
        build_component("mask", {"kind": "onnx", "path": "x.onnx"}, "cpu")
    with pytest.raises(InvalidInputError, match="mask.kind"):
        load_config(BuildConfig, None, ["mask.kind=none"])


def test_input_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no photos found"):
        build_dataset(tmp_path / "empty", _studio_config(), tmp_path / "out", progress=False)
    with pytest.raises(MissingFileError, match="input not found"):
        build_dataset(tmp_path / "absent", _studio_config(), tmp_path / "out", progress=False)
    (tmp_path / "m.jsonl").write_text('{"photo": "a.png", "key": "a.b"}\n')
    with pytest.raises(InvalidInputError, match=r"m.jsonl:1: sample key 'a.b'"):
        build_dataset(tmp_path / "m.jsonl", _studio_config(), tmp_path / "out", progress=False)


def test_cleanup_keeps_background_holes_open_and_fills_product_holes():
    photo = np.full((120, 120, 3), 240, np.uint8)
    yy, xx = np.mgrid[0:120, 0:120]
    ring = (np.hypot(yy - 60, xx - 60) < 40) & (np.hypot(yy - 60, xx - 60) >= 22)  # a ring: its middle is backdrop
    photo[ring] = (200, 40, 40)
    label = (np.abs(yy - 60) < 3) & (np.abs(xx - 30) < 5)  # a dark label the segmenter missed: product colour
    photo[label] = (20, 20, 20)
    mask = np.where(ring & ~label, 255, 0).astype(np.uint8)
    mask[100:102, 100:102] = 255  # a speck: dropped with the components rule
    config = CleanupConfig(soft_edge=0.0, small_hole_share=0.0)
    cleaned = clean_mask(photo, mask, config) >= 128
    assert not cleaned[60, 60]  # the ring's middle shows the backdrop: stays open
    assert cleaned[label].all()  # the label's colour is not the backdrop's: filled
    assert not cleaned[100:102, 100:102].any()
    tiny = np.where(ring, 255, 0).astype(np.uint8)
    tiny[60, 35] = 0  # a one-pixel hole of backdrop colour? under small_hole_share: filled
    photo[60, 35] = 240
    assert clean_mask(photo, tiny, CleanupConfig(soft_edge=0.0))[60, 35] == 255


class FakeCaptioner:
    """Captions the reference with its mean colour, so tests can see that the REFERENCE was captioned."""

    def __init__(self, word: str = "plain", device: str = "cpu") -> None:
        self.word = word

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        return [f"a {self.word} backdrop of level {int(image.mean()) // 50}" for image in images]


class FakeTranslator:
    def __init__(self, device: str = "cpu") -> None:
        pass

    def __call__(self, texts: list[str]) -> list[str]:
        return [f"ZH:{text}" for text in texts]


def test_manifest_rgba_cutouts_captioner_and_translator(tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_COMPONENTS, ("prompt", "blip"), "test_data_build:FakeCaptioner")
    monkeypatch.setitem(MODEL_COMPONENTS, ("translate", "marian"), "test_data_build:FakeTranslator")
    rows = []
    for seed in range(3):
        photo, truth = studio_photo(seed, 96)
        rgba = np.dstack([photo, np.where(truth, 255, 0).astype(np.uint8)])  # a cut-out: alpha = product
        _save(rgba, tmp_path / "in" / f"cut{seed}.png")
        rows.append({"photo": f"cut{seed}.png", "key": f"sku-{seed}", "category": "bottle", "sku": seed})
    rows[1]["prompt_zh"] = "given"
    manifest = tmp_path / "in" / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    config = _studio_config(mask={"kind": "given"}, prompt={"kind": "blip", "word": "studio"},
                            translate={"kind": "marian"}, prompt_template="a {category} in front of {caption}")  # fmt: skip
    report = build_dataset(manifest, config, tmp_path / "out", progress=False)
    assert report.num_kept == 3, report.dropped_keys
    samples = _samples(tmp_path / "out")
    meta = json.loads(samples["sku-0"]["json"])
    # the reference of a cut-out composited on white is white: level 5 (>= 250)
    assert meta["prompt"] == "a bottle in front of a studio backdrop of level 5"
    assert meta["prompt_zh"] == "ZH:" + meta["prompt"] and meta["sku"] == 0
    assert json.loads(samples["sku-1"]["json"])["prompt_zh"] == "given"
    mask = np.asarray(Image.open(io.BytesIO(samples["sku-0"]["mask.png"])))
    assert ((mask >= 128) == studio_photo(0, 96)[1]).mean() > 0.99
    assert validate_shards(tmp_path / "out", progress=False).ok

    # The built set is an input too: re-filter it with everything given.
    again = _studio_config(mask={"kind": "given"}, reference={"kind": "given"})
    report = build_dataset(tmp_path / "out", again, tmp_path / "again", progress=False)
    assert report.num_kept == 3 and _samples(tmp_path / "again").keys() == samples.keys()
