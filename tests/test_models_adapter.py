"""The reference adapter on a diffusers UNet: wiring, identities, scales, dtypes, parameter count."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from dreampainter.errors import InvalidInputError
from dreampainter.models import (
    AdapterConfig,
    adapter_parameters,
    cast_frozen_unet,
    cross_attention_layers,
    drop_references,
    install_reference_adapter,
    reference_layers,
    remove_reference_adapter,
    set_reference_scale,
    without_reference_adapter,
)
from dreampainter.models.unet_configs import sd15_inpainting_unet_config
from dreampainter.toy.models import build_tiny_unet

CONFIGS = {
    "linear": AdapterConfig("linear", image_embed_dim=24, num_tokens=4),
    "resampler": AdapterConfig("resampler", image_embed_dim=32, num_tokens=8, resampler_heads=2, resampler_dim_head=16),
}


def _features(projection: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 24) if projection == "linear" else (batch, 17, 32)
    return torch.randn(shape, generator=g)


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 9, 8, 8, generator=g),
        torch.tensor([10, 500, 999][:batch]),
        torch.randn(batch, 5, 32, generator=g),
    )


def _run(unet, features=None):
    x, t, text = _inputs(features.shape[0] if features is not None else 2)
    kwargs = {} if features is None else {"added_cond_kwargs": {"image_embeds": features}}
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, **kwargs).sample


@pytest.fixture
def unet():
    return build_tiny_unet().eval()


@pytest.mark.parametrize("projection", ["linear", "resampler"])
def test_reference_reaches_the_unet_output(unet, projection):
    install_reference_adapter(unet, CONFIGS[projection])
    features = _features(projection)
    a = _run(unet, features)
    b = _run(unet, _features(projection, seed=2))
    assert (a - b).abs().max() > 1e-3, "changing the reference must change the UNet output"


@pytest.mark.parametrize("projection", ["linear", "resampler"])
def test_scale_zero_and_missing_reference_are_exactly_text_only(unet, projection):
    base = _run(unet)
    install_reference_adapter(unet, CONFIGS[projection])
    features = _features(projection)
    with_ref = _run(unet, features)
    assert not torch.equal(with_ref, base)

    mixed = drop_references(features, torch.tensor([False, True]))
    out = _run(unet, mixed)
    assert torch.equal(out[1], base[1]), "a row without reference must equal the text-only UNet exactly"
    assert torch.allclose(out[0], with_ref[0], atol=1e-6), "other rows are unaffected by a dropped row"

    set_reference_scale(unet, 0.0)
    assert torch.equal(_run(unet, features), base)


def test_new_projections_start_from_to_k_to_v_and_self_attention_is_untouched(unet):
    before = dict(unet.attn_processors)
    install_reference_adapter(unet, CONFIGS["linear"])
    layers = cross_attention_layers(unet)
    branches = reference_layers(unet)
    assert [f"{name}.processor" for name in branches] == list(layers) and len(layers) == 7
    for attn in layers.values():
        assert torch.equal(attn.to_k_ref.weight, attn.to_k.weight)
        assert torch.equal(attn.to_v_ref.weight, attn.to_v.weight)
        assert attn.to_k_ref.weight.data_ptr() != attn.to_k.weight.data_ptr()
    # the processors are diffusers' own, untouched: the branch lives on the attention modules
    assert {name: type(p) for name, p in unet.attn_processors.items()} == {name: type(p) for name, p in before.items()}
    for module_name, _ in unet.named_modules():
        if module_name.endswith("attn1"):
            assert not hasattr(unet.get_submodule(module_name), "to_k_ref")


def test_remove_restores_the_plain_unet_and_reinstall_is_refused(unet):
    base = _run(unet)
    install_reference_adapter(unet, CONFIGS["resampler"])
    with pytest.raises(InvalidInputError, match="already installed"):
        install_reference_adapter(unet, CONFIGS["resampler"])
    with without_reference_adapter(unet):
        assert unet.encoder_hid_proj is None
        assert torch.equal(_run(unet), base)
        assert "encoder_hid_proj.latents" not in unet.state_dict()
    assert not torch.equal(_run(unet, _features("resampler")), base)
    remove_reference_adapter(unet)
    assert torch.equal(_run(unet), base)
    assert not adapter_parameters(unet)


def test_per_block_scale_dict_form(unet):
    install_reference_adapter(unet, CONFIGS["linear"])
    set_reference_scale(unet, {"down": {"block_1": [0.5]}, "up": {"block_0": [0.0, 2.0]}})
    scales = {name: attn.reference_scale for name, attn in reference_layers(unet).items()}
    assert scales["down_blocks.1.attentions.0.transformer_blocks.0.attn2"] == 0.5
    assert scales["up_blocks.0.attentions.1.transformer_blocks.0.attn2"] == 2.0
    assert scales["up_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 0.0
    assert scales["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 0.0  # unnamed -> 0
    set_reference_scale(unet, 0.7)
    assert {attn.reference_scale for attn in reference_layers(unet).values()} == {0.7}


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ({"down": {"block_7": 1.0}}, "down has no transformer block"),
        ({"up": {"block_0": [1.0, 0.0, 1.0, 0.0]}}, "up.block_0 has 2 transformer layers, got 4 values"),
        ({"middle": 1.0}, "unknown key"),
        ({"mid": [1.0, 2.0]}, "mid takes one value"),
    ],
)
def test_per_block_scale_errors_name_the_block(unet, scales, message):
    install_reference_adapter(unet, CONFIGS["linear"])
    with pytest.raises(InvalidInputError, match=message):
        set_reference_scale(unet, scales)


def test_call_level_reference_scale_multiplies(unet):
    install_reference_adapter(unet, CONFIGS["linear"])
    x, t, text = _inputs()
    features = _features("linear")
    with torch.no_grad():
        zero = unet(x, t, text, added_cond_kwargs={"image_embeds": features},
                    cross_attention_kwargs={"reference_scale": 0.0}).sample
        half = unet(x, t, text, added_cond_kwargs={"image_embeds": features},
                    cross_attention_kwargs={"reference_scale": 0.5}).sample
    set_reference_scale(unet, 0.5)
    assert torch.equal(half, _run(unet, features))
    remove_reference_adapter(unet)
    assert torch.equal(zero, _run(unet))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_unet_in_low_precision_keeps_adapter_fp32(unet, dtype):
    install_reference_adapter(unet, CONFIGS["resampler"])
    unet.requires_grad_(False)
    for param in adapter_parameters(unet):
        param.requires_grad_(True)
    cast_frozen_unet(unet, dtype)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(unet))
    assert unet.conv_in.weight.dtype == dtype
    x, t, text = _inputs()
    out = unet(x.to(dtype), t, text.to(dtype), added_cond_kwargs={"image_embeds": _features("resampler")}).sample
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in adapter_parameters(unet)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_full_size_sd15_inpainting_config_parameter_count():
    """Built on the meta device: the real 860M-parameter config, no memory, exact counts."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_inpainting_unet_config())
        assert unet.conv_in.in_channels == 9
        install_reference_adapter(unet, AdapterConfig("linear", image_embed_dim=1024, num_tokens=4))
        linear = sum(p.numel() for p in adapter_parameters(unet))
        remove_reference_adapter(unet)
        install_reference_adapter(unet, AdapterConfig("resampler", image_embed_dim=1280, num_tokens=16))
        resampler = sum(p.numel() for p in adapter_parameters(unet))
    assert len(cross_attention_layers(unet)) == 16
    kv = 2 * 768 * (2 * (320 + 640 + 1280) + 1280 + 3 * (1280 + 640 + 320))
    assert kv == 19_169_280  # every to_k_ref / to_v_ref
    assert linear == kv + 1024 * 4 * 768 + 4 * 768 + 2 * 768  # + Linear(1024 -> 4x768) + LayerNorm
    assert linear == 22_319_616  # the README figure (the public ip-adapter_sd15 has the same)
    assert resampler == 49_087_488  # the README figure (IP-Adapter Plus SD1.5 layout)


