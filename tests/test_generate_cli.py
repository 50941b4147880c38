"""`dreampainter generate` on a tiny saved pipeline: single jobs, JSONL batches, odd inputs, one-line errors."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from importlib.metadata import entry_points

import numpy as np
import pytest
from PIL import Image

from dreampainter import cli
from dreampainter.cli import main
from dreampainter.toy.pipeline import build_tiny_pipeline


@pytest.fixture(autouse=True)
def _only_generate(monkeypatch):
    """Parse with the generate command alone, so these tests do not depend on other commands' modules."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["generate"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    build_tiny_pipeline(root / "tokenizer").save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    mask = np.zeros((30, 44), np.uint8)
    mask[8:22, 12:30] = 255
    Image.fromarray(photo).save(root / "photo.png")
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray((mask > 0).astype(np.uint8)).save(root / "mask01.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(root / "ref.jpg")
    Image.fromarray(np.dstack([photo, mask])).save(root / "cutout.png")
    Image.fromarray(photo).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.dstack([photo, np.full_like(mask, 255)])).save(root / "opaque.png")
    Image.fromarray(mask[:, :40]).save(root / "small_mask.png")
    Image.fromarray(np.zeros_like(mask)).save(root / "empty_mask.png")
    Image.fromarray(np.full_like(mask, 255)).save(root / "full_mask.png")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    (root / "bomb.png").write_bytes(_bomb_png(40000, 40000))
    return root


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _generate(files, *args: str) -> int:
    return main(["generate", "--pipeline", str(files / "pipe"), "--steps", "2", *args])


