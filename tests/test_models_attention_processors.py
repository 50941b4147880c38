"""The reference branch belongs to the attention modules: any processor change keeps it working and
never loses a weight (slicing, fused QKV, default processors, a user's own processor, layerwise casting)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from dreampainter.errors import InvalidInputError
from dreampainter.models import (
    AdapterConfig,
    adapter_state_dict,
    install_reference_adapter,
    load_adapter,
    reference_layers,
    save_adapter,
)
from dreampainter.toy.models import build_tiny_unet

CONFIG = AdapterConfig("linear", image_embed_dim=24, num_tokens=4)


class CountingProcessor(AttnProcessor2_0):
    """A user's own processor: diffusers' SDPA attention, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.calls += 1
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def _adapted_unet():
    torch.manual_seed(0)
    unet = build_tiny_unet(seed=0)
    install_reference_adapter(unet, CONFIG)
    with torch.no_grad():  # make the reference matter: to_k_ref / to_v_ref differ from to_k / to_v
        for attn in reference_layers(unet).values():
            attn.to_k_ref.weight.mul_(1.5)
            attn.to_v_ref.weight.add_(0.05)
    return unet.eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 9, 16, 16, generator=g)
    text = torch.randn(2, 8, 32, generator=g)
    features = torch.randn(2, 24, generator=g)
    return sample, text, features


def _run(unet, features=None, dtype=torch.float32, **kwargs):
    sample, text, default = _inputs()
    features = default if features is None else features
    sample, text, features = sample.to(dtype), text.to(dtype), features.to(dtype)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": features}, **kwargs).sample


CHANGES = {
    "sliced": lambda unet: unet.set_attention_slice(1),
    "sliced_auto": lambda unet: unet.set_attention_slice("auto"),
    "fused_qkv": lambda unet: unet.fuse_qkv_projections(),
    "default": lambda unet: unet.set_default_attn_processor(),
    "attn_processor": lambda unet: unet.set_attn_processor(AttnProcessor()),
    "users_own": lambda unet: unet.set_attn_processor(CountingProcessor()),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_processor_changes_keep_the_reference_branch_and_its_weights(change, tmp_path):
    unet = _adapted_unet()
    plain = _run(unet)
    text_only = _run(unet, torch.zeros(2, 24))
    weights = {k: v.clone() for k, v in adapter_state_dict(unet).items()}
    CHANGES[change](unet)
    assert torch.allclose(_run(unet), plain, atol=1e-5), change
    assert torch.allclose(_run(unet, torch.zeros(2, 24)), text_only, atol=1e-5)
    assert (_run(unet) - text_only).abs().max() > 1e-3  # the reference still changes the output
    after = adapter_state_dict(unet)
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    # a save after the change reloads, into a fresh UNet, to the same outputs
    save_adapter(unet, tmp_path / "adapter")
    fresh = build_tiny_unet(seed=0).eval()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.allclose(_run(fresh), plain, atol=1e-5)


def test_a_users_processor_is_called_and_the_branch_survives_switching_back():
    unet = _adapted_unet()
    plain = _run(unet)
    counting = CountingProcessor()
    unet.set_attn_processor(counting)
    assert torch.allclose(_run(unet), plain, atol=1e-5)
    assert counting.calls > 0
    unet.set_attn_processor(AttnProcessor2_0())
    assert torch.allclose(_run(unet), plain, atol=1e-6)


def test_sliced_processor_is_really_in_use():
    unet = _adapted_unet()
    unet.set_attention_slice(1)
    assert all(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())


def test_call_level_scale_is_taken_by_the_branch_not_handed_to_the_processor():
    unet = _adapted_unet()
    unet.set_attention_slice(1)  # diffusers' sliced processor takes no extra keyword
    zero = _run(unet, cross_attention_kwargs={"reference_scale": 0.0})
    assert torch.allclose(zero, _run(unet, torch.zeros(2, 24)), atol=1e-6)


def test_deep_copies_and_removal_keep_hooks_separate():
    unet = _adapted_unet()
    plain = _run(unet)
    clone = copy.deepcopy(unet)
    from dreampainter.models import remove_reference_adapter

    remove_reference_adapter(clone)
    assert torch.allclose(_run(unet), plain, atol=0)  # removing the copy's branch leaves the original's


def test_layerwise_casting_runs_the_reference_branch():
    unet = _adapted_unet()
    reference = _run(unet)
    text_only = _run(unet, torch.zeros(2, 24))
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    cast = _run(unet, dtype=torch.bfloat16).float()
    cast_text_only = _run(unet, torch.zeros(2, 24), dtype=torch.bfloat16).float()
    assert torch.isfinite(cast).all() and torch.isfinite(cast_text_only).all()

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    assert relative(cast, reference) < 0.15  # fp8 storage, bf16 compute
    effect, cast_effect = reference - text_only, cast - cast_text_only
    assert relative(cast_effect, effect) < 0.5  # the reference still acts the same way


def test_save_refuses_an_incomplete_adapter_naming_what_is_missing(tmp_path):
    unet = _adapted_unet()
    attn = next(iter(reference_layers(unet).values()))
    del attn._modules["to_v_ref"]
    with pytest.raises(InvalidInputError, match=r"1 projection\(s\) missing, e.g. .*attn2.to_v_ref"):
        save_adapter(unet, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


class OwnOutputProjection(AttnProcessor2_0):
    """A processor that projects its output with the weights directly, never calling ``to_out[0]``:
    the branch must then add its term to the layer's output (the fallback path)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        projection = attn.to_out[0]
        original, attn.to_out[0] = projection, torch.nn.Identity()
        try:
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        finally:
            attn.to_out[0] = original
        return projection(out)


def test_a_processor_that_bypasses_to_out_gets_the_same_reference_term():
    unet = _adapted_unet()
    plain = _run(unet)
    unet.set_attn_processor(OwnOutputProjection())
    assert torch.allclose(_run(unet), plain, atol=1e-5)


def test_lora_on_query_and_output_projections_is_used_by_the_reference_branch():
    """peft wraps to_q / to_out.0 after the adapter is installed (stage 2 with LoRA): the branch must use
    the wrapped projections, in the fast path (hooks on them) as in the fallback (the layer's output)."""
    from peft import LoraConfig

    unet = _adapted_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_out.0"]))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    fast = _run(unet)
    unet.set_attn_processor(OwnOutputProjection())
    assert torch.allclose(_run(unet), fast, atol=1e-5)
    assert (fast - _run(unet, torch.zeros(2, 24))).abs().max() > 1e-3
