"""Assembling a pipeline from public-format weights (no trainer): every base / encoder / adapter / LoRA format,
equality with diffusers' own IP-Adapter path, save + reload, the CLI, and one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from dreampainter.cli import main
from dreampainter.errors import (
    CheckpointMismatchError,
    DreamPainterError,
    InvalidInputError,
    MissingFileError,
)
from dreampainter.models import (
    AdapterConfig,
    adapter_parameters,
    export_ip_adapter,
    install_reference_adapter,
    load_adapter,
    save_adapter,
)
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.toy.models import (
    build_clip_tokenizer,
    build_tiny_scheduler,
    build_tiny_text_encoder,
    build_tiny_unet,
    build_tiny_vae,
    write_single_file_checkpoint,
    write_tiny_clip_vision_folder,
    write_tiny_open_clip_checkpoint,
)

# Shapes diffusers' load_ip_adapter reads: linear with 4 tokens (IP-Adapter); resampler with dim_head 64,
# depth 4, ff_mult 4 (IP-Adapter Plus). The tiny CLIP towers give a 24-wide embedding and 32-wide tokens.
LINEAR = AdapterConfig("linear", image_embed_dim=24, num_tokens=4)
PLUS = AdapterConfig("resampler", image_embed_dim=32, num_tokens=8, resampler_heads=1, resampler_dim_head=64)
FAST = dict(num_inference_steps=2, output_type="np")


def _adapted_unet(config: AdapterConfig, seed: int = 5):
    unet = build_tiny_unet(seed=0).eval()
    install_reference_adapter(unet, config)
    with torch.no_grad():  # away from the initialisation, so that a tensor left behind would show
        generator = torch.Generator().manual_seed(seed)
        for param in adapter_parameters(unet):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return unet


def _lora_unet():
    unet = build_tiny_unet(seed=0).eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return unet


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every part, saved in its real format: diffusers folder, config-only folder, single files, CLIP towers,
    IP-Adapter files, our adapter folder, LoRA files."""
    root = tmp_path_factory.mktemp("public")
    parts = dict(
        vae=build_tiny_vae(), text_encoder=build_tiny_text_encoder(), tokenizer=build_clip_tokenizer(root / "tok"),
        unet=build_tiny_unet(seed=0), scheduler=build_tiny_scheduler(),
    )  # fmt: skip
    base = StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base.save_pretrained(root / "sd-inpainting")
    shutil.copytree(root / "sd-inpainting", root / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    write_single_file_checkpoint(root / "sd-inpainting.safetensors", parts["unet"], parts["vae"], parts["text_encoder"])
    write_single_file_checkpoint(root / "sd-inpainting.ckpt", parts["unet"], parts["vae"], parts["text_encoder"])
    write_tiny_clip_vision_folder(root / "image_encoder", seed=3)
    open_clip_name, open_clip_file = write_tiny_open_clip_checkpoint(root / "open_clip", seed=4)
    export_ip_adapter(_adapted_unet(LINEAR), root / "ip-adapter_sd15.safetensors")
    export_ip_adapter(_adapted_unet(PLUS), root / "ip-adapter-plus_sd15.bin")
    save_adapter(_adapted_unet(PLUS, seed=6), root / "our_adapter")
    lora = _lora_unet()
    lora.save_lora_adapter(str(root / "trainer_lora"))  # what our trainer writes to <run>/lora
    StableDiffusionPipeline.save_lora_weights(
        str(root / "diffusers_lora"), unet_lora_layers=get_peft_model_state_dict(lora),
        unet_lora_adapter_metadata=lora.peft_config["default"].to_dict(),
    )  # fmt: skip
    return dict(
        root=root, base=root / "sd-inpainting", configs=root / "configs", vision=root / "image_encoder",
        open_clip=open_clip_file, open_clip_name=open_clip_name, linear=root / "ip-adapter_sd15.safetensors",
        plus=root / "ip-adapter-plus_sd15.bin", ours=root / "our_adapter", lora=lora,
    )  # fmt: skip


def _inputs():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 10:22] = 255
    reference = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return photo, mask, reference