def test_single_job_writes_results_and_grid(files, tmp_path):
    code = _generate(
        files,
        "--image",
        str(files / "photo.png"),
        "--mask",
        str(files / "mask.png"),
        "--prompt",
        "a marble table",
        "--reference",
        str(files / "ref.jpg"),
        "--num",
        "2",
        "--text-guidance",
        "5",
        "--reference-guidance",
        "3",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0
    results = [Image.open(tmp_path / "out" / f"photo_{k}.png") for k in range(2)]
    assert all(result.size == (44, 30) for result in results)
    assert not np.array_equal(np.asarray(results[0]), np.asarray(results[1]))
    product = np.asarray(Image.open(files / "mask.png")) == 255
    original = np.asarray(Image.open(files / "photo.png"))
    assert (np.asarray(results[0])[product] == original[product]).all()
    grid = Image.open(tmp_path / "out" / "photo_grid.png")
    # input, mask, reference (50x40 -> 24 px wide at height 30), two results, side by side with 4 px gaps
    assert grid.size == (4 + 5 * (44 + 4), 4 + 14 + 44 + 4)  # five 44 px labelled square tiles


def test_rgba_cutout_without_mask_or_reference_to_an_image_path(files, tmp_path):
    code = _generate(
        files, "--image", str(files / "cutout.png"), "--prompt", "a beach", "--out", str(tmp_path / "r.png")
    )
    assert code == 0
    assert Image.open(tmp_path / "r.png").size == (44, 30)
    assert (tmp_path / "r_grid.png").is_file()


def test_cmyk_photo_with_a_zero_one_mask(files, tmp_path):
    code = _generate(
        files,
        "--image",
        str(files / "cmyk.jpg"),
        "--mask",
        str(files / "mask01.png"),
        "--prompt",
        "a kitchen",
        "--out",
        str(tmp_path),
    )
    assert code == 0
    assert Image.open(tmp_path / "cmyk_0.png").mode == "RGB"


def test_batch_mode_matches_single_jobs(files, tmp_path):
    jobs = files / "jobs.jsonl"
    jobs.write_text(
        json.dumps(
            {"image": "photo.png", "mask": "mask.png", "prompt": "a loft", "reference": "ref.jpg", "seed": 3}
        )
        + "\n\n"
        + json.dumps({"image": "cutout.png", "prompt": "a garden", "name": "second", "num": 2})
        + "\n"
    )
    assert _generate(files, "--batch", str(jobs), "--out", str(tmp_path / "batch")) == 0
    written = sorted(path.name for path in (tmp_path / "batch").iterdir())
    assert written == ["photo_0.png", "photo_grid.png", "second_0.png", "second_1.png", "second_grid.png"]
    single = tmp_path / "single.png"
    args = ["--image", str(files / "photo.png"), "--mask", str(files / "mask.png"), "--prompt", "a loft"]
    assert (
        _generate(files, *args, "--reference", str(files / "ref.jpg"), "--seed", "3", "--out", str(single))
        == 0
    )
    assert np.array_equal(
        np.asarray(Image.open(single)), np.asarray(Image.open(tmp_path / "batch" / "photo_0.png"))
    )


def _bad_jsonl(files, content: str) -> str:
    path = files / "bad_jobs.jsonl"
    path.write_text(content)
    return str(path)


BAD_CASES = {
    "missing image": (["--image", "{f}/nope.png", "--mask", "{f}/mask.png"], "image: file not found"),
    "undecodable image": (
        ["--image", "{f}/broken.png", "--mask", "{f}/mask.png"],
        "broken.png: not a decodable image",
    ),
    "mask size": (
        ["--image", "{f}/photo.png", "--mask", "{f}/small_mask.png"],
        "mask is 40x30 but .*photo.png is 44x30",
    ),
    "empty mask": (["--image", "{f}/photo.png", "--mask", "{f}/empty_mask.png"], "product mask is empty"),
    "full mask": (["--image", "{f}/photo.png", "--mask", "{f}/full_mask.png"], "covers the whole image"),
    "opaque rgba": (["--image", "{f}/opaque.png"], "fully opaque alpha"),
    "rgb without mask": (["--image", "{f}/photo.png"], "mask: required for the RGB"),
    "zero steps": (["--image", "{f}/cutout.png", "--steps", "0"], "--steps: must be a positive integer"),
    "nan guidance": (
        ["--image", "{f}/cutout.png", "--text-guidance", "nan"],
        "--text-guidance: must be a finite",
    ),
    "negative ref guidance": (
        ["--image", "{f}/cutout.png", "--reference-guidance", "-2"],
        "--reference-guidance: must be a finite number >= 0",
    ),
    "pixel limit": (["--image", "{f}/cutout.png", "--max-pixels", "100"], "over the (pixel )?limit of 100"),
    "decompression bomb": (
        ["--image", "{f}/bomb.png", "--mask", "{f}/mask.png"],
        "bomb.png: image is .*pixels",
    ),
    "missing reference": (
        ["--image", "{f}/cutout.png", "--reference", "{f}/nope.jpg"],
        "reference: file not found",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_exit_2_with_one_line(files, tmp_path, capsys, case):
    args, message = BAD_CASES[case]
    args = [arg.format(f=files) for arg in args]
    code = _generate(files, *args, "--prompt", "a room", "--out", str(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err  # inputs are checked before the pipeline loads
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"image": "photo.png", "mask": "mask.png", "prompt": "x"}\n{"image": "photo.png"\n',
            r"bad_jobs.jsonl:2: invalid JSON",
        ),
        ('{"image": "photo.png", "mask": "mask.png"}\n', r"bad_jobs.jsonl:1: missing config key 'prompt'"),
        ('{"image": "photo.png", "prompt": "x", "colour": 1}\n', r"bad_jobs.jsonl:1: unknown config key 'colour'"),
        (
            '{"image": "photo.png", "prompt": "x", "num_inference_steps": -1}\n',
            r"bad_jobs.jsonl:1: bad value for 'num_inference_steps' \(must be a positive integer",
        ),
        (
            '{"image": "photo.png", "prompt": "x", "steps": 3}\n',
            r"bad_jobs.jsonl:1: unknown config key 'steps' \(renamed: use 'num_inference_steps'\)",
        ),
        (
            '{"image": "photo.png", "prompt": "x", "text_guidance_scale": "lots"}\n',
            r"bad_jobs.jsonl:1: bad value for 'text_guidance_scale' \(Value 'lots'",
        ),
        ('{"image": "nope.png", "prompt": "x"}\n', r"bad_jobs.jsonl:1: image: file not found"),
        ('{"image": "cutout.png", "prompt": "x"}\n{"image": "cutout.png", "prompt": "y"}\n', r"same files"),
        ("\n", r"no jobs"),
    ],
)
def test_bad_jsonl_batches_name_the_line(files, tmp_path, capsys, content, message):
    code = _generate(files, "--batch", _bad_jsonl(files, content), "--out", str(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert re.search(message, err), err


def test_generate_is_registered_in_the_console_script():
    """The installed ``dreampainter`` entry point lists ``generate`` and its help runs (a fresh process,
    so this file's narrowing of the command list plays no part)."""
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == "dreampainter"]
    assert entry.value == "dreampainter.cli:main"
    listing = subprocess.run([sys.executable, "-m", "dreampainter.cli", "--help"], capture_output=True, text=True)
    assert listing.returncode == 0 and "generate" in listing.stdout
    usage = subprocess.run(
        [sys.executable, "-m", "dreampainter.cli", "generate", "--help"], capture_output=True, text=True
    )
    assert usage.returncode == 0 and "--pipeline" in usage.stdout and "--reference" in usage.stdout


def test_missing_pipeline_and_conflicting_arguments(files, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--pipeline",
            str(tmp_path / "none"),
            "--image",
            str(files / "cutout.png"),
            "--prompt",
            "x",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2 and "model_index.json" in capsys.readouterr().err
    code = _generate(
        files,
        "--batch",
        str(files / "jobs.jsonl"),
        "--image",
        str(files / "photo.png"),
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "cannot be combined with --image" in capsys.readouterr().err
    code = _generate(files, "--image", str(files / "photo.png"), "--out", str(tmp_path))
    assert code == 2 and "--prompt: required" in capsys.readouterr().err


def test_sdxl_pipeline_takes_second_prompts_and_sd_refuses_them(files, tmp_path, capsys):
    """On an SDXL pipeline --prompt-2 / --negative-prompt-2 reach the second text encoder (and change the
    result); the JSONL form gives the same image; an SD pipeline refuses them in one line."""
    build_tiny_pipeline(tmp_path / "tokenizer", backbone="sdxl").save_pretrained(tmp_path / "xl")
    common = ["--pipeline", str(tmp_path / "xl"), "--steps", "2", "--resolution", "64", "--image",
              str(files / "photo.png"), "--mask", str(files / "mask.png"), "--prompt", "a marble table"]  # fmt: skip
    assert main(["generate", *common, "--out", str(tmp_path / "plain.png")]) == 0
    second = ["--prompt-2", "a wooden floor", "--negative-prompt", "dark", "--negative-prompt-2", "blurry"]
    assert main(["generate", *common, *second, "--out", str(tmp_path / "second.png")]) == 0
    plain, with_second = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "second"))
    assert plain.shape == (30, 44, 3) and not np.array_equal(plain, with_second)

    job = {"image": str(files / "photo.png"), "mask": str(files / "mask.png"), "prompt": "a marble table",
           "prompt_2": "a wooden floor", "negative_prompt": "dark", "negative_prompt_2": "blurry"}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    assert main(["generate", "--pipeline", str(tmp_path / "xl"), "--steps", "2", "--resolution", "64",
                 "--batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "batch.png")]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "batch.png")), with_second)

    capsys.readouterr()
    code = _generate(files, "--image", str(files / "photo.png"), "--mask", str(files / "mask.png"), "--prompt",
                     "a", "--prompt-2", "b", "--out", str(tmp_path / "sd.png"))  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "prompt_2: only SDXL" in error[0]