def test_bad_configs_give_clear_errors():
    with pytest.raises(InvalidInputError, match=r"bad value for 'projection' \(must be one of linear, resampler"):
        AdapterConfig("mlp")
    with pytest.raises(InvalidInputError, match=r"bad value for 'num_tokens' \(must be a positive integer"):
        AdapterConfig("linear", num_tokens=0)
    with pytest.raises(InvalidInputError, match="adapter config: unknown config key 'tokens'"):
        AdapterConfig.from_dict({"projection": "linear", "tokens": 4})


def test_wrong_feature_shape_is_named(unet):
    install_reference_adapter(unet, CONFIGS["resampler"])
    with pytest.raises(ValueError, match=r"expects \(B, T, C\) tokens"):
        _run(unet, _features("linear"))


def test_gradients_reach_only_adapter_in_stage2_setup(unet):
    install_reference_adapter(unet, CONFIGS["linear"])
    unet.requires_grad_(False)
    for param in adapter_parameters(unet):
        param.requires_grad_(True)
    x, t, text = _inputs()
    unet(x, t, text, added_cond_kwargs={"image_embeds": _features("linear")}).sample.square().mean().backward()
    trained = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert trained and all(("encoder_hid_proj" in n or "_ref." in n) for n in trained)
    assert any(n.startswith("encoder_hid_proj.") for n in trained)


def test_deepcopy_of_the_adapted_unet_is_an_independent_equal_model(unet):
    """EMA and validation copy the adapted UNet: the copy must compute the same and own its weights."""
    install_reference_adapter(unet, CONFIGS["linear"])
    clone = copy.deepcopy(unet)
    features = _features("linear")
    assert torch.equal(_run(clone, features), _run(unet, features))
    assert len(reference_layers(clone)) == len(reference_layers(unet))
    with torch.no_grad():
        for param in adapter_parameters(clone):
            param.add_(1.0)
    assert not torch.equal(_run(clone, features), _run(unet, features))
    assert all(not torch.equal(a, b) for a, b in zip(adapter_parameters(clone), adapter_parameters(unet)))
