"""In-context reference conditioning (reference_mode in_context / both): the mechanism, the pipeline, I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from dreampainter.errors import InvalidInputError
from dreampainter.models import (
    AdapterConfig,
    get_adapter_config,
    in_context_reference,
    install_reference_adapter,
    record_reference,
    reference_pass_input,
    remove_reference_adapter,
    set_rows,
)
from dreampainter.models.in_context import clear, in_context_layers, self_attention_layers
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.pipelines.pipeline_dreampainter import ADAPTER_SUBFOLDER
from dreampainter.toy.models import build_clip_tokenizer, build_tiny_unet
from dreampainter.toy.pipeline import build_tiny_pipeline

FAST = dict(num_inference_steps=3, output_type="np", text_guidance_scale=3.0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _unet(mode: str = "in_context") -> UNet2DConditionModel:
    unet = build_tiny_unet(seed=0)
    install_reference_adapter(unet, AdapterConfig(reference_mode=mode, image_embed_dim=32))
    return unet


def _call_inputs(batch: int = 3):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, 9, 8, 8, generator=g)
    return sample, torch.full((batch,), 500), torch.randn(batch, 7, 32, generator=g)


def _pipe(tokenizer, mode: str) -> DreamPainterPipeline:
    pipe = build_tiny_pipeline(None, projection="resampler", tokenizer=tokenizer, seed=1)
    config = get_adapter_config(pipe.unet)
    remove_reference_adapter(pipe.unet)
    install_reference_adapter(pipe.unet, AdapterConfig(**{**config.to_dict(), "reference_mode": mode}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 10:22] = 255
    reference = Image.fromarray(rng.integers(0, 255, (40, 24, 3), dtype=np.uint8))  # another size and shape
    return photo, mask, reference


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- the mechanism


def test_in_context_mode_adds_no_weights_and_no_cross_attention_branch():
    plain = build_tiny_unet(seed=0)
    unet = _unet("in_context")
    assert unet.state_dict().keys() == plain.state_dict().keys()
    assert unet.encoder_hid_proj is None
    assert set(in_context_layers(unet)) == set(self_attention_layers(unet)) and in_context_layers(unet)
    both = _unet("both")
    assert both.encoder_hid_proj is not None and in_context_layers(both)


def test_reference_pass_inputs_and_appended_tokens_have_the_right_shapes_and_masks():
    unet = _unet()
    reference = torch.randn(2, 4, 8, 8)
    inputs = reference_pass_input(reference)
    assert inputs.shape == (2, 9, 8, 8)
    assert torch.equal(inputs[:, :4], reference) and torch.equal(inputs[:, 5:], reference)
    assert torch.equal(inputs[:, 4], torch.zeros(2, 8, 8))  # the mask: everything "keep"

    seen = {}  # what each attn1's processor receives, after the in-context hook

    def spy(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[name] = (hidden.shape, kwargs.get("encoder_hidden_states"), kwargs.get("attention_mask"))

        return hook

    for name, attn in self_attention_layers(unet).items():
        attn.register_forward_pre_hook(spy(name), with_kwargs=True)
    sample, t, text = _call_inputs()
    with torch.no_grad(), in_context_reference(unet, reference, torch.tensor([1, -1, 0])):
        unet(sample, t, encoder_hidden_states=text)
    assert len(seen) == len(self_attention_layers(unet))
    for shape, keys, mask in seen.values():
        batch, tokens, _ = shape
        assert keys.shape[:2] == (batch, 2 * tokens)  # own tokens + the reference's (same latent size)
        assert mask.shape == (batch, 1, 2 * tokens)
        assert torch.equal(mask[:, :, :tokens], torch.zeros(batch, 1, tokens))
        assert torch.isinf(mask[1, 0, tokens:]).all() and not mask[[0, 2], :, tokens:].any()
    assert all(getattr(attn, "_dreampainter_in_context_hidden", None) is None for attn in in_context_layers(unet).values())


def test_no_reference_rows_and_scale_zero_are_the_text_only_unet():
    plain = build_tiny_unet(seed=0)
    unet = _unet()
    sample, t, text = _call_inputs()
    reference = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = plain(sample, t, encoder_hidden_states=text).sample
        assert torch.equal(unet(sample, t, encoder_hidden_states=text).sample, expected)
        with in_context_reference(unet, reference, torch.tensor([-1, -1, -1])):
            assert torch.equal(unet(sample, t, encoder_hidden_states=text).sample, expected)
        with in_context_reference(unet, reference, torch.tensor([-1, 0, 1])):
            mixed = unet(sample, t, encoder_hidden_states=text).sample
        for attn in in_context_layers(unet).values():
            attn.in_context_scale = 0.0
        with in_context_reference(unet, reference, torch.tensor([0, 1, 0])):
            assert torch.equal(unet(sample, t, encoder_hidden_states=text).sample, expected)
    # A row without a reference in a batch with references attends only to its own tokens (-inf bias).
    assert torch.allclose(mixed[0], expected[0], atol=1e-6)
    assert (mixed[1:] - expected[1:]).abs().max() > 1e-3  # the others see the reference


def test_gradients_flow_through_both_passes_and_errors_name_the_problem():
    unet = _unet()
    layer = next(iter(in_context_layers(unet).values()))
    reference = torch.randn(1, 4, 8, 8)
    sample, t, text = _call_inputs(1)
    record_reference(unet, reference)
    recorded = layer._dreampainter_in_context_hidden
    assert recorded.requires_grad
    set_rows(unet, torch.tensor([0]))
    unet(sample, t, encoder_hidden_states=text).sample.square().mean().backward()
    assert layer.to_k.weight.grad is not None
    set_rows(unet, torch.tensor([0, 0]))
    with pytest.raises(InvalidInputError, match="in-context rows: 2 given for a UNet call of 1 rows"):
        unet(sample, t, encoder_hidden_states=text)
    clear(unet)
    with pytest.raises(InvalidInputError, match="reference_mode"):
        record_reference(build_tiny_unet(seed=0), reference)
    with pytest.raises(InvalidInputError, match="reference_mode"):
        AdapterConfig(reference_mode="sideways")


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("mode", ["in_context", "both"])
def test_pipeline_without_reference_or_at_scale_zero_is_exactly_text_only(tokenizer, mode):
    pipe = _pipe(tokenizer, mode)
    photo, mask, reference = _images()
    text_only = pipe("a red room", photo, mask, generator=_gen(), **FAST).images
    scale_zero = pipe("a red room", photo, mask, reference_image=reference, reference_scale=0.0,
                      generator=_gen(), **FAST).images
    no_ref_guidance = pipe("a red room", photo, mask, reference_image=reference, reference_guidance_scale=0.0,
                           generator=_gen(), **FAST).images
    with_ref = pipe("a red room", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    assert np.array_equal(scale_zero, text_only)
    assert np.array_equal(no_ref_guidance, text_only)
    assert np.abs(with_ref - text_only).max() > 1e-3
    # The per-call scale was restored.
    assert all(attn.in_context_scale == 1.0 for attn in in_context_layers(pipe.unet).values())


def test_dual_guidance_and_the_reference_never_reach_the_output_image(tokenizer):
    pipe = _pipe(tokenizer, "in_context")
    photo, mask, reference = _images()
    rows_seen = []
    original = pipe.unet.forward

    def forward(sample, *args, **kwargs):
        rows_seen.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    pipe.unet.forward = forward
    try:
        latents = pipe("a red room", photo, mask, reference_image=reference, reference_guidance_scale=1.5,
                       generator=_gen(), **{**FAST, "output_type": "latent"}).images
    finally:
        del pipe.unet.forward
    assert rows_seen == [1, 3, 3, 3]  # one reference pass, then the three guidance branches per step
    side = 32 // pipe.vae_scale_factor
    assert latents.shape == (1, 4, side, side)  # the target's latent size only: no reference half
    result = pipe("a red room", photo, mask, reference_image=reference, generator=_gen(), **FAST).images[0]
    product = mask >= 128
    assert result.shape == (32, 32, 3)
    assert np.array_equal((result[product] * 255).round().astype(np.uint8), np.asarray(photo)[product])


def test_in_context_pipeline_needs_no_reference_encoder_and_refuses_precomputed_embeds(tokenizer):
    pipe = _pipe(tokenizer, "in_context")
    pipe.register_modules(reference_encoder=None)
    photo, mask, reference = _images()
    pipe("a red room", photo, mask, reference_image=reference, generator=_gen(), **FAST)
    with pytest.raises(InvalidInputError, match="reference_image_embeds: in-context"):
        pipe("a red room", photo, mask, reference_image_embeds=torch.zeros(1, 5, 32), generator=_gen(), **FAST)


@pytest.mark.parametrize("mode", ["in_context", "both"])
def test_reference_mode_is_saved_with_the_pipeline_and_reloaded(tokenizer, tmp_path, mode):
    pipe = _pipe(tokenizer, mode)
    photo, mask, reference = _images()
    before = pipe("a red room", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    pipe.save_pretrained(tmp_path / "pipe")
    saved = json.loads((tmp_path / "pipe" / ADAPTER_SUBFOLDER / "adapter_config.json").read_text())
    assert saved["adapter"]["reference_mode"] == mode
    assert UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet").config.encoder_hid_dim_type is None

    loaded = DreamPainterPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert get_adapter_config(loaded.unet).reference_mode == mode
    assert in_context_layers(loaded.unet)
    after = loaded("a red room", photo, mask, reference_image=reference, generator=_gen(), **FAST).images
    assert np.abs(before - after).max() <= 1e-5
    assert in_context_layers(pipe.unet)  # saving left the live pipeline intact


@pytest.mark.parametrize("mode", ["in_context", "both"])
def test_sdxl_in_context_reference_pass_gets_null_sdxl_conditions(tokenizer, mode):
    """On SDXL the reference pass needs pooled embeddings and time ids too (zeros, its own size); without a
    reference the pipeline is exactly text-only, with one the reference changes the result."""
    pipe = build_tiny_pipeline(None, projection="linear", tokenizer=tokenizer, seed=1, backbone="sdxl")
    config = get_adapter_config(pipe.unet)
    remove_reference_adapter(pipe.unet)
    install_reference_adapter(pipe.unet, AdapterConfig(**{**config.to_dict(), "reference_mode": mode}))
    pipe.set_progress_bar_config(disable=True)
    photo, mask, reference = _images()
    call = dict(height=32, width=32, **FAST)
    text_only = pipe("a room", photo, mask, generator=_gen(), **call).images
    with_reference = pipe("a room", photo, mask, reference_image=reference, generator=_gen(), **call).images
    ignored = pipe("a room", photo, mask, reference_image=reference, reference_scale=0.0, generator=_gen(), **call).images
    assert np.abs(with_reference - text_only).max() > 1e-3
    assert np.abs(ignored - text_only).max() <= 1e-5
