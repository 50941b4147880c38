"""DreamPainterPipeline end to end with tiny real components: diffusers equality, dual guidance, batching, I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.pipelines.pipeline_dreampainter import ADAPTER_SUBFOLDER
from dreampainter.toy.models import (
    build_clip_tokenizer,
    build_tiny_scheduler,
    build_tiny_text_encoder,
    build_tiny_unet,
    build_tiny_vae,
)
from dreampainter.toy.pipeline import build_tiny_pipeline

STEPS = 3
FAST = dict(num_inference_steps=STEPS, output_type="np")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return build_clip_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def pipe(tokenizer_dir, tokenizer):
    pipe = build_tiny_pipeline(tokenizer_dir, projection="linear", tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_only_components(tokenizer):
    return dict(
        vae=build_tiny_vae(),
        text_encoder=build_tiny_text_encoder(),
        tokenizer=tokenizer,
        unet=build_tiny_unet(),
        scheduler=build_tiny_scheduler(),
    )


def _diffusers(components) -> StableDiffusionInpaintPipeline:
    pipe = StableDiffusionInpaintPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
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


# ----------------------------------------------------------------------------- equality with diffusers


@pytest.mark.parametrize("guidance, num_images", [(7.5, 1), (1.0, 1), (5.0, 2)])
def test_text_only_equals_diffusers_inpaint_pipeline(tokenizer, guidance, num_images):
    components = _text_only_components(tokenizer)
    ours = DreamPainterPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    photo, mask, _ = _inputs()
    generators = [_gen(seed) for seed in range(num_images)] if num_images > 1 else _gen(3)
    result = ours(
        "a marble table",
        photo,
        mask,
        text_guidance_scale=guidance,
        num_images_per_prompt=num_images,
        generator=generators,
        paste_product=False,
        negative_prompt="blurry",
        **FAST,
    ).images
    generators = [_gen(seed) for seed in range(num_images)] if num_images > 1 else _gen(3)
    expected = _diffusers(components)(
        "a marble table",
        image=photo,
        mask_image=Image.fromarray(255 - mask),
        height=32,
        width=48,
        guidance_scale=guidance,
        num_images_per_prompt=num_images,
        generator=generators,
        negative_prompt="blurry",
        **FAST,
    ).images
    assert result.shape == expected.shape == (num_images, 32, 48, 3)
    assert np.abs(result - expected).max() <= 1e-6


@pytest.mark.parametrize("scheduler_class", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_text_only_equals_diffusers_with_other_schedulers(tokenizer, scheduler_class):
    components = _text_only_components(tokenizer)
    components["scheduler"] = scheduler_class.from_config(components["scheduler"].config)
    ours = DreamPainterPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    photo, mask, _ = _inputs()
    result = ours("a sofa", photo, mask, generator=_gen(9), paste_product=False, **FAST).images
    expected = _diffusers(components)(
        "a sofa",
        image=photo,
        mask_image=Image.fromarray(255 - mask),
        height=32,
        width=48,
        guidance_scale=7.5,
        generator=_gen(9),
        **FAST,
    ).images
    assert np.abs(result - expected).max() <= 1e-6


def test_adapter_without_reference_equals_diffusers_with_the_plain_unet(tokenizer, pipe):
    """Zero reference features in every branch give exactly the text-only UNet's result."""
    photo, mask, _ = _inputs()
    result = pipe("a wooden desk", photo, mask, generator=_gen(1), paste_product=False, **FAST).images
    components = _text_only_components(tokenizer)  # same seeds: the adapter's base weights
    expected = _diffusers(components)(
        "a wooden desk",
        image=photo,
        mask_image=Image.fromarray(255 - mask),
        height=32,
        width=48,
        guidance_scale=7.5,
        generator=_gen(1),
        **FAST,
    ).images
    assert np.abs(result - expected).max() <= 1e-5


# ----------------------------------------------------------------------------- the reference and dual guidance


