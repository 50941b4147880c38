"""What a diffusers user does every day, on a tiny pipeline: processor changes, callbacks, precomputed
conditions, batched inputs, other VAEs, pipeline conveniences, CPU offload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from diffusers.callbacks import IPAdapterScaleCutoffCallback, SDCFGCutoffCallback
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from dreampainter.errors import InvalidInputError
from dreampainter.models import adapter_state_dict, reference_layers
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.toy.models import build_clip_tokenizer
from dreampainter.toy.pipeline import build_tiny_pipeline

STEPS = 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _pipe(tokenizer, projection="linear"):
    pipe = build_tiny_pipeline(None, projection=projection, tokenizer=tokenizer)
    with torch.no_grad():  # a reference that matters: to_k_ref / to_v_ref differ from to_k / to_v
        for attn in reference_layers(pipe.unet).values():
            attn.to_k_ref.weight.mul_(1.5)
            attn.to_v_ref.weight.add_(0.05)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tokenizer):
    return _pipe(tokenizer)


def _inputs(width=32, height=32, seed=0):
    rng = np.random.default_rng(seed)
    photo = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 2 * width // 3] = 255
    reference = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return photo, mask, reference


def _run(pipe, reference=True, seed=0, **kwargs):
    photo, mask, ref = _inputs()
    kwargs.setdefault("prompt", "a marble table")
    kwargs.setdefault("image", photo)
    kwargs.setdefault("product_mask", mask)
    if reference and "reference_image_embeds" not in kwargs:
        kwargs.setdefault("reference_image", ref)
    return pipe(
        num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(seed),
        paste_product=False, text_guidance_scale=4.0, reference_guidance_scale=2.0, **kwargs,
    ).images  # fmt: skip


def _unet_batch_sizes(pipe):
    sizes = []
    pipe.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


# ----------------------------------------------------------------------------- 1, 2: processors, casting

PROCESSOR_CHANGES = {
    "attention_slicing": lambda pipe: pipe.enable_attention_slicing(1),
    "slicing_then_disabled": lambda pipe: (pipe.enable_attention_slicing(), pipe.disable_attention_slicing()),
    "fused_qkv": lambda pipe: pipe.fuse_qkv_projections(),
    "fused_then_unfused": lambda pipe: (pipe.fuse_qkv_projections(), pipe.unfuse_qkv_projections()),
    "default_processors": lambda pipe: pipe.unet.set_default_attn_processor(),
}


@pytest.mark.parametrize("change", list(PROCESSOR_CHANGES))
def test_processor_changes_keep_the_reference_and_save_reload_to_the_same_images(pipe, change, tmp_path):
    plain, text_only = _run(pipe), _run(pipe, reference=False)
    weights = {k: v.clone() for k, v in adapter_state_dict(pipe.unet).items()}
    PROCESSOR_CHANGES[change](pipe)
    changed = _run(pipe)
    assert np.abs(changed - plain).max() < 1e-5
    assert np.abs(changed - text_only).max() > 1e-3  # the reference still acts
    after = adapter_state_dict(pipe.unet)
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = DreamPainterPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert np.abs(_run(reloaded) - plain).max() < 1e-5


def test_layerwise_casting_with_and_without_reference(pipe):
    pipe.to(dtype=torch.bfloat16)
    plain, text_only = _run(pipe), _run(pipe, reference=False)
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    cast, cast_text_only = _run(pipe), _run(pipe, reference=False)
    assert np.isfinite(cast).all() and np.isfinite(cast_text_only).all()
    assert np.abs(cast - plain).mean() < 0.05 and np.abs(cast_text_only - text_only).mean() < 0.05


def test_save_refuses_an_unfused_lora_before_writing_anything(pipe, tmp_path):
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    with pytest.raises(InvalidInputError, match="unfused LoRA"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "reference_adapter" / "adapter.safetensors").exists()


def test_save_refuses_an_incomplete_adapter_before_writing_anything(pipe, tmp_path):
    attn = next(iter(reference_layers(pipe.unet).values()))
    del attn._modules["to_k_ref"]
    with pytest.raises(InvalidInputError, match="to_k_ref"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


# ----------------------------------------------------------------------------- 3: step-end callbacks


def test_callback_sees_the_pipeline_state(pipe):
    seen = []

    def callback(p, step, t, tensors):
        seen.append((p.num_timesteps, p.guidance_scale, p.reference_guidance_scale,
                     p.do_classifier_free_guidance, p.do_reference_guidance, tuple(tensors["prompt_embeds"].shape)))
        return {}

    _run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert seen[0][:5] == (STEPS, 4.0, 2.0, True, True) and len(seen) == STEPS
    assert seen[0][5][0] == 3  # three branches: unconditional, text, text + reference


def test_returned_prompt_and_image_embeds_are_used_by_the_next_steps(pipe):
    replaced, received = {}, []

    def callback(p, step, t, tensors):
        received.append({k: v.clone() for k, v in tensors.items()})
        if step == 0:
            replaced["prompt_embeds"] = tensors["prompt_embeds"] * 0.5
            replaced["image_embeds"] = tensors["image_embeds"] + 1.0
            return dict(replaced)
        return {}

    names = ["prompt_embeds", "image_embeds"]
    result = _run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names)
    for name in names:
        assert torch.equal(received[1][name], replaced[name])
    assert np.abs(result - _run(pipe)).max() > 1e-4


def test_diffusers_cfg_cutoff_callback_turns_guidance_off(pipe):
    sizes = _unet_batch_sizes(pipe)
    callback = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    pipe(prompt="a table", image=_inputs()[0], product_mask=_inputs()[1], reference_image=_inputs()[2],
         text_guidance_scale=3.0, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0),
         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)  # fmt: skip
    assert sizes == [2, 2, 1, 1]  # unconditional + text&reference, then the conditional branch alone
    assert pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance


def test_diffusers_ip_adapter_scale_cutoff_callback_sets_the_reference_scale(pipe):
    callback = IPAdapterScaleCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    _run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    assert {attn.reference_scale for attn in reference_layers(pipe.unet).values()} == {0.0}


def test_interrupt_skips_the_remaining_steps(pipe):
    sizes = _unet_batch_sizes(pipe)

    def stop(p, step, t, tensors):
        p._interrupt = step >= 0
        return {}

    _run(pipe, callback_on_step_end=stop)
    assert len(sizes) == 1


# ----------------------------------------------------------------------------- 4: precomputed conditions


def test_precomputed_embeddings_and_latents_give_the_same_image(pipe, tokenizer):
    photo, mask, reference = _inputs()
    expected = _run(pipe, negative_prompt="blurry")
    prompt_embeds, negative_embeds = pipe.encode_prompt("a marble table", torch.device("cpu"), 1, True, "blurry")
    reference_embeds = pipe.encode_reference([reference], torch.device("cpu"), 1)
    generator = torch.Generator().manual_seed(0)
    latents = randn_tensor((1, 4, 16, 16), generator=generator)
    result = pipe(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=photo, product_mask=mask,
        reference_image_embeds=reference_embeds, latents=latents, generator=generator, num_inference_steps=STEPS,
        output_type="np", paste_product=False, text_guidance_scale=4.0, reference_guidance_scale=2.0,
    ).images  # fmt: skip
    assert np.array_equal(result, expected)


def test_encode_prompt_on_a_pipeline_with_only_the_text_components(pipe):
    text_only = DreamPainterPipeline(vae=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     unet=None, scheduler=None)  # fmt: skip
    ours, negative = text_only.encode_prompt(["a", "b"], torch.device("cpu"), 2, True, "c")
    full, full_negative = pipe.encode_prompt(["a", "b"], torch.device("cpu"), 2, True, "c")
    assert ours.shape[0] == 4 and torch.equal(ours, full) and torch.equal(negative, full_negative)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 32)), "exactly one"),
        (dict(prompt=None), "exactly one"),
        (dict(negative_prompt_embeds=torch.zeros(1, 77, 32)), "same shape"),
        (dict(reference_image_embeds=torch.zeros(3, 24)), "expected 1 or 1 rows"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents: expected shape \(1, 4, 16, 16\)"),
    ],
)
def test_bad_precomputed_inputs_are_one_line_errors(pipe, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        _run(pipe, **kwargs)


# ----------------------------------------------------------------------------- 5: batched inputs


def test_batched_arrays_equal_the_same_images_as_lists(pipe):
    photos = [_inputs(seed=s)[0] for s in range(2)]
    masks = [_inputs(seed=s)[1] for s in range(2)]
    as_list = _run(pipe, prompt=["a", "b"], image=photos, product_mask=masks)
    numpy_batch = _run(pipe, prompt=["a", "b"], image=np.stack([np.asarray(p) for p in photos]),
                       product_mask=np.stack(masks))  # fmt: skip
    torch_batch = _run(
        pipe, prompt=["a", "b"],
        image=torch.stack([torch.from_numpy(np.asarray(p)).permute(2, 0, 1).float() / 255 for p in photos]),
        product_mask=torch.stack([torch.from_numpy(m).float()[None] / 255 for m in masks]),
    )  # fmt: skip
    assert np.array_equal(numpy_batch, as_list)
    assert np.abs(torch_batch - as_list).max() < 1e-6


def test_one_mask_is_shared_by_a_list_of_images(pipe):
    photos = [_inputs(seed=s)[0] for s in range(2)]
    mask = _inputs()[1]
    assert np.array_equal(_run(pipe, prompt=["a", "b"], image=photos, product_mask=mask),
                          _run(pipe, prompt=["a", "b"], image=photos, product_mask=[mask, mask]))  # fmt: skip


# ----------------------------------------------------------------------------- 6: other VAEs


def test_tiny_autoencoder_taesd_end_to_end(pipe):
    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                            num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4)  # fmt: skip
    fast = DreamPainterPipeline(**{**pipe.components, "vae": taesd})
    fast.set_progress_bar_config(disable=True)
    photo, mask, reference = _inputs(width=40, height=24)
    out = fast("a table", photo, mask, reference_image=reference, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert out.size == photo.size
    assert (np.asarray(out)[mask == 255] == np.asarray(photo)[mask == 255]).all()  # product pixels exact
    text_only = fast("a table", photo, mask, num_inference_steps=2, output_type="np").images
    assert np.isfinite(text_only).all()


# ----------------------------------------------------------------------------- 7: conveniences, offload


def test_freeu_changes_the_output_and_disabling_restores_it(pipe):
    plain = _run(pipe)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    assert np.abs(_run(pipe) - plain).max() > 1e-4
    pipe.disable_freeu()
    assert np.array_equal(_run(pipe), plain)


def test_vae_slicing_and_tiling_keep_the_images(pipe):
    plain = _run(pipe, prompt=["a", "b"])
    pipe.enable_vae_slicing()
    pipe.enable_vae_tiling()
    assert np.abs(_run(pipe, prompt=["a", "b"]) - plain).max() < 1e-5
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    pipe.disable_vae_slicing()
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


def test_model_cpu_offload_hooks_every_model_in_order_and_keeps_the_images(pipe):
    """On a CPU the offload device is the CPU itself: this checks the hooks and the component order,
    not the memory saving (which needs a GPU)."""
    plain = _run(pipe)
    sequence = pipe.model_cpu_offload_seq.split("->")
    assert sequence == ["text_encoder", "text_encoder_2", "reference_encoder", "unet", "vae"]
    order = [name for name in sequence if pipe.components[name] is not None]  # SD: no text_encoder_2
    assert order == ["text_encoder", "reference_encoder", "unet", "vae"]
    pipe.enable_model_cpu_offload(device="cpu")
    models = {name for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert models == set(order)
    hooks = [pipe.components[name]._hf_hook for name in order]
    assert [hook.prev_module_hook.hook for hook in hooks[1:]] == hooks[:-1]  # each offloads the one before it
    assert np.abs(_run(pipe) - plain).max() < 1e-5


def test_sequential_cpu_offload_hooks_every_leaf_module(pipe):
    """accelerate cannot run sequential offload with the CPU as execution device (it fails the same way for
    diffusers' own pipelines); what a CPU can check is that every weight of every model is hooked."""
    pipe.enable_sequential_cpu_offload(device="cpu")
    for name in pipe.model_cpu_offload_seq.split("->"):
        model = pipe.components[name]
        if model is None:  # text_encoder_2 on an SD pipeline
            continue
        with_weights = [m for m in model.modules() if list(m.parameters(recurse=False))]
        assert with_weights and all(hasattr(m, "_hf_hook") for m in with_weights), name
