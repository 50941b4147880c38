"""The benchmark runner and ``dreampainter evaluate``: report files, controls, bad samples, skipped metrics,
1 vs 2 processes (a real ``accelerate launch``), one-line CLI errors. Tiny pipeline, 32 px toy shards."""

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from training_utils import REPO, accelerate_launch

from dreampainter.cli import main
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.evaluation.bench_data import read_benchmark_share, shuffled_partners
from dreampainter.evaluation.contact_sheet import pick_cases
from dreampainter.evaluation.runner import (
    BenchmarkSettings,
    generate_batch,
    load_evaluation_file,
    load_pipeline,
    plan_runs,
    sample_seed,
)
from dreampainter.toy.backbones import write_tiny_backbones
from dreampainter.toy.data import write_toy_dataset
from dreampainter.utils.config import config_to_dict

LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
NUM_TOY = 6
GOOD_EXTRA = ["extra_good", "trunc_a"]  # good samples in the shards that also hold bad ones
BAD_KEYS = {"bad_photo", "bad_mask", "bad_prompt", "toy0_bench_0000000", "trunc_b"}


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> list[int]:
    """Write a plain tar; returns the byte offset where each sample starts."""
    starts = []
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in samples:
            starts.append(archive.offset)
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return starts


def _toy_members(root: Path, seed: int, num: int) -> list[tuple[str, dict[str, bytes]]]:
    write_toy_dataset(root, num=num, seed=seed, resolution=32, splits={"bench": 1.0}, progress=False)
    return [sample for shard in sorted((root / "bench").glob("*.tar")) for sample in iter_tar_samples(shard)]


def make_bench(root: Path) -> Path:
    """8 good toy samples, then a shard with 4 bad samples and a good one, then a truncated shard."""
    bench = root / "bench"
    bench.mkdir()
    toy = _toy_members(root / "toy0", 0, NUM_TOY)
    _write_tar(bench / "a-toy.tar", toy)
    spare = [members for _, members in _toy_members(root / "toy1", 1, 4)]
    no_prompt = dict(spare[2], json=json.dumps({"prompt": " "}).encode())
    no_mask = {suffix: data for suffix, data in spare[1].items() if suffix != "mask.png"}
    _write_tar(
        bench / "b-bad.tar",
        [
            ("bad_photo", dict(spare[0], jpg=b"not a jpeg")),
            ("bad_mask", no_mask),
            ("bad_prompt", no_prompt),
            toy[0],  # duplicate key
            ("extra_good", spare[3]),
        ],
    )
    truncated = bench / "c-truncated.tar"
    starts = _write_tar(truncated, [("trunc_a", spare[0]), ("trunc_b", spare[1])])
    first_member = -len(next(iter(spare[1].values()))) % 512 + len(next(iter(spare[1].values())))
    cut = starts[1] + 512 + first_member + 512 + 10  # inside trunc_b's second member: trunc_a is complete
    truncated.write_bytes(truncated.read_bytes()[:cut])
    return bench


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dreampainter.toy.pipeline import build_tiny_pipeline

    root = tmp_path_factory.mktemp("evaluate")
    build_tiny_pipeline(root / "tokenizer", reference=True).save_pretrained(root / "pipeline")
    config = yaml.safe_load((REPO / "configs" / "eval_toy.yaml").read_text())
    config["evaluation"]["backbones"] = write_tiny_backbones(root / "backbones")
    config["evaluation"]["backbones"]["dino"]["path"] = str(root / "absent" / "dino.safetensors")
    config["evaluation"]["feature_cache"] = str(root / "cache")
    config["benchmark"].update(num_inference_steps=2, batch_size=3, contact_count=2)
    (root / "eval.yaml").write_text(yaml.safe_dump(config))
    return root, make_bench(root)


