"""SDXL through `assemble`: a diffusers SDXL-inpainting folder + a CLIP image encoder + a public SDXL
IP-Adapter file (+ an SDXL LoRA with text_encoder_2 weights) -> a DreamPainter SDXL pipeline."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from training_utils import run_cli

from dreampainter.errors import CheckpointMismatchError
from dreampainter.models import (
    AdapterConfig,
    adapter_parameters,
    export_ip_adapter,
    install_reference_adapter,
)
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.toy.models import (
    build_clip_tokenizer,
    build_tiny_scheduler,
    build_tiny_sdxl_unet,
    build_tiny_text_encoder,
    build_tiny_text_encoder_2,
    build_tiny_vae,
    tiny_clip_vision_config,
    write_tiny_clip_vision_folder,
)

FAST = dict(num_inference_steps=2, output_type="np", height=32, width=32)


def _parts(root):
    tokenizer = build_clip_tokenizer(root / "tok")
    return dict(
        vae=build_tiny_vae(), text_encoder=build_tiny_text_encoder(), text_encoder_2=build_tiny_text_encoder_2(),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=build_tiny_sdxl_unet(), scheduler=build_tiny_scheduler(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_public")
    parts = _parts(root)
    StableDiffusionXLInpaintPipeline(**parts).save_pretrained(root / "sdxl-inpainting")
    write_tiny_clip_vision_folder(root / "image_encoder", seed=3)
    embed_dim = tiny_clip_vision_config().projection_dim
    adapted = build_tiny_sdxl_unet()
    install_reference_adapter(adapted, AdapterConfig("linear", image_embed_dim=embed_dim, num_tokens=4))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for param in adapter_parameters(adapted):
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    export_ip_adapter(adapted, root / "ip-adapter_sdxl.safetensors")
    # an SDXL LoRA on the UNet and the second text encoder, in diffusers' SDXL layout
    unet, encoder_2 = build_tiny_sdxl_unet(), build_tiny_text_encoder_2()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    # peft directly: transformers 5's own add_adapter wants a newer peft than PyPI has
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), encoder_2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for module in (unet, encoder_2):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    StableDiffusionXLPipeline.save_lora_weights(
        str(root / "sdxl_lora"), unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_2_lora_layers=get_peft_model_state_dict(encoder_2),
    )  # fmt: skip
    return root


def _inputs():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 10:22] = 255
    reference = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return photo, mask, reference


def _run(pipe, **extra):
    pipe.set_progress_bar_config(disable=True)
    photo, mask, reference = _inputs()
    return pipe("a marble kitchen", photo, mask, generator=torch.Generator().manual_seed(0), **{**FAST, **extra}).images


def test_assembled_sdxl_text_only_equals_diffusers_and_the_reference_branch_works(world):
    base = world / "sdxl-inpainting"
    text_only = DreamPainterPipeline.from_parts(base)
    assert text_only.backbone.name == "sdxl" and text_only.text_encoder_2 is not None
    theirs = StableDiffusionXLInpaintPipeline.from_pretrained(str(base))
    theirs.set_progress_bar_config(disable=True)
    photo, mask, _ = _inputs()
    expected = theirs("a marble kitchen", image=photo, mask_image=Image.fromarray(255 - mask), strength=1.0,
                      generator=torch.Generator().manual_seed(0), **FAST).images  # fmt: skip
    assert np.abs(_run(text_only, paste_product=False) - expected).max() <= 1e-5

    ours = DreamPainterPipeline.from_parts(
        base, reference_encoder=world / "image_encoder", adapter=world / "ip-adapter_sdxl.safetensors"
    )
    _, _, reference = _inputs()
    with_reference = _run(ours, reference_image=reference)
    assert np.abs(with_reference - _run(ours)).max() > 1e-3


def test_sdxl_lora_with_text_encoder_2_weights_is_fused(world):
    base = world / "sdxl-inpainting"
    plain = DreamPainterPipeline.from_parts(base)
    fused = DreamPainterPipeline.from_parts(base, lora=world / "sdxl_lora")
    changed = [
        name for name, value in fused.text_encoder_2.state_dict().items()
        if not torch.equal(value, plain.text_encoder_2.state_dict()[name])
    ]  # fmt: skip
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)
    assert not getattr(fused.text_encoder_2, "peft_config", None)  # fused and unloaded
    assert np.abs(_run(fused) - _run(plain)).max() > 1e-4


def test_assemble_command_writes_an_sdxl_pipeline(world, tmp_path):
    done = run_cli(["assemble", "--base", str(world / "sdxl-inpainting"), "--reference-encoder",
                    str(world / "image_encoder"), "--adapter", str(world / "ip-adapter_sdxl.safetensors"),
                    "--out", str(tmp_path / "pipe")], timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    pipe = DreamPainterPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.backbone.name == "sdxl" and pipe.has_reference_adapter and pipe.tokenizer_2 is not None


def test_sdxl_folder_missing_its_second_text_encoder_is_refused(world, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(world / "sdxl-inpainting", broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(Exception, match="text_encoder_2") as info:
        DreamPainterPipeline.from_parts(broken)
    assert info.type.__name__ in ("MissingFileError", CheckpointMismatchError.__name__)