def test_reference_changes_the_result_and_reference_guidance_zero_ignores_it(pipe):
    photo, mask, reference = _inputs()
    other = Image.fromarray(np.asarray(reference)[::-1, ::-1].copy())
    kwargs = dict(generator=None, paste_product=False, **FAST)

    def run(**extra):
        return pipe("a beach", photo, mask, **{**kwargs, "generator": _gen(2), **extra}).images

    text_only = run()
    with_ref = run(reference_image=reference)
    with_other = run(reference_image=other)
    ignored = run(reference_image=reference, reference_guidance_scale=0.0)
    assert np.abs(with_ref - text_only).max() > 1e-3
    assert np.abs(with_ref - with_other).max() > 1e-3
    assert np.abs(ignored - text_only).max() <= 1e-6
    assert np.abs(run(reference_image=reference, reference_scale=0.0) - text_only).max() <= 1e-5
    assert np.array_equal(run(reference_image=reference), with_ref)  # the call's scale did not stick
    per_block = run(reference_image=reference, reference_scale={"down": 1.0, "mid": 0.0, "up": 0.0})
    assert np.abs(per_block - with_ref).max() > 1e-5 and np.abs(per_block - text_only).max() > 1e-5


def _count_unet_rows(pipe, **call):
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        pipe(**call)
    finally:
        handle.remove()
    return rows


@pytest.mark.parametrize(
    "s_text, s_ref, with_reference, branches",
    [
        (7.5, 7.5, True, 2),
        (7.5, 0.0, True, 2),
        (7.5, 3.0, False, 2),
        (5.0, 3.0, True, 3),
        (1.0, 0.0, False, 1),
    ],
)
def test_one_batched_unet_call_per_step_with_only_needed_branches(
    pipe, s_text, s_ref, with_reference, branches
):
    photo, mask, reference = _inputs()
    rows = _count_unet_rows(
        pipe,
        prompt=["a", "b"],
        image=photo,
        product_mask=mask,
        reference_image=reference if with_reference else None,
        text_guidance_scale=s_text,
        reference_guidance_scale=s_ref,
        generator=_gen(),
        **FAST,
    )
    assert rows == [2 * branches] * STEPS


def test_dual_guidance_is_the_dual_formula_end_to_end(pipe):
    """One DDIM step is affine in eps, so the dual-guided latents must combine the single-branch runs."""
    photo, mask, reference = _inputs()

    def latents(s_text, s_ref):
        return pipe(
            "a kitchen",
            photo,
            mask,
            reference_image=reference,
            negative_prompt="dark",
            text_guidance_scale=s_text,
            reference_guidance_scale=s_ref,
            num_inference_steps=1,
            generator=_gen(5),
            output_type="latent",
        ).images.double()

    uncond, text, text_ref = latents(0.0, 0.0), latents(1.0, 0.0), latents(1.0, 1.0)
    assert (text - uncond).abs().max() > 1e-4 and (text_ref - text).abs().max() > 1e-4
    for s_text, s_ref in [(4.0, 2.5), (3.0, 3.0), (6.0, 0.0)]:
        expected = uncond + s_text * (text - uncond) + s_ref * (text_ref - text)
        assert torch.allclose(latents(s_text, s_ref), expected, atol=1e-4), (s_text, s_ref)


# ----------------------------------------------------------------------------- determinism and batching


def test_deterministic_with_a_generator(pipe):
    photo, mask, reference = _inputs()
    first = pipe("a shelf", photo, mask, reference_image=reference, generator=_gen(7), **FAST).images
    again = pipe("a shelf", photo, mask, reference_image=reference, generator=_gen(7), **FAST).images
    other = pipe("a shelf", photo, mask, reference_image=reference, generator=_gen(8), **FAST).images
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_batched_equals_one_at_a_time(pipe):
    photo_a, mask_a, reference = _inputs(seed=0)
    photo_b, mask_b, _ = _inputs(seed=1)
    batched = pipe(
        ["a loft", "a garden"],
        [photo_a, photo_b],
        [mask_a, mask_b],
        reference_image=[reference, None],
        text_guidance_scale=5.0,
        reference_guidance_scale=3.0,
        num_images_per_prompt=2,
        generator=[_gen(seed) for seed in range(4)],
        **FAST,
    ).images
    single_a = pipe(
        "a loft",
        photo_a,
        mask_a,
        reference_image=reference,
        text_guidance_scale=5.0,
        reference_guidance_scale=3.0,
        num_images_per_prompt=2,
        generator=[_gen(0), _gen(1)],
        **FAST,
    ).images
    single_b = pipe(
        "a garden",
        photo_b,
        mask_b,
        text_guidance_scale=5.0,
        reference_guidance_scale=3.0,
        num_images_per_prompt=2,
        generator=[_gen(2), _gen(3)],
        **FAST,
    ).images
    assert np.abs(batched - np.concatenate([single_a, single_b])).max() <= 1e-4
    assert np.abs(batched[0] - batched[1]).max() > 1e-3  # different generators, different images


