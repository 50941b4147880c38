"""The SDXL backbone end to end in the pipeline: text-only equals diffusers' StableDiffusionXLInpaintPipeline,
the adapter on every SDXL cross-attention layer (public SDXL IP-Adapter layouts equal diffusers' loader),
dual guidance, micro-conditioning, resolution buckets, save/load."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from PIL import Image

from dreampainter.errors import InvalidInputError
from dreampainter.models import (
    AdapterConfig,
    adapter_parameters,
    adapter_state_dict,
    cross_attention_layers,
    export_ip_adapter,
    import_ip_adapter,
    install_reference_adapter,
)
from dreampainter.models.backbones import (
    StableDiffusion,
    StableDiffusionXL,
    backbone_for_folder,
    backbone_for_unet,
)
from dreampainter.models.unet_configs import sdxl_inpainting_unet_config
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.toy.models import (
    build_clip_tokenizer,
    build_tiny_reference_encoder,
    build_tiny_scheduler,
    build_tiny_sdxl_unet,
    build_tiny_text_encoder,
    build_tiny_text_encoder_2,
    build_tiny_unet,
    build_tiny_vae,
)

FAST = dict(num_inference_steps=3, output_type="np", height=32, width=48)  # SDXL would snap to a 1024 px bucket
LINEAR = AdapterConfig("linear", image_embed_dim=24, num_tokens=4)
RESAMPLER = AdapterConfig("resampler", image_embed_dim=32, num_tokens=8, resampler_heads=1, resampler_dim_head=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _components(tokenizer, unet=None):
    return dict(
        vae=build_tiny_vae(),
        text_encoder=build_tiny_text_encoder(),
        tokenizer=tokenizer,
        text_encoder_2=build_tiny_text_encoder_2(),
        tokenizer_2=tokenizer,
        unet=unet if unet is not None else build_tiny_sdxl_unet().eval(),
        scheduler=build_tiny_scheduler(),
    )


def _diffusers(components) -> StableDiffusionXLInpaintPipeline:
    pipe = StableDiffusionXLInpaintPipeline(**components, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(components) -> DreamPainterPipeline:
    pipe = DreamPainterPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(width=48, height=32, seed=0):
    rng = np.random.default_rng(seed)
    photo = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 2 * width // 3] = 255
    reference = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return photo, mask, reference


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def adapted(tokenizer):
    """An SDXL pipeline with a tiny reference encoder and a (perturbed) linear adapter."""
    encoder = build_tiny_reference_encoder()
    unet = build_tiny_sdxl_unet().eval()
    install_reference_adapter(unet, AdapterConfig("linear", image_embed_dim=encoder.feature_dim("global"), num_tokens=4))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for param in adapter_parameters(unet):
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return _ours({**_components(tokenizer, unet), "reference_encoder": encoder})


# ----------------------------------------------------------------------------- backbone detection


def test_backbone_is_detected_from_the_unet_and_the_folder(tokenizer, tmp_path):
    assert isinstance(backbone_for_unet(build_tiny_sdxl_unet()), StableDiffusionXL)
    assert isinstance(backbone_for_unet(build_tiny_unet()), StableDiffusion)
    assert isinstance(backbone_for_unet(sdxl_inpainting_unet_config()), StableDiffusionXL)
    _ours(_components(tokenizer)).save_pretrained(tmp_path / "xl")
    assert backbone_for_folder(tmp_path / "xl").name == "sdxl"
    with pytest.raises(InvalidInputError, match="not a supported backbone"):
        backbone_for_unet({"addition_embed_type": "image"})
    with pytest.raises(InvalidInputError, match="unet/config.json"):
        backbone_for_folder(tmp_path)


def test_sdxl_buckets_follow_the_aspect_ratio_at_native_area():
    backbone = StableDiffusionXL()
    assert backbone.bucket_size(1000, 1000) == (1024, 1024)
    width, height = backbone.bucket_size(3000, 2000)
    assert (width, height) == (1216, 832) and width % 64 == 0 and height % 64 == 0
    assert backbone.bucket_size(400, 1600)[1] > 1600  # tall products get a tall bucket (aspect up to 4)
    assert all(h * w <= 1024 * 1024 for h, w in backbone.buckets())
    assert StableDiffusionXL().bucket_size(900, 600, resolution=512) == (640, 384)


# ----------------------------------------------------------------------------- equality with diffusers


@pytest.mark.parametrize(
    "call",
    [
        dict(guidance_scale=7.5),  # no negative prompt: zero negative conditions (force_zeros_for_empty_prompt)
        dict(guidance_scale=5.0, negative_prompt="blurry", negative_prompt_2="dark", prompt_2="a stone floor"),
        dict(guidance_scale=1.0, num_images_per_prompt=2),
    ],
    ids=["zeros-negative", "both-encoders-prompts", "no-cfg-two-images"],
)
def test_text_only_equals_diffusers_sdxl_inpaint_pipeline(tokenizer, call):
    components = _components(tokenizer)
    photo, mask, _ = _inputs()
    n = call.get("num_images_per_prompt", 1)
    extra = {k: v for k, v in call.items() if k != "guidance_scale"}
    ours = _ours(components)(
        "a marble table", photo, mask, text_guidance_scale=call["guidance_scale"],
        generator=[_gen(s) for s in range(n)], paste_product=False, **extra, **FAST,
    ).images  # fmt: skip
    theirs = _diffusers(components)(
        "a marble table", image=photo, mask_image=Image.fromarray(255 - mask), strength=1.0,
        generator=[_gen(s) for s in range(n)], **call, **FAST,
    ).images  # fmt: skip
    assert ours.shape == theirs.shape == (n, 32, 48, 3)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_micro_conditioning_defaults_to_the_input_size_and_can_be_given(tokenizer):
    components = _components(tokenizer)
    pipe = _ours(components)
    photo, mask, _ = _inputs(width=96, height=64)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
    )
    try:
        pipe("a", photo, mask, generator=_gen(), **FAST)
        default = seen[-1]
        pipe("a", photo, mask, original_size=(1024, 1536), crops_coords_top_left=(8, 0), generator=_gen(), **FAST)
        given = seen[-1]
    finally:
        hook.remove()
    assert default.tolist() == [[64.0, 96.0, 0.0, 0.0, 32.0, 48.0]] * 2  # the photo's size, the processing size
    assert given.tolist() == [[1024.0, 1536.0, 8.0, 0.0, 32.0, 48.0]] * 2
    theirs = _diffusers(components)(
        "a", image=photo, mask_image=Image.fromarray(255 - mask), strength=1.0, original_size=(64, 96),
        generator=_gen(), **{**FAST, "output_type": "latent"},
    ).images  # fmt: skip
    ours = pipe("a", photo, mask, generator=_gen(), **{**FAST, "output_type": "latent"}).images
    assert (ours - theirs).abs().max() <= 1e-5


def test_sd_pipeline_refuses_sdxl_arguments_and_sdxl_needs_pooled_embeds(tokenizer):
    sd = _ours({**{k: v for k, v in _components(tokenizer).items() if not k.endswith("_2")}, "unet": build_tiny_unet()})
    photo, mask, _ = _inputs()
    with pytest.raises(InvalidInputError, match="prompt_2: only SDXL"):
        sd("a", photo, mask, prompt_2="b", **FAST)
    xl = _ours(_components(tokenizer))
    embeds = xl.encode_prompt("a", torch.device("cpu"), 1, False)[0]
    with pytest.raises(InvalidInputError, match="pooled_prompt_embeds"):
        xl(prompt_embeds=embeds, image=photo, product_mask=mask, **FAST)
    with pytest.raises(InvalidInputError, match="original_size"):
        xl("a", photo, mask, original_size=(10,), **FAST)


def test_precomputed_sdxl_embeddings_equal_prompts(tokenizer):
    pipe = _ours(_components(tokenizer))
    photo, mask, _ = _inputs()
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a lamp", torch.device("cpu"), 1, True, negative_prompt="dark"
    )
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
    from_prompt = pipe("a lamp", photo, mask, negative_prompt="dark", generator=_gen(4), **FAST).images
    from_embeds = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled, image=photo, product_mask=mask, generator=_gen(4), **FAST,
    ).images  # fmt: skip
    assert np.array_equal(from_prompt, from_embeds)


# ----------------------------------------------------------------------------- the adapter on SDXL


def test_adapter_covers_every_sdxl_cross_attention_layer_at_width_2048():
    """The full-size SDXL-inpainting UNet (meta device: shapes only): 70 cross-attention layers take the
    reference, and the public SDXL IP-Adapter layouts' shapes come out of the export."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_inpainting_unet_config())
    layers = cross_attention_layers(unet)
    assert len(layers) == 70
    plus = AdapterConfig("resampler", image_embed_dim=1280, num_tokens=16, resampler_dim=1280,
                         resampler_depth=4, resampler_heads=20, resampler_dim_head=64)  # fmt: skip
    install_reference_adapter(unet, plus)
    state = adapter_state_dict(unet)
    refs = {k: v for k, v in state.items() if ".to_k_ref." in k or ".to_v_ref." in k}
    assert len(refs) == 140 and {v.shape[1] for v in refs.values()} == {2048}
    assert {v.shape[0] for v in refs.values()} == {640, 1280}
    projection = unet.encoder_hid_proj
    assert projection.proj_out.weight.shape == (2048, 1280) and projection.latents.shape == (1, 16, 1280)
    assert sum(p.numel() for p in adapter_parameters(unet)) > 0


