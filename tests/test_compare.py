"""``dreampainter compare``: tiny systems of every kind on the toy bench split, the table equals the per-system
runner's, reference_paste beats a random pipeline on reference fidelity, the paired statistics on known
examples, one-line errors for bad systems files, 1 vs 2 processes (a real ``accelerate launch``)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from training_utils import REPO, accelerate_launch

from dreampainter.cli import main
from dreampainter.evaluation.paired_stats import bootstrap_interval, paired_comparison, sign_test
from dreampainter.toy.backbones import write_tiny_backbones
from dreampainter.toy.data import write_toy_dataset

LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
NUM_SAMPLES = 10
SYSTEMS = ["dp", "sd", "sd_ip", "broken", "paste", "copy"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import StableDiffusionInpaintPipeline

    from dreampainter.models import export_ip_adapter
    from dreampainter.toy.models import (
        build_tiny_scheduler,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_tiny_vae,
        write_tiny_clip_vision_folder,
    )
    from dreampainter.toy.pipeline import build_tiny_pipeline

    root = tmp_path_factory.mktemp("compare")
    write_toy_dataset(root / "toy", num=NUM_SAMPLES, seed=0, resolution=32, splits={"bench": 1.0}, progress=False)
    pipe = build_tiny_pipeline(root / "tokenizer", reference=True)
    pipe.save_pretrained(root / "dp")
    StableDiffusionInpaintPipeline(
        vae=build_tiny_vae(), text_encoder=build_tiny_text_encoder(), tokenizer=pipe.tokenizer,
        unet=build_tiny_unet(seed=1), scheduler=build_tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(root / "sd")  # fmt: skip
    export_ip_adapter(pipe.unet, root / "ip" / "ip_adapter.safetensors")
    write_tiny_clip_vision_folder(root / "image_encoder")
    shutil.copytree(root / "dp", root / "broken")  # present but not loadable: reported and skipped
    (root / "broken" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")

    config = yaml.safe_load((REPO / "configs" / "eval_toy.yaml").read_text())
    config["evaluation"]["backbones"] = write_tiny_backbones(root / "backbones")
    config["evaluation"]["backbones"]["dino"]["path"] = str(root / "absent" / "dino.safetensors")
    config["evaluation"]["feature_cache"] = str(root / "cache")
    config["benchmark"].update(num_inference_steps=2, batch_size=3, contact_count=2, controls=[])
    (root / "eval.yaml").write_text(yaml.safe_dump(config))
    systems = {
        "base": "eval.yaml",
        "comparison": {"reference_system": "dp", "bootstrap_resamples": 500},
        "systems": {
            "dp": {"kind": "dreampainter", "pipeline": str(root / "dp")},
            "sd": {"kind": "diffusers_inpaint", "pipeline": str(root / "sd")},
            "sd_ip": {
                "kind": "diffusers_ip_adapter", "pipeline": str(root / "sd"), "reference_scale": 0.8,
                "ip_adapter": str(root / "ip" / "ip_adapter.safetensors"), "image_encoder": str(root / "image_encoder"),
            },  # fmt: skip
            "broken": {"kind": "dreampainter", "pipeline": str(root / "broken")},
            "paste": {"kind": "reference_paste"},
            "copy": {"kind": "copy_input"},
        },
    }
    (root / "systems.yaml").write_text(yaml.safe_dump(systems, sort_keys=False))
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--systems", str(root / "systems.yaml"), "--data", str(root / "toy" / "bench"), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def one_process(setup):
    out = setup / "one"
    assert main(["compare", *_args(setup, out)]) == 0
    return out, json.loads((out / "comparison.json").read_text())


def _rows(comparison: dict) -> dict[str, dict]:
    return {row["name"]: row for row in comparison["systems"]}


def test_every_kind_runs_on_the_same_samples_and_the_broken_one_is_skipped(one_process):
    out, comparison = one_process
    rows = _rows(comparison)
    assert list(rows) == SYSTEMS
    assert rows["broken"]["status"] == "failed" and "broken" in rows["broken"]["error"]
    for name in ("dp", "sd", "sd_ip", "paste", "copy"):
        row = rows[name]
        assert row["status"] == "ok" and row["samples"] == NUM_SAMPLES, name
        assert row["values"]["composite_change_max"] == 0  # the product is pasted back exactly
        assert "dino" in row["skipped"] and "absent" in row["skipped"]["dino"] and "dino" not in row["values"]
        report = json.loads((out / "systems" / name / "metrics.json").read_text())
        assert report["runs"][0]["values"] == row["values"] and report["config"]["benchmark"]["controls"] == []
        assert len(list((out / "systems" / name / "images" / "main").glob("*.png"))) == NUM_SAMPLES
    assert rows["copy"]["values"]["fid"] == pytest.approx(0.0, abs=1e-6)  # the split's own photos
    assert rows["copy"]["values"]["psnr"] == 100  # the product untouched before compositing
    assert not rows["copy"]["ranked"] and rows["paste"]["ranked"]
    for name in ("sd", "sd_ip"):  # the diffusers systems generate, and differently with the reference
        assert rows[name]["values"]["bg_delta_e"] != rows["paste"]["values"]["bg_delta_e"]
    assert rows["sd"]["values"]["bg_emd"] != rows["sd_ip"]["values"]["bg_emd"]

    metrics = {entry["name"]: entry for entry in comparison["metrics"]}
    assert metrics["bg_delta_e"]["higher_is_better"] is False and metrics["clip_i"]["higher_is_better"] is True
    ranked = {name: rows[name]["values"]["bg_delta_e"] for name in ("dp", "sd", "sd_ip", "paste")}
    assert metrics["bg_delta_e"]["best"] == [min(ranked, key=ranked.get)]
    assert "best" not in metrics["kid_std"]  # no direction: not ranked
    markdown = (out / "comparison.md").read_text()
    best = metrics["bg_delta_e"]["best"][0]
    assert f"**{rows[best]['values']['bg_delta_e']:.4g}**" in markdown and "`bg_delta_e` ↓" in markdown
    assert "broken" in markdown and "failed to load" in markdown and "absent" in markdown
    assert comparison["contact_sheet"]["file"] == "comparison_sheet.png" and (out / "comparison_sheet.png").is_file()
    assert set(comparison["paired"]) == {"sd", "sd_ip", "paste", "copy"}
    assert comparison["paired"]["sd"]["bg_delta_e"]["n"] == NUM_SAMPLES


def test_the_table_equals_the_per_system_runner(setup, one_process):
    out, comparison = one_process
    evaluated = setup / "evaluate"
    args = ["--pipeline", str(setup / "dp"), "--data", str(setup / "toy" / "bench"), "--out", str(evaluated)]
    assert main(["evaluate", *args, "--config", str(setup / "eval.yaml"), "--controls", "none"]) == 0
    report = json.loads((evaluated / "metrics.json").read_text())
    assert _rows(comparison)["dp"]["values"] == pytest.approx(report["runs"][0]["values"], rel=1e-9, abs=1e-12)
    for image in (evaluated / "images" / "main").glob("*.png"):  # same seeds, same batches: the same results
        assert (out / "systems" / "dp" / "images" / "main" / image.name).read_bytes() == image.read_bytes()


def test_reference_paste_beats_a_random_pipeline_on_reference_fidelity(one_process):
    _, comparison = one_process
    stats = comparison["paired"]["paste"]["bg_delta_e"]  # paste - dp, lower is better
    assert stats["n"] == NUM_SAMPLES and stats["better"] == NUM_SAMPLES and stats["worse"] == 0
    assert stats["mean_difference"] < 0 and stats["ci_low"] <= stats["mean_difference"] <= stats["ci_high"] < 0
    assert stats["sign_test_p"] == pytest.approx(2 / 2**NUM_SAMPLES)
    rows = _rows(comparison)
    assert stats["mean_difference"] == pytest.approx(
        rows["paste"]["values"]["bg_delta_e"] - rows["dp"]["values"]["bg_delta_e"]
    )


def test_sign_test_on_known_examples():
    assert sign_test(8, 0) == 2 / 256
    assert sign_test(0, 8) == 2 / 256
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert sign_test(2, 10) == pytest.approx(0.03857421875)  # scipy.stats.binomtest(2, 12).pvalue
    assert sign_test(7, 3) == pytest.approx(0.34375)


def test_bootstrap_interval_on_known_examples():
    assert bootstrap_interval(np.full(5, 1.5)) == (1.5, 1.5)
    assert all(math.isnan(v) for v in bootstrap_interval(np.array([])))
    low, high = bootstrap_interval(np.array([0.0, 1.0]), resamples=4000)
    assert (low, high) == (0.0, 1.0)  # means of 2 draws from {0, 1}: 0, 0.5, 1
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, size=400)
    low, high = bootstrap_interval(values, resamples=4000, seed=3)
    half = 1.96 * values.std() / math.sqrt(values.size)  # normal approximation of the percentile interval
    assert low == pytest.approx(values.mean() - half, abs=0.03) and high == pytest.approx(values.mean() + half, abs=0.03)
    assert bootstrap_interval(values, resamples=500, seed=3) == bootstrap_interval(values, resamples=500, seed=3)


def test_paired_comparison_pairs_by_key_and_drops_nan():
    system = {"a": 1.0, "b": 3.0, "c": math.nan, "d": 2.0, "e": 5.0}
    reference = {"a": 0.0, "b": 3.0, "c": 1.0, "d": 4.0, "z": 9.0}
    result = paired_comparison(system, reference, resamples=200)
    assert (result.n, result.above, result.below, result.ties) == (3, 1, 1, 1)  # a: +1, b: 0, d: -2
    assert result.mean_difference == pytest.approx(-1 / 3) and result.sign_test_p == 1.0
    assert result.ci_low <= result.mean_difference <= result.ci_high


def _cli_error(capsys, args: list[str]) -> str:
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _systems_file(setup: Path, path: Path, change) -> Path:
    systems = yaml.safe_load((setup / "systems.yaml").read_text())
    systems["base"] = str(setup / "eval.yaml")
    change(systems)
    path.write_text(yaml.safe_dump(systems, sort_keys=False))
    return path


def test_bad_systems_files_are_one_line_errors_before_anything_runs(setup, tmp_path, capsys):
    out = tmp_path / "out"

    def run(change, name="systems.yaml") -> str:
        path = _systems_file(setup, tmp_path / name, change)
        args = ["--systems", str(path), "--data", str(setup / "toy" / "bench"), "--out", str(out)]
        err = _cli_error(capsys, args)
        assert str(path) in err and not out.exists()
        return err

    err = run(lambda s: s["systems"]["paste"].update(kind="pasted"))
    assert "systems.paste.kind" in err and "pasted" in err
    err = run(lambda s: s["systems"]["dp"].update(pipline="x"))
    assert "systems.dp.pipline" in err and "unknown" in err
    err = run(lambda s: s["systems"]["dp"].update(pipeline=str(tmp_path / "no_pipeline")))
    assert "systems.dp.pipeline" in err and "no_pipeline" in err
    err = run(lambda s: s["systems"]["sd_ip"].update(ip_adapter=str(tmp_path / "missing_ip.bin")))
    assert "systems.sd_ip.ip_adapter" in err and "missing_ip.bin" in err
    err = run(lambda s: s["systems"]["sd_ip"].pop("image_encoder"))
    assert "systems.sd_ip.image_encoder" in err and "needs it" in err
    err = run(lambda s: s["systems"]["paste"].update(pipeline=str(setup / "dp")))
    assert "systems.paste.pipeline" in err and "not used" in err
    err = run(lambda s: s["comparison"].update(reference_system="nobody"))
    assert "reference_system" in err and "nobody" in err
    err = run(lambda s: s["systems"].update({"bad/name": {"kind": "copy_input"}}))
    assert "bad/name" in err

    duplicate = tmp_path / "duplicate.yaml"
    text = _systems_file(setup, duplicate, lambda s: None).read_text()
    duplicate.write_text(text + "  copy:\n    kind: reference_paste\n")
    err = _cli_error(capsys, ["--systems", str(duplicate), "--data", str(setup / "toy" / "bench"), "--out", str(out)])
    assert "systems.copy" in err and "two systems" in err and str(duplicate) in err
    err = _cli_error(capsys, ["--systems", str(tmp_path / "none.yaml"), "--data", "x", "--out", str(out)])
    assert "none.yaml" in err
    err = _cli_error(capsys, [*_args(setup, out), "--reference-system", "nobody"])
    assert "nobody" in err and not out.exists()


def test_two_processes_give_the_same_comparison_as_one(setup, one_process):
    out_one, one = one_process
    out = setup / "two"
    accelerate_launch(LAUNCH_CONFIG, "compare.py", *_args(setup, out))
    two = json.loads((out / "comparison.json").read_text())
    assert two["counts"] == {**one["counts"], "processes": 2}
    for row_one, row_two in zip(one["systems"], two["systems"], strict=True):
        assert (row_two["name"], row_two["status"]) == (row_one["name"], row_one["status"])
        assert row_two["values"] == pytest.approx(row_one["values"], rel=1e-6, abs=1e-9)
    for image in (out_one / "systems").rglob("*.png"):  # same batches, same seeds: bitwise the same results
        if "images" in image.parts:
            assert (out / image.relative_to(out_one)).read_bytes() == image.read_bytes(), image
    for name, columns in one["paired"].items():
        for column, stats in columns.items():
            assert two["paired"][name][column] == pytest.approx(stats, rel=1e-6, abs=1e-9), (name, column)
    assert two["contact_sheet"]["keys"] == one["contact_sheet"]["keys"]


def test_a_failed_reference_system_leaves_the_paired_statistics_out_with_the_reason(setup, tmp_path):
    from dreampainter.evaluation.compare import load_compare_file, run_comparison

    def change(systems):
        systems["systems"] = {name: systems["systems"][name] for name in ("broken", "paste", "copy")}
        systems["comparison"]["reference_system"] = "broken"

    compare = load_compare_file(_systems_file(setup, tmp_path / "systems.yaml", change), ["benchmark.limit=4"])
    comparison = run_comparison(compare, setup / "toy" / "bench", tmp_path / "out", progress=False)
    rows = _rows(comparison)
    assert rows["broken"]["status"] == "failed" and rows["paste"]["samples"] == 4 == rows["copy"]["samples"]
    assert "broken did not load" in comparison["paired"]["skipped"]
    assert "skipped" in comparison["contact_sheet"]
    assert "Not computed: the reference system broken did not load" in (tmp_path / "out" / "comparison.md").read_text()


@pytest.mark.parametrize("backbone", ["sd", "sdxl"])
def test_a_diffusers_system_with_dreampainters_weights_gives_dreampainters_results(setup, tmp_path, backbone):
    """The text-only DreamPainter pipeline equals diffusers' inpainting pipeline (tests/test_pipeline.py,
    tests/test_sdxl_pipeline.py), so the two systems built from the same weights must agree: same seeds,
    masks, sizes (SDXL: the same resolution bucket) and compositing."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    from dreampainter.evaluation.compare import load_compare_file, run_comparison
    from dreampainter.toy.pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "tokenizer", reference=False, seed=2, backbone=backbone)
    pipe.save_pretrained(tmp_path / "text_only")
    names = ["vae", "text_encoder", "tokenizer", "unet", "scheduler"]
    if backbone == "sdxl":
        components = {name: getattr(pipe, name) for name in [*names, "text_encoder_2", "tokenizer_2"]}
        StableDiffusionXLInpaintPipeline(**components).save_pretrained(tmp_path / "diffusers")
    else:
        StableDiffusionInpaintPipeline(
            **{name: getattr(pipe, name) for name in names}, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(tmp_path / "diffusers")  # fmt: skip

    def change(systems):
        systems["systems"] = {
            "ours": {"kind": "dreampainter", "pipeline": str(tmp_path / "text_only")},
            "theirs": {"kind": "diffusers_inpaint", "pipeline": str(tmp_path / "diffusers")},
        }
        systems["comparison"]["reference_system"] = "ours"

    overrides = ["benchmark.limit=4"] + (["benchmark.resolution=64"] if backbone == "sdxl" else [])  # a 64 px bucket
    compare = load_compare_file(_systems_file(setup, tmp_path / "systems.yaml", change), overrides)
    out = tmp_path / "out"
    comparison = run_comparison(compare, setup / "toy" / "bench", out, progress=False)
    rows = _rows(comparison)
    for name in ("bg_delta_e", "bg_emd", "psnr", "clip_i"):  # another guidance scale moves bg_delta_e by 0.03
        assert rows["theirs"]["values"][name] == pytest.approx(rows["ours"]["values"][name], rel=1e-4, abs=1e-4)
    for image in (out / "systems" / "ours" / "images" / "main").glob("*.png"):
        theirs = out / "systems" / "theirs" / "images" / "main" / image.name
        difference = np.abs(np.asarray(Image.open(image), np.int16) - np.asarray(Image.open(theirs), np.int16))
        assert difference.max() <= 1, image.name  # float rounding at most flips one 8-bit level