def test_images_of_different_sizes_in_one_call_equal_single_calls(pipe):
    photo_a, mask_a, reference = _inputs(width=48, height=32, seed=0)
    photo_b, mask_b, _ = _inputs(width=30, height=40, seed=1)
    common = dict(
        text_guidance_scale=5.0, reference_guidance_scale=3.0, num_inference_steps=STEPS, output_type="np"
    )
    mixed = pipe(
        ["a loft", "a garden", "a cave"], [photo_a, photo_b, photo_a], [mask_a, mask_b, mask_a],
        reference_image=[reference, None, reference], negative_prompt=["dark", "blurry", "noisy"],
        generator=[_gen(seed) for seed in range(3)], **common,
    )  # fmt: skip
    assert isinstance(mixed.images, list) and [image.shape for image in mixed.images] == [
        (32, 48, 3), (40, 30, 3), (32, 48, 3),
    ]  # fmt: skip
    singles = [
        pipe(
            "a loft",
            photo_a,
            mask_a,
            reference_image=reference,
            negative_prompt="dark",
            generator=_gen(0),
            **common,
        ),
        pipe("a garden", photo_b, mask_b, negative_prompt="blurry", generator=_gen(1), **common),
        pipe(
            "a cave",
            photo_a,
            mask_a,
            reference_image=reference,
            negative_prompt="noisy",
            generator=_gen(2),
            **common,
        ),
    ]
    for row, single in zip(mixed.images, singles):
        assert np.abs(row - single.images[0]).max() <= 1e-4
    assert [np.asarray(mask).shape for mask in mixed.masks] == [(32, 48), (40, 30), (32, 48)]


# ----------------------------------------------------------------------------- sizes and compositing


def test_any_input_size_is_processed_at_a_multiple_and_returned_at_input_size(pipe):
    photo, mask, _ = _inputs(width=53, height=37)
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return tensors

    result = pipe("a studio", photo, mask, callback_on_step_end=callback, num_inference_steps=STEPS).images[0]
    assert result.size == (53, 37)
    assert seen == [(1, 4, 18, 26)] * STEPS  # 36x52 pixels at the VAE's factor 2
    seen.clear()
    big, big_mask, _ = _inputs(width=128, height=64)
    result = pipe("a studio", big, big_mask, resolution=32, callback_on_step_end=callback, **FAST).images
    assert result.shape == (1, 64, 128, 3)
    assert seen[0][-2:] == (11, 23)  # about 32x32 pixels: 22x46 at factor 2


def test_product_pixels_are_pasted_back_with_a_feathered_edge(pipe):
    photo, mask, reference = _inputs()
    kwargs = dict(reference_image=reference, generator=None, num_inference_steps=STEPS)
    pasted = pipe("a desk", photo, mask, **{**kwargs, "generator": _gen(4)}, feather_radius=2.0).images[0]
    raw = pipe("a desk", photo, mask, **{**kwargs, "generator": _gen(4)}, paste_product=False).images[0]
    pasted, raw, original = (np.asarray(image).astype(int) for image in (pasted, raw, photo))
    product = mask == 255
    assert (pasted[product] == original[product]).all()
    assert np.abs(raw[product] - original[product]).max() > 10  # the model alone does not keep them
    far = np.zeros_like(product)
    far[:, :2] = far[:, 42:] = True  # 10 px from the product: beyond the feather
    assert (pasted[far] == raw[far]).all()
    edge = (slice(8, 24), 32)  # just right of the product: a blend of both
    assert not (pasted[edge] == raw[edge]).all() and not (pasted[edge] == original[edge]).all()


def test_rgba_cutout_and_array_tensor_inputs_equal_pil_inputs(pipe):
    photo, mask, reference = _inputs()
    rgba = Image.fromarray(np.dstack([np.asarray(photo), mask]))
    from_rgba = pipe("a lawn", rgba, reference_image=reference, generator=_gen(), **FAST).images
    from_mask = pipe("a lawn", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    assert np.array_equal(from_rgba, from_mask)
    photo_tensor = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float() / 255
    reference_tensor = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1).float() / 255
    from_tensors = pipe(
        "a lawn", photo_tensor, mask > 0, reference_image=reference_tensor, generator=_gen(), **FAST
    ).images
    from_arrays = pipe(
        "a lawn", np.asarray(photo), mask, reference_image=np.asarray(reference), generator=_gen(), **FAST
    )
    assert np.array_equal(from_tensors, from_mask) and np.array_equal(from_arrays.images, from_mask)


