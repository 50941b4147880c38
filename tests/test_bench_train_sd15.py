"""scripts/bench_train_sd15.py: CPU smoke run of both variants, the cached batch, SD1.5 sizes, CUDA check."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train_sd15.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_sd15", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(*args: str, out_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", OUT=str(out_dir))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_cpu_smoke_run_reports_both_variants(tmp_path):
    done = _run("--device", "cpu", "--small", "--steps", "1", "--warmup", "0", "--repeats", "1", out_dir=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train_sd15.json").read_text())  # default --out is $OUT/...
    assert result["complete"] and result["repeats_done"] == 1
    assert result["config"]["resolution"] == 64 and result["config"]["small"]
    for variant in ("cached", "uncached"):
        entry = result["variants"][variant]
        (run,) = entry["runs"]
        assert entry["samples_per_s"] > 0 and len(run["step_seconds"]) == 1
        assert run["finite_losses"] and math.isfinite(run["final_loss"])
    assert result["cached_over_uncached"] > 0
    assert result["parameters"]["adapter"] > 0
    table = result["markdown"]
    assert "| cached |" in table and "| uncached |" in table and "cached / uncached samples/s" in table
    assert table in done.stdout


def test_cached_batch_gives_the_uncached_step_inputs(bench, tmp_path):
    """The cached variant trains on exactly what the uncached one computes (fp32: equal up to rounding)."""
    from dreampainter.training.inputs import prepare_inputs

    shapes = bench.small_shapes()
    parts, trainable, _ = bench.build_components(shapes, "resampler", torch.device("cpu"), torch.float32, tmp_path)
    step = bench.Step(parts, trainable, torch.device("cpu"), torch.float32)
    batch = bench.make_batch(2, 64, shapes.reference_size)
    batch["drop_text"][1] = True  # dropout flags travel with the cached batch
    cached = bench.make_cached_batch(batch, parts, torch.device("cpu"), step.empty_embeds)
    assert "pixel_values" not in cached
    ours = prepare_inputs(cached, parts, step.empty_embeds, 2, torch.device("cpu"))
    reference = prepare_inputs(batch, parts, step.empty_embeds, 2, torch.device("cpu"))
    for name in ("latent_mean", "latent_std", "masked_mean", "masked_std", "mask", "text_embeds", "reference_features"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), msg=name)
    assert ours.reference_features.shape == (2, 17, shapes.vision["hidden_size"])  # resampler reads the tokens
    torch.testing.assert_close(ours.text_embeds[1], step.empty_embeds.tokens[0])
    # Only the adapter trains: one step moves it and leaves the frozen UNet as it was.
    frozen = parts.unet.conv_in.weight.clone()
    before = [p.detach().clone() for p in trainable]
    assert math.isfinite(step(cached))
    assert torch.equal(parts.unet.conv_in.weight, frozen)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))


def test_sd15_shapes_have_sd15_parameter_counts(bench):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        counts = bench.parameter_counts(bench.build_models(bench.sd15_shapes(), "linear"))
    assert counts["unet"] == 859_535_364  # SD1.5's 859,520,964 + 5 extra conv_in input channels (9-channel inpainting)
    assert counts["vae"] == 83_653_863
    assert counts["text_encoder"] == 123_060_480  # CLIP ViT-L/14 text tower
    assert abs(counts["reference_encoder"] - 632.08e6) < 0.01e6  # ViT-H-14 vision tower + 1024-d projection
    assert counts["adapter"] == 22_319_616  # IP-Adapter SD1.5: 3.15M projection + 16 x (to_k_ip, to_v_ip)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_missing_is_one_clear_line(tmp_path):
    done = _run("--small", out_dir=tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: no CUDA device is visible")
    assert not (tmp_path / "bench_train_sd15.json").exists()
