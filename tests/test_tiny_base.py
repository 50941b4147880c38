"""The CPU demo's tiny base model: folder layout and loading, the VAE fit, determinism, offline build."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreampainter.errors import InvalidInputError
from dreampainter.evaluation.colour import rgb_to_lab
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.toy.base_model import (
    REPORT_NAME,
    build_demo_base_model,
    build_demo_vae,
    fit_vae,
    reconstruction_mse,
    toy_images,
)
from dreampainter.toy.data import make_toy_sample, sample_seed
from dreampainter.toy.models import build_clip_tokenizer, build_tiny_text_encoder
from dreampainter.toy.text_fit import fit_text_encoder, scene_description, toy_prompts
from dreampainter.toy.vocab import PALETTE

FAST = dict(vae_steps=3, vae_images=8, vae_held_out=2, vae_batch_size=4, text_steps=2, text_prompts=8, progress=False)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return build_demo_base_model(tmp_path_factory.mktemp("base") / "demo_base", resolution=32, seed=3, **FAST)


def test_folder_has_every_component_and_loads_offline(base_folder):
    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "reference_encoder"):
        assert (base_folder / sub).is_dir(), sub
    assert not (base_folder / "reference_adapter").exists()  # stage 2 adds the adapter
    index = json.loads((base_folder / "model_index.json").read_text())
    assert index["_class_name"] == "DreamPainterPipeline"

    pipe = DreamPainterPipeline.from_pretrained(base_folder)
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.mid_block_add_attention is False
    assert pipe.unet.config.in_channels == 9 and pipe.unet.config.sample_size == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert not pipe.has_reference_adapter and pipe.reference_encoder is not None
    scheduler = pipe.scheduler.config
    assert scheduler.prediction_type == "v_prediction" and scheduler.rescale_betas_zero_snr
    assert scheduler.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == 999  # sampling starts at the pure-noise step
    assert pipe.scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR
    # The real CLIP BPE: "red" is one token, the same id (736) as OpenAI's tokenizer.
    assert pipe.tokenizer("red").input_ids == [49406, 736, 49407]

    report = json.loads((base_folder / REPORT_NAME).read_text())
    assert report["latent_size"] == 8 and report["vae_fit"]["steps"] == FAST["vae_steps"]
    assert report["vae_fit"]["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert report["text_fit"]["steps"] == FAST["text_steps"] and report["text_prompts"] == FAST["text_prompts"]


def test_loaded_base_generates_text_only_at_the_toy_size(base_folder):
    pipe = DreamPainterPipeline.from_pretrained(base_folder)
    pipe.set_progress_bar_config(disable=True)
    sample = make_toy_sample(sample_seed(0, "bench", 0), 32)
    out = pipe(
        sample.meta["prompt"],
        sample.photo,
        sample.mask,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    product = sample.mask == 255
    assert np.abs(out[0][product] * 255 - sample.photo[product]).max() <= 1.0  # pasted back


def test_vae_fit_improves_reconstruction_and_normalises_latents():
    images = toy_images(0, "fit", 16, 32)
    held_out = toy_images(0, "held", 4, 32)
    vae = build_demo_vae(0)
    result = fit_vae(vae, images, held_out, steps=40, batch_size=8, lr=4e-3, progress=False)
    assert result.final_mse < 0.6 * result.initial_mse
    assert result.final_mse == pytest.approx(reconstruction_mse(vae, held_out))
    assert not any(p.requires_grad for p in vae.parameters())
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
    assert latents.shape[-2:] == (8, 8)
    assert latents.std().item() == pytest.approx(1.0, rel=0.05)


def test_same_seed_same_weights_other_seed_differs(base_folder, tmp_path):
    again = build_demo_base_model(tmp_path / "again", resolution=32, seed=3, **FAST)
    other = build_demo_base_model(tmp_path / "other", resolution=32, seed=4, **FAST)
    for sub, name in (
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        first, second = load_file(base_folder / sub / name), load_file(again / sub / name)
        assert all(torch.equal(first[key], second[key]) for key in first), sub
        third = load_file(other / sub / name)
        assert any(not torch.equal(first[key], third[key]) for key in first), sub


@pytest.mark.parametrize("resolution", [36, 8])
def test_bad_resolution_is_named(tmp_path, resolution):
    with pytest.raises(InvalidInputError, match="resolution"):
        build_demo_base_model(tmp_path / "x", resolution=resolution, **FAST)
    assert not (tmp_path / "x").exists()


def test_scene_description_encodes_the_named_words():
    meta = make_toy_sample(sample_seed(0, "train", 0), 16).meta
    described = scene_description(meta)
    wall = rgb_to_lab(np.asarray(PALETTE[meta["wall_colour"]].rgb, dtype=np.uint8)) / 50.0 - [1.0, 0.0, 0.0]
    np.testing.assert_allclose(described[:3], wall, atol=1e-5)
    assert described[9:].sum() == 4  # one word each: material, surface, light, tint
    other_wall = next(name for name in PALETTE if name not in (meta["wall_colour"], meta["floor_colour"]))
    changed = scene_description({**meta, "wall_colour": other_wall})
    assert not np.allclose(changed[:3], described[:3]) and np.array_equal(changed[3:], described[3:])


def test_text_fit_makes_the_named_scene_readable_from_the_token_states(tmp_path):
    prompts, targets = toy_prompts(0, "fit", 150)
    held_out, held_out_targets = toy_prompts(0, "held", 40)
    tokenizer = build_clip_tokenizer(tmp_path / "tokenizer")
    tokenizer.model_max_length = 32
    encoder = build_tiny_text_encoder(seed=0, hidden_size=32)
    result = fit_text_encoder(encoder, tokenizer, prompts, targets, held_out, held_out_targets, steps=120,
                              lr=4e-3, progress=False)
    # Held out: prompts the fit never saw. The random encoder's best linear probe explains little.
    assert result.initial_r2 < 0.4 and result.final_r2 > result.initial_r2 + 0.3
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    with pytest.raises(InvalidInputError, match="text encoder fit"):
        fit_text_encoder(encoder, tokenizer, prompts, targets[:3], held_out, held_out_targets, steps=1)