def test_outputs_masks_and_callback(pipe):
    photo, mask, _ = _inputs()
    calls = []

    def zero_latents(pipeline, step, timestep, tensors):
        calls.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])}

    output = pipe("a room", photo, mask, generator=_gen(), **{**FAST, "output_type": "pt"})
    zeroed = pipe("a room", photo, mask, generator=_gen(), callback_on_step_end=zero_latents, **FAST).images
    assert calls == list(range(STEPS))
    assert output.images.shape == (1, 3, 32, 48) and output.images.dtype == torch.float32
    assert np.abs(output.images.permute(0, 2, 3, 1).numpy() - zeroed).max() > 1e-3
    assert len(output.masks) == 1 and (np.asarray(output.masks[0]) == 255 - mask).all()
    latents = pipe("a room", photo, mask, generator=_gen(), **{**FAST, "output_type": "latent"}).images
    assert latents.shape == (1, 4, 16, 24)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps: must be a positive integer"),
        (dict(num_inference_steps=-3), "num_inference_steps"),
        (dict(text_guidance_scale=float("nan")), "text_guidance_scale: must be a finite number"),
        (dict(text_guidance_scale=-1.0), "text_guidance_scale"),
        (dict(reference_guidance_scale=float("nan")), "reference_guidance_scale"),
        (dict(reference_scale=float("nan")), "reference_scale"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(generator=[torch.Generator()] * 3), "generator: got 3 generators for 1 results"),
        (dict(height=30, width=47), "width: must be a multiple of 2"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(max_pixels=100), "over the limit of 100"),
        (dict(callback_on_step_end_tensor_inputs=["latentz"]), "callback_on_step_end_tensor_inputs: unknown"),
        (dict(height=32), "height/width: give both or neither"),
        (dict(resolution=0), "resolution: must be a positive integer"),
    ],
)
def test_bad_arguments_raise_one_line_errors(pipe, kwargs, message):
    photo, mask, reference = _inputs()
    with pytest.raises(InvalidInputError, match=message) as error:
        pipe("a room", photo, mask, reference_image=reference, **{**FAST, **kwargs})
    assert "\n" not in str(error.value)


CHECKED_ARGUMENTS = [
    (dict(num_inference_steps=0), "num_inference_steps: must be a positive integer"),
    (dict(num_images_per_prompt=1.5), "num_images_per_prompt: must be a positive integer"),
    (dict(text_guidance_scale=float("nan")), "text_guidance_scale: must be a finite number"),
    (dict(reference_guidance_scale=-1.0), "reference_guidance_scale: must be a finite number >= 0"),
    (dict(reference_scale="big"), "reference_scale: must be a finite number >= 0"),
    (dict(generator=[torch.Generator()] * 3), "generator: got 3 generators for 1 results"),
    (dict(height=30, width=47), "width: must be a multiple of 2"),
    (dict(height=32), "height/width: give both or neither"),
    (dict(resolution=0), "resolution: must be a positive integer"),
    (dict(output_type="jpeg"), "output_type: must be pil, np, pt or latent"),
    (dict(product_dilation=-1), "product_dilation and feather_radius: must be >= 0"),
    (dict(callback_on_step_end_tensor_inputs=["latentz"]), "callback_on_step_end_tensor_inputs: unknown"),
    (dict(prompt=["a", 3]), "prompt: must be a string or a list of strings"),
    (dict(prompt=[]), "prompt: the list is empty"),
    (dict(prompt=["a", "b", "c"], image=["<photo>"] * 2, product_mask=["<mask>"] * 2), "image: got 2 values"),
    (dict(product_mask=["<mask>"] * 2), "product_mask: got 2 masks for 1 images"),
    (dict(negative_prompt=["x", "y"]), "negative_prompt: got 2 values for 1 prompts"),
    (dict(reference_image="<reference>"), "reference_image: this pipeline has no reference encoder"),
]