def _generate(pipe: DreamPainterPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    photo, mask, reference = _inputs()
    generator = torch.Generator().manual_seed(0)
    return pipe("a marble kitchen", photo, mask, reference_image=reference, generator=generator, **FAST).images


def _unet_call(unet, features):
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 9, 8, 8, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 600]), text, added_cond_kwargs={"image_embeds": features}).sample


# ------------------------------------------------------------------------------ equality with diffusers
@pytest.mark.parametrize("adapter", ["linear", "plus"])
def test_conditional_branch_equals_diffusers_load_ip_adapter(world, adapter):
    """Same parts in diffusers (StableDiffusionInpaintPipeline + load_ip_adapter + the same image encoder): the
    text, the image features and the conditional (prompt + reference) UNet output agree.

    The unconditional guidance branch differs by design: diffusers runs the adapter there on zero image
    embeddings (linear) or on a black image's tokens (Plus); DreamPainter feeds zero features, which mean
    "no reference" (exactly the text-only UNet)."""
    path = world[adapter]
    ours = DreamPainterPipeline.from_parts(world["base"], reference_encoder=world["vision"], adapter=path)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(world["vision"]), local_files_only=True)
    theirs = StableDiffusionInpaintPipeline.from_pretrained(
        str(world["base"]), image_encoder=image_encoder, safety_checker=None, local_files_only=True
    )
    theirs.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)

    pixel_values = ours.reference_encoder.preprocess([_inputs()[2]] * 2)
    with torch.no_grad():
        output = theirs.image_encoder(pixel_values, output_hidden_states=True)
    their_features = output.image_embeds if adapter == "linear" else output.hidden_states[-2]
    our_output = ours.reference_encoder(pixel_values)
    our_features = our_output.image_embeds if adapter == "linear" else our_output.hidden_states
    assert torch.equal(our_features, their_features)

    our_text = ours.encode_prompt("a marble kitchen", torch.device("cpu"), 1, False)[0]
    their_text = theirs.encode_prompt("a marble kitchen", torch.device("cpu"), 1, False)[0]
    assert torch.equal(our_text, their_text)

    mine = _unet_call(ours.unet, our_features)
    reference = _unet_call(theirs.unet, [their_features[:, None]])
    assert (mine - reference).abs().max() <= 1e-5
    assert (mine - _unet_call(ours.unet, torch.zeros_like(our_features))).abs().max() > 1e-3  # the branch acts


def test_conditional_generation_equals_diffusers_ip_adapter(world):
    """IP-Adapter (linear), guidance 1 (only the prompt + reference branch runs): whole generations agree.

    With guidance the unconditional branches differ by design: diffusers runs the adapter on zero image
    embeddings (its projection of zeros is not zero), DreamPainter runs no reference branch there (zero
    features mean "no reference", exactly the text-only UNet)."""
    ours = DreamPainterPipeline.from_parts(world["base"], reference_encoder=world["vision"], adapter=world["linear"])
    ours.set_progress_bar_config(disable=True)
    theirs = StableDiffusionInpaintPipeline.from_pretrained(str(world["base"]), safety_checker=None, local_files_only=True)
    path = world["linear"]
    theirs.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    theirs.set_progress_bar_config(disable=True)
    photo, mask, reference = _inputs()
    embeds = ours.reference_encoder.encode(reference).image_embeds
    mine = ours(
        "a marble kitchen", photo, mask, reference_image_embeds=embeds, text_guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3), paste_product=False, **FAST,
    ).images  # fmt: skip
    expected = theirs(
        "a marble kitchen", image=photo, mask_image=Image.fromarray(255 - mask), height=32, width=32,
        ip_adapter_image_embeds=[embeds[:, None]], guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
        **FAST,
    ).images  # fmt: skip
    assert np.abs(mine - expected).max() <= 1e-5