def _args(root: Path, bench: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pipeline", str(root / "pipeline"), "--data", str(bench), "--out", str(out),
        "--config", str(root / "eval.yaml"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(setup):
    root, bench = setup
    out = root / "one"
    assert main(["evaluate", *_args(root, bench, out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_report_has_every_run_per_sample_rows_images_and_contact_sheet(one_process):
    out, report = one_process
    runs = [row["run"] for row in report["runs"]]
    assert runs == ["main", "no_reference", "shuffled_reference"]
    good = NUM_TOY + len(GOOD_EXTRA)  # toy0_bench_0000000 is bad only where it repeats
    assert report["counts"] == {"listed": NUM_TOY + 6, "evaluated": good, "bad": 5, "processes": 1, "runs": 3}
    for row in report["runs"]:
        values = row["values"]
        assert values["composite_change_max"] == 0  # the product is pasted back exactly
        assert values["fid_generated_images"] == good and np.isfinite(values["fid"])
        assert {"clip_i", "clip_t", "psnr", "ssim", "lpips", "expansion_mean", "bg_delta_e"} <= set(values)
    main_values, control = report["runs"][0]["values"], report["runs"][2]["values"]
    assert report["relative_to_controls"]["shuffled_reference"]["clip_i"] == pytest.approx(
        main_values["clip_i"] - control["clip_i"]
    )
    assert main_values["clip_i"] != control["clip_i"], "the shuffled control must use other references"

    rows = _read_csv(out / "per_sample.csv")
    assert len(rows) == 3 * good
    keys = sorted({row["key"] for row in rows})
    assert set(keys) >= set(GOOD_EXTRA) and not set(keys) & (BAD_KEYS - {"toy0_bench_0000000"})
    shown = {row["key"]: row["reference_of"] for row in rows if row["run"] == "shuffled_reference"}
    assert sorted(shown.values()) == keys and all(shown[key] != key for key in keys)  # a derangement
    for row in rows:
        assert int(row["seed"]) == sample_seed(0, row["key"])  # same seed in every run
        assert (out / "images" / row["run"] / f"{row['key']}.png").is_file()
    main_rows = {row["key"]: float(row["bg_delta_e"]) for row in rows if row["run"] == "main"}
    assert np.mean(list(main_rows.values())) == pytest.approx(main_values["bg_delta_e"])

    sheet = report["contact_sheet"]
    assert sheet["metric"] == "bg_delta_e" and (out / sheet["file"]).is_file()
    best, worst = [entry["value"] for entry in sheet["best"]], [entry["value"] for entry in sheet["worst"]]
    assert best[0] == min(main_rows.values()) and worst[0] == max(main_rows.values())
    assert report["config"]["benchmark"]["num_inference_steps"] == 2


def test_missing_weights_skip_one_metric_with_the_file_and_where_to_get_it(one_process, setup):
    _, report = one_process
    for row in report["runs"]:
        reason = row["skipped"]["dino"]
        assert (
            str(setup[0] / "absent" / "dino.safetensors") in reason
            and "timm/vit_small_patch16_224.dino" in reason
        )
        assert "dino" not in row["values"] and "clip_i" in row["values"]


def test_bad_samples_are_reported_by_key_and_reason(one_process):
    _, report = one_process
    bad = {entry["key"]: entry for entry in report["bad_samples"]}
    assert set(bad) == BAD_KEYS
    assert "not a decodable image" in bad["bad_photo"]["reason"]
    assert "bad_mask.mask.png" in bad["bad_mask"]["reason"]
    assert "empty prompt" in bad["bad_prompt"]["reason"]
    assert (
        "duplicate key" in bad["toy0_bench_0000000"]["reason"]
        and bad["toy0_bench_0000000"]["shard"] == "b-bad.tar"
    )
    assert "truncated" in bad["trunc_b"]["reason"] and bad["trunc_b"]["shard"] == "c-truncated.tar"


def test_two_processes_give_the_same_report_as_one(setup, one_process):
    root, bench = setup
    out_one, one = one_process
    out = root / "two"
    accelerate_launch(LAUNCH_CONFIG, "evaluate.py", *_args(root, bench, out))
    two = json.loads((out / "metrics.json").read_text())
    assert two["counts"] == {**one["counts"], "processes": 2}
    assert len(two["timing"]["generate_s_per_process"]) == 2
    for image in (out_one / "images").rglob("*.png"):  # same batches, same seeds: bitwise the same results
        assert (out / image.relative_to(out_one)).read_bytes() == image.read_bytes(), image
    for row_one, row_two in zip(one["runs"], two["runs"], strict=True):
        assert row_two["run"] == row_one["run"] and row_two["skipped"] == row_one["skipped"]
        # backbones run on other batch mates in each process: float rounding only
        assert row_two["values"] == pytest.approx(row_one["values"], rel=1e-6, abs=1e-9)
    assert two["bad_samples"] == one["bad_samples"]
    assert [entry["key"] for entry in two["contact_sheet"]["best"]] == [
        entry["key"] for entry in one["contact_sheet"]["best"]
    ]
    rows_one, rows_two = _read_csv(out_one / "per_sample.csv"), _read_csv(out / "per_sample.csv")
    assert [(r["run"], r["key"], r["seed"]) for r in rows_two] == [
        (r["run"], r["key"], r["seed"]) for r in rows_one
    ]


def test_composited_result_equals_the_pipeline_paste_and_seeds_ignore_batching(setup):
    root, bench = setup
    pipe = load_pipeline(root / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    samples = [entry.decode() for entry in read_benchmark_share(bench, limit=3).good.values()]
    settings = BenchmarkSettings(num_inference_steps=2, feather_radius=2.0)
    together = generate_batch(pipe, samples, [s.reference for s in samples], settings)
    alone = generate_batch(pipe, samples[2:], [samples[2].reference], settings)
    np.testing.assert_allclose(alone.raw[0], together.raw[2], atol=1e-5)  # float noise of batch size
    pasted = pipe(
        prompt=[s.prompt for s in samples],
        image=[s.photo for s in samples],
        product_mask=[s.product_mask for s in samples],
        reference_image=[s.reference for s in samples],
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(sample_seed(0, s.key)) for s in samples],
        output_type="np",
    ).images
    np.testing.assert_allclose(np.stack(together.composited), pasted, atol=1e-6)


def test_a_text_only_pipeline_runs_main_only_and_says_why(tmp_path):
    from dreampainter.toy.pipeline import build_tiny_pipeline

    text_only = build_tiny_pipeline(tmp_path / "tokenizer", reference=False)
    runs, skipped = plan_runs(text_only, ["no_reference", "shuffled_reference"], ["a", "b"])
    assert runs == ["main"] and set(skipped) == {"no_reference", "shuffled_reference"}
    assert "no reference encoder" in skipped["shuffled_reference"]
    with_reference = build_tiny_pipeline(tmp_path / "tokenizer", reference=True)
    runs, skipped = plan_runs(with_reference, ["shuffled_reference"], ["a"])
    assert runs == ["main"] and "at least 2" in skipped["shuffled_reference"]


def test_shuffled_partners_are_a_fixed_derangement():
    keys = [f"k{i}" for i in range(7)]
    partners = shuffled_partners(keys, seed=3)
    assert sorted(partners) == keys and sorted(partners.values()) == keys
    assert all(partners[key] != key for key in keys)
    assert shuffled_partners(keys[::-1], seed=3) == partners  # order of listing does not matter
    assert shuffled_partners(keys, seed=4) != partners
    assert sample_seed(0, "k1") == sample_seed(0, "k1") != sample_seed(0, "k2") != sample_seed(1, "k2")


def test_best_and_worst_cases_do_not_overlap_and_skip_nan():
    values = {"a": 0.1, "b": 0.9, "c": float("nan"), "d": 0.5}
    assert pick_cases(values, higher_is_better=True, count=2) == (["b", "d"], ["a"])
    assert pick_cases(values, higher_is_better=False, count=1) == (["a"], ["b"])


def test_configs_parse_and_the_toy_config_matches_the_tiny_backbones(tmp_path):
    evaluation, settings = load_evaluation_file(REPO / "configs" / "eval_toy.yaml")
    written = write_tiny_backbones(tmp_path)
    files = ("path", "model_config")  # written under tmp_path, configured under outputs/tiny_backbones
    for name, entry in written.items():
        configured = config_to_dict(evaluation.backbone(name))
        assert {k: configured[k] for k in entry if k not in files} == {
            k: v for k, v in entry.items() if k not in files
        }
        for key in files:
            if key in entry:
                assert Path(configured[key]).name == Path(entry[key]).name
    assert settings.controls == ["no_reference", "shuffled_reference"]
    evaluation, settings = load_evaluation_file(REPO / "configs" / "eval_sd15.yaml")
    assert evaluation.backbones.clip.model == "ViT-L-14-quickgelu" and settings.num_inference_steps == 30


def _cli_error(capsys, args: list[str]) -> str:
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line_naming_the_problem(setup, tmp_path, capsys):
    root, bench = setup
    out = str(tmp_path / "out")
    assert "missing_pipeline" in _cli_error(
        capsys, ["--pipeline", str(tmp_path / "missing_pipeline"), "--data", str(bench), "--out", out]
    )
    assert "no_shards_here" in _cli_error(capsys, _args(root, tmp_path / "no_shards_here", Path(out)))
    assert "shuffled" in _cli_error(capsys, [*_args(root, bench, Path(out)), "--controls", "shuffle"])
    assert "steps" in _cli_error(capsys, [*_args(root, bench, Path(out)), "--steps", "0"])
    assert "nope" in _cli_error(capsys, [*_args(root, bench, Path(out)), "--metrics", "clip,nope"])
    assert "eval_missing.yaml" in _cli_error(
        capsys, [*_args(root, bench, Path(out))[:-1], str(tmp_path / "eval_missing.yaml")]
    )
    (tmp_path / "typo.yaml").write_text("benchmark:\n  stepz: 3\n")
    assert "stepz" in _cli_error(capsys, [*_args(root, bench, Path(out))[:-1], str(tmp_path / "typo.yaml")])
    broken = tmp_path / "broken_pipeline"
    shutil.copytree(root / "pipeline", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    err = _cli_error(capsys, ["--pipeline", str(broken), "--data", str(bench), "--out", out])
    assert "unet" in err and "diffusion_pytorch_model.safetensors" in err and "save_pretrained" in err


def test_command_line_overrides_the_config(setup):
    from dreampainter.cli import build_parser
    from dreampainter.commands.evaluate import load_evaluate_config

    root, bench = setup
    args = build_parser().parse_args(
        [
            "evaluate",
            *_args(root, bench, root / "x"),
            "--controls",
            "none",
            "--steps",
            "5",
            "--metrics",
            "product",
        ]
    )
    evaluation, settings = load_evaluate_config(args)
    assert settings.controls == [] and settings.num_inference_steps == 5 and settings.batch_size == 3  # 3 from the file
    assert evaluation.metrics == ["product"] and evaluation.segmenter == "known_scene"


def test_contact_metric_falls_back_or_says_why():
    from dreampainter.evaluation import EvalBatch, EvaluationConfig, build_suite
    from dreampainter.evaluation.contact_sheet import choose_metric

    suite = build_suite(EvaluationConfig(metrics=["product", "colour"], progress=False))
    photo = np.full((16, 16, 3), 90, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    suite.update(EvalBatch.from_lists(["a"], [photo], [photo], [photo], [mask], [photo], prompt=["p"]))
    assert choose_metric(suite, None) == ("bg_delta_e", None)
    metric, reason = choose_metric(suite, "clip_i")
    assert metric is None and "clip_i" in reason and "psnr" in reason