@pytest.mark.parametrize("config", [LINEAR, RESAMPLER], ids=["ip-adapter_sdxl", "ip-adapter-plus_sdxl"])
def test_sdxl_ip_adapter_export_and_import_equal_diffusers_load_ip_adapter(tokenizer, tmp_path, config):
    source = build_tiny_sdxl_unet().eval()
    install_reference_adapter(source, config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for param in adapter_parameters(source):
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    path = export_ip_adapter(source, tmp_path / "ip_adapter.safetensors")
    pipe = _diffusers(_components(tokenizer))
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    imported = build_tiny_sdxl_unet().eval()
    import_ip_adapter(imported, path)

    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 9, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 7, 64, generator=g)
    extra = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    features = torch.randn((2, 24) if config.projection == "linear" else (2, 17, 32), generator=g)
    with torch.no_grad():
        theirs = pipe.unet(x, t, text, added_cond_kwargs={**extra, "image_embeds": [features[:, None]]}).sample
        for unet in (source, imported):
            ours = unet(x, t, text, added_cond_kwargs={**extra, "image_embeds": features}).sample
            assert (theirs - ours).abs().max() <= 1e-5


def test_sdxl_reference_and_dual_guidance(adapted):
    photo, mask, reference = _inputs()

    def run(**extra):
        return adapted("a beach", photo, mask, generator=_gen(2), paste_product=False, **{**FAST, **extra}).images

    text_only = run()
    with_ref = run(reference_image=reference)
    assert np.abs(with_ref - text_only).max() > 1e-3
    assert np.abs(run(reference_image=reference, reference_guidance_scale=0.0) - text_only).max() <= 1e-6

    def latents(s_text, s_ref):
        return run(reference_image=reference, negative_prompt="dark", text_guidance_scale=s_text,
                   reference_guidance_scale=s_ref, num_inference_steps=1, output_type="latent").double()  # fmt: skip

    uncond, text, text_ref = latents(0.0, 0.0), latents(1.0, 0.0), latents(1.0, 1.0)
    expected = uncond + 4.0 * (text - uncond) + 2.5 * (text_ref - text)
    assert torch.allclose(latents(4.0, 2.5), expected, atol=1e-4)


def test_sdxl_product_pixels_are_exact_at_any_aspect_ratio(adapted):
    photo, mask, reference = _inputs(width=40, height=72, seed=3)
    image = adapted("a shelf", photo, mask, reference_image=reference, resolution=64, generator=_gen(), num_inference_steps=2).images[0]
    assert image.size == (40, 72)
    product = mask == 255
    assert np.array_equal(np.asarray(image)[product], np.asarray(photo)[product])


def test_sdxl_pipeline_save_and_load_round_trip(adapted, tmp_path):
    adapted.save_pretrained(tmp_path / "pipe")
    loaded = DreamPainterPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.backbone.name == "sdxl" and loaded.has_reference_adapter
    photo, mask, reference = _inputs()
    call = dict(reference_image=reference, text_guidance_scale=5.0, reference_guidance_scale=3.0, **FAST)
    a = adapted("a room", photo, mask, generator=_gen(1), **call).images
    b = loaded("a room", photo, mask, generator=_gen(1), **call).images
    assert np.abs(a - b).max() <= 1e-6