# ------------------------------------------------------------------------------ formats, save and reload
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_base_with_local_configs_equals_the_folder(world, suffix):
    folder = DreamPainterPipeline.from_parts(world["base"])
    single = DreamPainterPipeline.from_parts(world["root"] / f"sd-inpainting{suffix}", base_config=world["configs"])
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(mine[key], theirs[key]) for key in mine), name
    assert single.reference_encoder is None and not single.has_reference_adapter


def test_open_clip_plus_from_a_single_file_generates_saves_and_reloads(world, tmp_path):
    pipe = DreamPainterPipeline.from_parts(
        world["root"] / "sd-inpainting.safetensors", base_config=world["configs"],
        reference_encoder=world["open_clip"], open_clip_model=world["open_clip_name"], adapter=world["plus"],
        adapter_scale=0.7,
    )  # fmt: skip
    assert pipe.reference_encoder.config.backend == "open_clip" and pipe.unet.reference_adapter_config.projection == "resampler"
    images = _generate(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    again = DreamPainterPipeline.from_pretrained(tmp_path / "pipe")
    assert np.array_equal(_generate(again), images)
    photo, mask, _ = _inputs()
    text_only = pipe("a marble kitchen", photo, mask, generator=torch.Generator().manual_seed(0), **FAST).images
    assert np.abs(text_only - images).max() > 1e-3  # the reference is used


def test_our_adapter_folder_with_a_fused_trainer_lora(world):
    pipe = DreamPainterPipeline.from_parts(
        world["base"], reference_encoder=world["vision"], adapter=world["ours"], lora=world["root"] / "trainer_lora"
    )
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())  # fused: a plain UNet
    expected = world["lora"]
    load_adapter(expected, world["ours"])
    features = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(4))
    assert (_unet_call(pipe.unet, features) - _unet_call(expected, features)).abs().max() <= 1e-5


