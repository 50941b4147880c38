"""scripts/gpu_bench.py: the tiny CPU run of both backbones reports every measurement (so the GPU command
cannot rot), a failing section is recorded while the rest runs, full-size shapes, the CUDA check."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.py"
RUNS = ("ours_two_branch", "ours_dual", "diffusers_ip_adapter")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(*args: str, out_dir: Path) -> subprocess.CompletedProcess:
    # One thread: on a small shared machine two oneDNN threads per process run the tiny shapes several times slower.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", OUT=str(out_dir))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_cpu_run_reports_every_measurement_of_both_backbones(tmp_path):
    done = _run("--tiny", "--device", "cpu", out_dir=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())  # default --out is $OUT/gpu_bench.json
    assert result["complete"] and set(result["backbones"]) == {"sd15", "sdxl"}
    assert result["config"]["tiny"] and result["config"]["infer_steps"] == 1
    for name, record in result["backbones"].items():
        assert record["sections"] == {"build": "ok", "train": "ok", "infer": "ok"}, name
        assert all(_positive(count) for count in record["parameters"].values())
        assert ("text_encoder_2" in record["parameters"]) == (name == "sdxl")
        train = record["train"]
        assert train["unet_dtype"] == "bf16" and train["adapter_dtype"] == "fp32" and train["repeats_done"] == 1
        for variant in ("cached", "uncached"):
            entry = train["variants"][variant]
            assert _positive(entry["samples_per_s"]) and _positive(entry["step_s_median"]), (name, variant)
            (run,) = entry["runs"]
            assert run["finite_losses"] and math.isfinite(run["final_loss"])
            assert entry["peak_allocated_gib"] is None  # CUDA's allocator statistics only
        assert _positive(train["cached_over_uncached"])
        infer = record["infer"]
        assert infer["steps"] == 1 and infer["resolution"] == 64 and infer["branches_as_expected"]
        assert infer["dtype"] == "fp16"  # as on the GPU (SDXL's VAE upcast included)
        for run_name, rows in zip(RUNS, (2, 3, 2)):
            entry = infer["runs"][run_name]
            assert _positive(entry["s_per_image"]) and len(entry["seconds"]) == 1, (name, run_name)
            assert entry["unet_calls"] == 1 and entry["unet_rows_per_call"] == [rows], (name, run_name)
            assert entry["peak_allocated_gib"] is None  # CUDA only
        assert set(infer["ratios"]) == {"ours_two_branch/diffusers_ip_adapter", "ours_dual/diffusers_ip_adapter"}
        assert all(_positive(ratio) for ratio in infer["ratios"].values())
    table = result["markdown"]
    assert "| sd15 | 2 x 64 | bf16 |" in table and "| sdxl | 64 | 1 | fp16 |" in table
    assert table in done.stdout and "Not complete" not in table


def test_a_failing_section_is_recorded_and_the_others_still_run(bench, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "run_variants", out_of_memory)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "partial.json"
        code = bench.main(["--tiny", "--device", "cpu", "--backbones", "sd15", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 1
    result = json.loads(out.read_text())
    record = result["backbones"]["sd15"]
    assert record["sections"]["train"] == "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert record["sections"]["build"] == record["sections"]["infer"] == "ok"
    assert _positive(record["infer"]["runs"]["ours_dual"]["s_per_image"])
    assert not result["complete"] and "Not complete: sd15 train: failed: OutOfMemoryError" in result["markdown"]


def test_training_out_of_memory_is_measured_again_with_gradient_checkpointing(bench, tmp_path, monkeypatch):
    import bench_common

    real = bench_common.time_variant

    def needs_checkpointing(step, *args, **kwargs):
        if not step.parts.unet.is_gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return real(step, *args, **kwargs)

    monkeypatch.setattr(bench_common, "time_variant", needs_checkpointing)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "retry.json"
        code = bench.main(["--tiny", "--device", "cpu", "--backbones", "sdxl", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads(out.read_text())["backbones"]["sdxl"]
    train = record["train"]
    assert record["sections"] == {"build": "ok", "train": "ok", "infer": "ok"}
    assert train["gradient_checkpointing"] and _positive(train["variants"]["cached"]["samples_per_s"])
    first = train["without_gradient_checkpointing"]["variants"]
    assert all(run["error"].startswith("OutOfMemoryError") for entry in first.values() for run in entry["runs"])


def test_section_time_limit_interrupts_and_the_budget_skips(bench):
    started = time.perf_counter()
    with pytest.raises(bench.SectionTimeout), bench.time_limit(0.2):
        time.sleep(5)
    assert time.perf_counter() - started < 2
    assert bench.Clock(budget=0, section_limit=60).limit() is None  # no section starts past the budget
    assert bench.Clock(budget=100, section_limit=60).limit() == 60


def test_full_size_shapes_have_the_real_parameter_counts(bench):
    import bench_common

    expected = {
        "sd15": dict(unet=859_535_364, adapter=49_087_488, vae=83_653_863, text_encoder=123_060_480,
                     reference_encoder=632_076_800),  # ip-adapter-plus_sd15: 98 MB in fp16
        "sdxl": dict(unet=2_567_478_084, adapter=423_748_864, vae=83_653_863, text_encoder=123_060_480,
                     text_encoder_2=694_659_840, reference_encoder=632_076_800),  # ip-adapter-plus_sdxl_vit-h: 848 MB
    }  # SDXL base UNet 2,567,463,684 + 5 input channels x 320 x 3 x 3 (inpainting); bigG text 694.7M
    for name, counts in expected.items():
        with torch.device("meta"):  # shapes only
            models = bench_common.build_models(bench_common.SHAPES[name](), "resampler")
        assert bench_common.parameter_counts(models) == counts, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_missing_is_one_clear_line(tmp_path):
    done = _run("--backbones", "sd15", out_dir=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: no CUDA device is visible")
    assert not (tmp_path / "gpu_bench.json").exists()
