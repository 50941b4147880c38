"""SDXL in the trainer: both stages on real shards, bf16 with fp32 trainable weights, the latent cache with
pooled embeddings and time ids (same loss as uncached), exact resume, loadable SDXL pipelines."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_utils import REPO, make_tiny_base, make_toy_shards, subprocess_env, tiny_config, write_config

from dreampainter.data.loading.loader import build_dataloader
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.training import load_config, train
from dreampainter.training.cache import (
    LATENT_NAMES,
    REFERENCE_NAME,
    TEXT_PART_NAMES,
    LatentCache,
    cache_latents,
)
from dreampainter.training.components import load_components
from dreampainter.training.inputs import prepare_inputs
from dreampainter.training.step import diffusion_loss, empty_text

DROPS = {"p_drop_text": 0.3, "p_drop_reference": 0.2, "p_drop_both": 0.1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_training")
    base, shards = make_tiny_base(root, backbone="sdxl"), make_toy_shards(root / "toy", num=24)
    config = load_config(write_config(tiny_config(base, shards, root / "unused", data={"loader": DROPS}), root / "c.yaml"))
    cache_latents(config, root / "latents", progress=False)
    return base, shards, root / "latents"


def _config_file(tmp_path, setup, name="run", cached=False, **sections):
    base, shards, cache = setup
    data = {"loader": DROPS, **({"cache": str(cache)} if cached else {})}
    sections["data"] = {**data, **sections.get("data", {})}
    return write_config(tiny_config(base, shards, tmp_path / name, **sections), tmp_path / f"{name}.yaml")


def _config(tmp_path, setup, name="run", cached=False, **sections):
    return load_config(_config_file(tmp_path, setup, name, cached, **sections))


def test_loader_batches_carry_the_micro_conditioning(tmp_path, setup):
    config = _config(tmp_path, setup)
    batch = next(iter(build_dataloader(config.data.train, config.data.loader, batch_size=4, seed=0)))
    assert batch["original_size"].shape == (4, 2) and batch["crop_top_left"].shape == (4, 2)
    assert (batch["original_size"] > 0).all() and (batch["crop_top_left"] >= 0).all()
    parts = load_components(config)
    inputs = prepare_inputs(batch, parts, empty_text(parts), 2, "cpu")
    assert inputs.pooled_text_embeds.shape == (4, 32) and inputs.text_embeds.shape[-1] == 64
    assert inputs.time_ids[:, :2].tolist() == batch["original_size"].float().tolist()
    assert inputs.time_ids[:, 4:].tolist() == [[32.0, 32.0]] * 4


def test_sdxl_cached_loss_equals_uncached_loss(tmp_path, setup):
    config = _config(tmp_path, setup, cached=True)
    parts = load_components(config)
    for module in parts.frozen_encoders():
        module.requires_grad_(False).eval()
    batch = next(iter(build_dataloader(config.data.train, config.data.loader, batch_size=6, seed=config.run.seed)))
    batch["drop_text"] = torch.tensor([True, False, False, True, False, False])
    batch["drop_reference"] = torch.tensor([False, True, False, True, False, False])
    uncached = prepare_inputs(batch, parts, empty_text(parts), 2, "cpu")
    assert uncached.pooled_text_embeds[0].abs().sum() == 0  # dropped text is zeros, as SDXL's "no prompt"
    assert uncached.pooled_text_embeds[1].abs().sum() > 0

    cache = LatentCache(setup[2])
    assert cache.text_part_names == TEXT_PART_NAMES
    names = (*LATENT_NAMES, *TEXT_PART_NAMES, REFERENCE_NAME)
    cached_batch = cache.read([cache.index_of(key) for key in batch["key"]], names)
    cached_batch.update(drop_text=batch["drop_text"], drop_reference=batch["drop_reference"],
                        empty_text_embeds=cache.empty_text_embeds())  # fmt: skip
    cached = prepare_inputs(cached_batch, None, None, 2, "cpu")
    for name in ("latent_mean", "masked_mean", "mask", "text_embeds", "pooled_text_embeds", "time_ids",
                 "reference_features"):  # fmt: skip
        assert torch.allclose(getattr(cached, name), getattr(uncached, name), atol=1e-6), name
    losses = [
        diffusion_loss(parts.unet, parts.noise_scheduler, inputs, torch.Generator().manual_seed(7))
        for inputs in (uncached, cached)
    ]
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-6)
    cached.time_ids = cached.time_ids * 2  # the micro-conditioning reaches the UNet (the check can fail)
    other = diffusion_loss(parts.unet, parts.noise_scheduler, cached, torch.Generator().manual_seed(7))
    assert not torch.allclose(other, losses[0], atol=1e-6)


def test_sdxl_stage1_then_bf16_stage2_give_loadable_sdxl_pipelines(tmp_path, setup):
    stage1 = train(_config(tmp_path, setup, "s1", run={"stage": 1}, train={"max_steps": 2},
                           model={"unet_training": "lora"}))  # fmt: skip
    pipe1 = DreamPainterPipeline.from_pretrained(stage1.pipeline_dir)
    assert pipe1.backbone.name == "sdxl" and pipe1.text_encoder_2 is not None

    # bf16 in its own process (accelerate's mixed precision is fixed once per process)
    path = _config_file(tmp_path, setup, "s2", train={"max_steps": 3, "mixed_precision": "bf16",
                                                                    "gradient_checkpointing": True})  # fmt: skip
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline_dir = tmp_path / "s2" / "pipeline"
    adapter = load_file(str(pipeline_dir / "reference_adapter" / "adapter.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    base = setup[0]
    for sub in ("text_encoder_2", "text_encoder"):  # frozen bf16 copies were not saved: the originals were
        before, after = (load_file(str(f / sub / "model.safetensors")) for f in (base, pipeline_dir))
        assert all(torch.equal(before[k], after[k]) for k in before), sub
    pipe2 = DreamPainterPipeline.from_pretrained(pipeline_dir)
    pipe2.set_progress_bar_config(disable=True)
    assert pipe2.backbone.name == "sdxl" and pipe2.has_reference_adapter
    from PIL import Image

    photo = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = pipe2("a room", photo, mask, reference_image=photo, height=32, width=32, num_inference_steps=2).images[0]
    assert out.size == (32, 32)


def test_sdxl_cached_training_resumes_exactly(tmp_path, setup):
    sections = {"train": {"batch_size": 4, "max_steps": 4}, "checkpoint": {"every_steps": 2, "keep_last": 2}}
    full = train(_config(tmp_path, setup, "full", cached=True, **sections))
    sections["train"]["max_steps"] = 2
    train(_config(tmp_path, setup, "split", cached=True, **sections))
    sections["train"]["max_steps"] = 4
    sections["checkpoint"]["resume_from_checkpoint"] = "latest"
    resumed = train(_config(tmp_path, setup, "split", cached=True, **sections))
    assert resumed.losses == full.losses[2:]
    expected = load_file(str(full.pipeline_dir / "reference_adapter" / "adapter.safetensors"))
    actual = load_file(str(resumed.pipeline_dir / "reference_adapter" / "adapter.safetensors"))
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