def test_attached_diffusers_lora_keeps_its_scale(world):
    path = world["root"] / "diffusers_lora" / "pytorch_lora_weights.safetensors"
    attached = DreamPainterPipeline.from_parts(world["base"], lora=path, lora_scale=0.5, fuse_lora=False)
    assert any("lora_A" in name for name, _ in attached.unet.named_parameters())
    fused = DreamPainterPipeline.from_parts(world["base"], lora=path, lora_scale=0.5)
    sample = torch.randn(1, 9, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = [p.unet(sample, torch.tensor([300]), text, added_cond_kwargs=None).sample for p in (attached, fused)]
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


def test_cli_assembles_the_same_pipeline_and_reloads_it(world, tmp_path, capsys):
    out = tmp_path / "assembled"
    code = main([
        "assemble", "--base", str(world["base"]), "--reference-encoder", str(world["vision"]),
        "--adapter", str(world["linear"]), "--adapter-scale", "0.8", "--out", str(out),
    ])  # fmt: skip
    assert code == 0 and "saved pipeline (text and reference)" in capsys.readouterr().out
    library = DreamPainterPipeline.from_parts(
        world["base"], reference_encoder=world["vision"], adapter=world["linear"], adapter_scale=0.8
    )
    assert np.array_equal(_generate(DreamPainterPipeline.from_pretrained(out)), _generate(library))


# ------------------------------------------------------------------------------ errors
def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_a_text_to_image_unet_is_refused_naming_the_inpainting_model(world, tmp_path):
    unet = build_tiny_unet(seed=0, in_channels=4)
    parts = dict(vae=build_tiny_vae(), text_encoder=build_tiny_text_encoder(), unet=unet, scheduler=build_tiny_scheduler())
    sd = StableDiffusionPipeline(
        **parts, tokenizer=build_clip_tokenizer(tmp_path / "tok"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    sd.save_pretrained(tmp_path / "sd15")
    write_single_file_checkpoint(tmp_path / "v1-5.safetensors", unet, parts["vae"], parts["text_encoder"])
    with pytest.raises(CheckpointMismatchError) as error:
        DreamPainterPipeline.from_parts(tmp_path / "sd15")
    assert "4-channel UNet" in _one_line(error) and "runwayml/stable-diffusion-inpainting" in str(error.value)
    with pytest.raises(CheckpointMismatchError) as error:
        DreamPainterPipeline.from_parts(tmp_path / "v1-5.safetensors", base_config=world["configs"])
    assert "v1-5.safetensors has a 4-channel UNet" in _one_line(error)


def test_an_encoder_that_does_not_fit_the_adapter_names_both(world, tmp_path):
    narrow = export_ip_adapter(_adapted_unet(AdapterConfig("linear", image_embed_dim=16)), tmp_path / "ip.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        DreamPainterPipeline.from_parts(world["base"], reference_encoder=world["vision"], adapter=narrow)
    message = _one_line(error)
    assert str(narrow) in message and str(world["vision"]) in message and "width 16" in message and "width 24" in message


def test_adapter_and_encoder_go_together(world):
    with pytest.raises(InvalidInputError) as error:
        DreamPainterPipeline.from_parts(world["base"], adapter=world["linear"])
    assert "needs --reference-encoder" in _one_line(error)
    with pytest.raises(InvalidInputError) as error:
        DreamPainterPipeline.from_parts(world["base"], reference_encoder=world["vision"])
    assert "needs --adapter" in _one_line(error)
    with pytest.raises(InvalidInputError) as error:
        DreamPainterPipeline.from_parts(world["base"], reference_encoder=world["open_clip"], adapter=world["linear"])
    assert "--open-clip-model" in _one_line(error)


def test_missing_files_are_named(world, tmp_path):
    cases = [
        (dict(base=tmp_path / "nope"), "nope not found"),
        (dict(base=world["root"] / "sd-inpainting.safetensors"), "--base-config"),
        (dict(base=world["root"] / "sd-inpainting.safetensors", base_config=tmp_path), "model_index.json not found"),
        (dict(base=world["base"], reference_encoder=world["vision"], adapter=tmp_path / "ip.bin"), "ip.bin not found"),
        (dict(base=world["base"], reference_encoder=tmp_path / "enc", adapter=world["linear"]), "enc not found"),
        (dict(base=world["base"], lora=tmp_path / "lora.safetensors"), "lora.safetensors not found"),
    ]
    for kwargs, expected in cases:
        base = kwargs.pop("base")
        with pytest.raises(DreamPainterError) as error:
            DreamPainterPipeline.from_parts(base, **kwargs)
        assert expected in _one_line(error)
    (tmp_path / "unet-only").mkdir()
    with pytest.raises(MissingFileError) as error:
        DreamPainterPipeline.from_parts(tmp_path / "unet-only")
    assert "model_index.json" in _one_line(error)


def test_bad_lora_files_are_named(world, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInputError) as error:
        DreamPainterPipeline.from_parts(world["base"], lora=tmp_path / "junk.safetensors")
    assert "junk.safetensors" in _one_line(error)
    save_file({"down_blocks.0.weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointMismatchError) as error:
        DreamPainterPipeline.from_parts(world["base"], lora=tmp_path / "plain.safetensors")
    assert "plain.safetensors holds no LoRA weights" in _one_line(error)
    wrong = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 7),
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointMismatchError) as error:
        DreamPainterPipeline.from_parts(world["base"], lora=tmp_path / "wrong.safetensors")
    assert "wrong.safetensors does not fit" in _one_line(error)


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    code = main(["assemble", "--base", str(world["base"]), "--lora", str(tmp_path / "x"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lora") and "--fuse-lora" in err and "\n" not in err
    code = main(["assemble", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing not found" in err and "\n" not in err
