"""The reference guidance schedule: the branch measuring the reference (``e(t,∅)``) on some steps only."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter.commands import generate
from dreampainter.errors import InvalidInputError
from dreampainter.models import reference_layers
from dreampainter.pipelines.guidance import TEXT, TEXT_REF, UNCOND, GuidancePlan, ReferenceGuidanceSchedule
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.toy.models import build_clip_tokenizer
from dreampainter.toy.pipeline import build_tiny_pipeline
from dreampainter.utils.config import ConfigValueError


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = build_tiny_pipeline(None, tokenizer=build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    with torch.no_grad():  # a reference that matters
        for attn in reference_layers(pipe.unet).values():
            attn.to_k_ref.weight.mul_(1.5)
            attn.to_v_ref.weight.add_(0.05)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:21] = 255
    reference = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    return photo, mask, reference


def _run(pipe, steps=4, reference=True, text=4.0, ref=2.0, **kwargs):
    photo, mask, reference_image = _inputs()
    return pipe(
        prompt="a marble table", image=photo, product_mask=mask,
        reference_image=reference_image if reference else None, num_inference_steps=steps, output_type="np",
        generator=torch.Generator().manual_seed(0), paste_product=False, text_guidance_scale=text,
        reference_guidance_scale=ref, **kwargs,
    ).images  # fmt: skip


def _batch_sizes(pipe):
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize(
    "interval, every, steps, expected",
    [
        (None, 1, 4, [3, 3, 3, 3]),
        ((0.0, 0.5), 1, 4, [3, 3, 2, 2]),
        (None, 2, 5, [3, 2, 3, 2, 3]),
        ((0.5, 1.0), 2, 6, [2, 2, 2, 3, 2, 3]),
        ((0.2, 0.8), 3, 10, [2, 2, 3, 2, 2, 3, 2, 2, 2, 2]),
    ],
)
def test_branches_per_step_follow_the_schedule(pipe, interval, every, steps, expected):
    sizes, handle = _batch_sizes(pipe)
    try:
        _run(pipe, steps=steps, reference_guidance_interval=interval, reference_guidance_every=every)
    finally:
        handle.remove()
    assert sizes == expected


def test_every_step_and_the_full_interval_are_bitwise_full_dual_guidance(pipe):
    full = _run(pipe)
    assert np.array_equal(_run(pipe, reference_guidance_interval=(0, 1), reference_guidance_every=1), full)
    assert np.array_equal(_run(pipe, reference_guidance_interval=[0.0, 1.0]), full)
    assert not np.array_equal(_run(pipe, reference_guidance_every=2), full)  # the schedule does something


@pytest.mark.parametrize("case", [dict(ref=4.0), dict(reference=False), dict(ref=0.0)])
def test_two_branch_guidance_is_unaffected(pipe, case):
    plain = _run(pipe, **case)
    sizes, handle = _batch_sizes(pipe)
    try:
        scheduled = _run(pipe, reference_guidance_interval=(0.0, 0.5), reference_guidance_every=2, **case)
    finally:
        handle.remove()
    assert np.array_equal(scheduled, plain) and sizes == [2] * 4


def test_reusing_the_last_delta_is_exact_when_the_delta_is_constant(pipe, monkeypatch):
    """A UNet whose reference adds a fixed tensor: the reused delta is the true one on every step."""
    original = pipe.unet.forward

    def forward(sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        embeds = added_cond_kwargs["image_embeds"]
        zeros = {"image_embeds": torch.zeros_like(embeds)}
        out = original(sample, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=zeros, **kwargs)
        has_reference = embeds.flatten(1).abs().sum(1) > 0
        offset = 0.05 * torch.randn(out[0].shape[1:], generator=torch.Generator().manual_seed(3))
        return (out[0] + has_reference[:, None, None, None] * offset,)

    monkeypatch.setattr(pipe.unet, "forward", forward)
    photo, mask, reference = _inputs()

    def latents(**schedule):
        return pipe(
            prompt="a marble table", image=photo, product_mask=mask, reference_image=reference,
            num_inference_steps=5, output_type="latent", generator=torch.Generator().manual_seed(0),
            text_guidance_scale=4.0, reference_guidance_scale=2.0, **schedule,
        ).images  # fmt: skip

    exact = latents()
    torch.testing.assert_close(latents(reference_guidance_every=2), exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(latents(reference_guidance_every=5), exact, rtol=0, atol=1e-5)
    # outside an interval nothing is reused: the reference is guided at s_text there, which differs
    assert not torch.allclose(latents(reference_guidance_interval=(0, 0.4)), exact, atol=1e-4)


def test_reduced_combination_equals_the_full_one_given_the_true_delta():
    plan = GuidancePlan.create(3.0, 5.0, True)
    assert plan.branches == (UNCOND, TEXT, TEXT_REF) and plan.without_text_branch().branches == (UNCOND, TEXT_REF)
    e = {name: torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(plan.branches)}
    full = plan.combine(torch.cat([e[UNCOND], e[TEXT], e[TEXT_REF]]))
    delta = plan.reference_delta(torch.cat([e[UNCOND], e[TEXT], e[TEXT_REF]]))
    reduced = plan.combine_reduced(torch.cat([e[UNCOND], e[TEXT_REF]]), delta)
    torch.testing.assert_close(reduced, full, rtol=0, atol=1e-5)
    plain = GuidancePlan.create(3.0, 3.0, True).combine(torch.cat([e[UNCOND], e[TEXT_REF]]))
    assert torch.equal(plan.combine_reduced(torch.cat([e[UNCOND], e[TEXT_REF]]), None), plain)
    no_cfg = GuidancePlan.create(1.0, 2.0, True)  # text + reference branches only
    assert no_cfg.without_text_branch().branches == (TEXT_REF,)
    torch.testing.assert_close(
        no_cfg.combine_reduced(e[TEXT_REF], e[TEXT_REF] - e[TEXT]),
        no_cfg.combine(torch.cat([e[TEXT], e[TEXT_REF]])), rtol=0, atol=1e-5,
    )  # fmt: skip


BAD = [
    (dict(reference_guidance_interval=(0.5, 0.5)), "reference_guidance_interval: needs 0 <= start < end <= 1"),
    (dict(reference_guidance_interval=(0.2, 1.5)), "reference_guidance_interval: needs 0 <= start < end <= 1"),
    (dict(reference_guidance_interval=(0.2,)), "reference_guidance_interval: must be two fractions"),
    (dict(reference_guidance_interval="01"), "reference_guidance_interval: must be two fractions"),
    (dict(reference_guidance_interval=(0, float("nan"))), "reference_guidance_interval: must be two numbers"),
    (dict(reference_guidance_every=0), "reference_guidance_every: must be a positive integer"),
    (dict(reference_guidance_every=1.5), "reference_guidance_every: must be a positive integer"),
    (dict(reference_guidance_every=True), "reference_guidance_every: must be a positive integer"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_schedules_are_one_line_errors(pipe, kwargs, message):
    with pytest.raises(InvalidInputError) as error:
        _run(pipe, steps=1, **kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    with pytest.raises(InvalidInputError) as error:
        ReferenceGuidanceSchedule.create(kwargs.get("reference_guidance_interval"), kwargs.get("reference_guidance_every", 1))
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigValueError) as error:
        GenerationSettings(**kwargs)
    (key,) = kwargs
    assert error.value.key == key and str(error.value).startswith(f"bad value for '{key}'")
    assert "\n" not in str(error.value)


def test_settings_pass_the_schedule_to_the_pipeline():
    settings = GenerationSettings(reference_guidance_interval=[0, 0.5], reference_guidance_every=2)
    kwargs = settings.pipeline_kwargs()
    assert kwargs["reference_guidance_interval"] == (0.0, 0.5) and kwargs["reference_guidance_every"] == 2
    assert GenerationSettings().pipeline_kwargs()["reference_guidance_interval"] is None


def _flags(*argv):
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    return parser.parse_args(["generate", "--pipeline", "p", "--image", "x.png", "--prompt", "y", "--out", "o", *argv])


def test_generate_flags_set_the_schedule_and_errors_name_the_flag():
    settings = generate._settings(_flags("--reference-guidance-interval", "0", "0.5", "--reference-guidance-every", "3"))
    assert settings.reference_guidance_interval == (0.0, 0.5) and settings.reference_guidance_every == 3
    with pytest.raises(InvalidInputError, match=r"^--reference-guidance-every: must be a positive integer"):
        generate._settings(_flags("--reference-guidance-every", "0"))
    with pytest.raises(InvalidInputError, match=r"^--reference-guidance-interval: needs 0 <= start < end <= 1"):
        generate._settings(_flags("--reference-guidance-interval", "0.7", "0.2"))