@pytest.mark.parametrize("kwargs, message", CHECKED_ARGUMENTS)
def test_check_inputs_refuses_bad_arguments_before_any_image_or_model_is_touched(tokenizer, kwargs, message):
    pipe = DreamPainterPipeline(**_text_only_components(tokenizer))

    def refuse(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    pipe.unet.register_forward_pre_hook(refuse)
    pipe.text_encoder.register_forward_pre_hook(refuse)
    pipe.vae.encode = pipe.vae.decode = refuse
    call = dict(prompt="a room", image="<photo>", product_mask="<mask>", **FAST)
    with pytest.raises(InvalidInputError, match=message) as error:
        pipe.check_inputs(**{**call, **kwargs})  # placeholders: no image is decoded here
    assert "\n" not in str(error.value)
    assert pipe.check_inputs(**call) is None
    photo, mask, reference = _inputs()
    images = {"<photo>": photo, "<mask>": mask, "<reference>": reference}

    def real(value):
        if isinstance(value, list):
            return [real(item) for item in value]
        return images[value] if isinstance(value, str) and value in images else value

    with pytest.raises(InvalidInputError, match=message):
        pipe(**{name: real(value) for name, value in {**call, **kwargs}.items()})  # before any model runs


def test_prepare_latents_draws_noise_or_takes_given_latents(pipe):
    pipe.scheduler.set_timesteps(STEPS)
    sigma = pipe.scheduler.init_noise_sigma
    args = (2, 4, 32, 48, torch.float32, torch.device("cpu"))
    noise = pipe.prepare_latents(*args, _gen(1))
    assert torch.equal(noise, torch.randn((2, 4, 16, 24), generator=_gen(1)) * sigma)
    given = torch.rand(2, 4, 16, 24, dtype=torch.float64)
    taken = pipe.prepare_latents(*args, _gen(1), latents=given)
    assert taken.dtype == torch.float32 and torch.equal(taken, given.float() * sigma)


def test_reference_without_adapter_is_refused(tokenizer):
    text_only = DreamPainterPipeline(**_text_only_components(tokenizer))
    photo, mask, reference = _inputs()
    with pytest.raises(InvalidInputError, match="reference_image: this pipeline has no reference encoder"):
        text_only("a room", photo, mask, reference_image=reference, **FAST)


def test_mismatched_batch_lengths_are_refused(pipe):
    photo, mask, reference = _inputs()
    with pytest.raises(InvalidInputError, match="image: got 2 values for 3 prompts"):
        pipe(["a", "b", "c"], [photo, photo], [mask, mask], **FAST)
    with pytest.raises(InvalidInputError, match="reference_image: got 2 values for 3 prompts"):
        pipe(["a", "b", "c"], photo, mask, reference_image=[reference, reference], **FAST)


# ----------------------------------------------------------------------------- saving, loading, devices


@pytest.mark.parametrize("projection, backend", [("linear", "transformers"), ("resampler", "open_clip")])
def test_save_and_load_roundtrip_offline(tokenizer, tmp_path, projection, backend):
    pipe = build_tiny_pipeline(None, projection=projection, backend=backend, seed=1, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    photo, mask, reference = _inputs()
    before = pipe("a cafe", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    pipe.save_pretrained(tmp_path / "pipe")

    # unet/ is a plain diffusers UNet; the adapter lives beside it.
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet")
    assert unet.config.encoder_hid_dim_type is None and unet.encoder_hid_proj is None
    assert not any("_ref" in name for name in unet.state_dict())
    assert (tmp_path / "pipe" / ADAPTER_SUBFOLDER / "adapter.safetensors").is_file()
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DreamPainterPipeline"

    loaded = DreamPainterPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.has_reference_adapter
    assert loaded.unet.reference_adapter_config.projection == projection
    after = loaded("a cafe", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    assert np.abs(before - after).max() <= 1e-5
    assert pipe.has_reference_adapter  # saving left the live pipeline intact


def test_text_only_pipeline_saves_without_an_adapter_folder(tokenizer, tmp_path):
    text_only = DreamPainterPipeline(**_text_only_components(tokenizer))
    (tmp_path / "pipe" / ADAPTER_SUBFOLDER).mkdir(parents=True)  # a stale adapter from an earlier save
    text_only.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe" / ADAPTER_SUBFOLDER).exists()
    loaded = DreamPainterPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.reference_encoder is None and not loaded.has_reference_adapter


def test_loading_a_missing_folder_names_it(tmp_path):
    with pytest.raises(MissingFileError, match="model_index.json"):
        DreamPainterPipeline.from_pretrained(tmp_path / "nowhere")


def test_to_dtype_runs_in_bfloat16(tokenizer):
    pipe = build_tiny_pipeline(None, tokenizer=tokenizer).to("cpu", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    photo, mask, reference = _inputs()
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    result = pipe("a hall", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    assert result.shape == (1, 32, 48, 3) and np.isfinite(result).all()
    pipe.vae.to(torch.float32)  # a bf16 UNet with an fp32 VAE (as SD pipelines often keep it)
    mixed = pipe("a hall", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    assert np.isfinite(mixed).all() and np.abs(mixed - result).max() < 0.25
