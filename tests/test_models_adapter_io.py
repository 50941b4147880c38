"""Adapter weights in and out: exact round trips, equality with diffusers' load_ip_adapter, clear errors."""

import copy
import json

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from safetensors.torch import load_file, save_file

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, MissingFileError
from dreampainter.models import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterConfig,
    adapter_parameters,
    adapter_state_dict,
    export_ip_adapter,
    import_ip_adapter,
    install_reference_adapter,
    load_adapter,
    save_adapter,
    set_reference_scale,
)
from dreampainter.toy.models import (
    build_clip_tokenizer,
    build_tiny_scheduler,
    build_tiny_text_encoder,
    build_tiny_unet,
    build_tiny_vae,
)

# Diffusers-compatible shapes: linear with 4 tokens; resampler with dim_head 64, depth 4, ff_mult 4.
LINEAR = AdapterConfig("linear", image_embed_dim=24, num_tokens=4)
RESAMPLER = AdapterConfig("resampler", image_embed_dim=32, num_tokens=8, resampler_heads=1, resampler_dim_head=64)


def _features(config, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 24) if config.projection == "linear" else (batch, 17, 32)
    return torch.randn(shape, generator=g) * 2


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 9, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(batch, 5, 32, generator=g)


def _adapted_unet(config, seed=0):
    unet = build_tiny_unet(seed=seed).eval()
    install_reference_adapter(unet, config)
    with torch.no_grad():  # move away from the initialisation so a missed tensor would show
        g = torch.Generator().manual_seed(11)
        for param in adapter_parameters(unet):
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return unet


def _ours(unet, features):
    x, t, text = _inputs(features.shape[0])
    with torch.no_grad():
        return unet(x, t, text, added_cond_kwargs={"image_embeds": features}).sample


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _diffusers_pipeline(tokenizer):
    return StableDiffusionInpaintPipeline(
        vae=build_tiny_vae(), text_encoder=build_tiny_text_encoder(), tokenizer=tokenizer,
        unet=build_tiny_unet(seed=0).eval(), scheduler=build_tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.mark.parametrize("config", [LINEAR, RESAMPLER], ids=["linear", "resampler"])
def test_save_load_round_trip_is_exact(tmp_path, config):
    unet = _adapted_unet(config)
    save_adapter(unet, tmp_path)
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).exists()
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert meta["adapter"]["projection"] == config.projection and len(meta["unet"]["layers"]) == 7

    fresh = build_tiny_unet(seed=0).eval()
    load_adapter(fresh, tmp_path)
    for key, value in adapter_state_dict(unet).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key
    features = _features(config)
    assert torch.equal(_ours(fresh, features), _ours(unet, features))
    assert set(load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))) == set(adapter_state_dict(unet))


@pytest.mark.parametrize(
    "config,suffix", [(LINEAR, ".safetensors"), (RESAMPLER, ".bin")], ids=["linear-safetensors", "resampler-bin"]
)
def test_export_loads_in_diffusers_with_the_same_unet_output(tmp_path, tokenizer, config, suffix):
    unet = _adapted_unet(config)
    export_ip_adapter(unet, tmp_path / f"adapter{suffix}")
    pipe = _diffusers_pipeline(tokenizer)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=f"adapter{suffix}", image_encoder_folder=None)
    features = _features(config)
    x, t, text = _inputs()
    with torch.no_grad():
        theirs = pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": [features[:, None]]}).sample
    assert (theirs - _ours(unet, features)).abs().max() <= 1e-5

    block_scales = {"down": {"block_1": [0.3]}, "up": {"block_0": [1.0, 0.0]}}
    pipe.set_ip_adapter_scale(block_scales)
    set_reference_scale(unet, block_scales)
    with torch.no_grad():
        theirs = pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": [features[:, None]]}).sample
    assert (theirs - _ours(unet, features)).abs().max() <= 1e-5


@pytest.mark.parametrize("config,suffix", [(LINEAR, ".bin"), (RESAMPLER, ".safetensors")], ids=["linear", "resampler"])
def test_import_ip_adapter_file_gives_a_working_branch(tmp_path, config, suffix):
    source = _adapted_unet(config)
    path = export_ip_adapter(source, tmp_path / f"ip{suffix}")
    unet = build_tiny_unet(seed=0).eval()
    imported = import_ip_adapter(unet, path, scale=1.0)
    assert imported.to_dict() == config.to_dict()
    features = _features(config)
    assert torch.equal(_ours(unet, features), _ours(source, features))


def test_export_refuses_shapes_diffusers_cannot_read(tmp_path):
    unet = _adapted_unet(AdapterConfig("linear", image_embed_dim=24, num_tokens=6))
    with pytest.raises(InvalidInputError, match="assumes 4 tokens"):
        export_ip_adapter(unet, tmp_path / "a.safetensors")
    export_ip_adapter(unet, tmp_path / "a.safetensors", check_diffusers=False)
    fresh = build_tiny_unet(seed=0).eval()
    assert import_ip_adapter(fresh, tmp_path / "a.safetensors").num_tokens == 6
    with pytest.raises(InvalidInputError, match=r"must end in \.safetensors or \.bin"):
        export_ip_adapter(unet, tmp_path / "a.pt", check_diffusers=False)


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    path = export_ip_adapter(_adapted_unet(LINEAR), tmp_path / "ip.safetensors")
    tensors = load_file(str(path))
    tensors["ip_adapter.3.to_v_ip.weight"] = torch.zeros(64, 31)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointMismatchError, match=r"to_v_ref.weight' has shape \(64, 31\) in the checkpoint, the adapter expects \(64, 32\)"):
        import_ip_adapter(build_tiny_unet(seed=0).eval(), path)


def test_checkpoint_for_another_unet_is_refused(tmp_path):
    bigger = build_tiny_unet(seed=0, block_out_channels=(32, 64, 64))
    install_reference_adapter(bigger, LINEAR)
    export_ip_adapter(bigger, tmp_path / "ip.safetensors")
    save_adapter(bigger, tmp_path / "ours")
    with pytest.raises(CheckpointMismatchError, match="cross-attention layers"):
        import_ip_adapter(build_tiny_unet(seed=0), tmp_path / "ip.safetensors")
    with pytest.raises(CheckpointMismatchError, match="another UNet"):
        load_adapter(build_tiny_unet(seed=0), tmp_path / "ours")
    wide = build_tiny_unet(seed=0, cross_attention_dim=48)
    with pytest.raises(CheckpointMismatchError, match="cross_attention_dim 32.*has 48"):
        load_adapter(wide, tmp_path / "ours")


def test_missing_and_foreign_files(tmp_path):
    unet = build_tiny_unet(seed=0)
    with pytest.raises(MissingFileError, match="adapter config not found"):
        load_adapter(unet, tmp_path / "nowhere")
    with pytest.raises(MissingFileError, match="IP-Adapter weights not found.*download"):
        import_ip_adapter(unet, tmp_path / "ip-adapter_sd15.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInputError, match="cannot read IP-Adapter weights"):
        import_ip_adapter(unet, tmp_path / "junk.bin")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="is it an IP-Adapter file"):
        import_ip_adapter(unet, tmp_path / "other.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bin_files_are_never_unpickled(tmp_path, capsys):
    torch.save({"image_proj": {"x": _Payload()}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(InvalidInputError, match="cannot read IP-Adapter weights"):
        import_ip_adapter(build_tiny_unet(seed=0), tmp_path / "evil.bin")
    assert "unpickled!" not in capsys.readouterr().out


def test_load_refuses_a_different_installed_config(tmp_path):
    save_adapter(_adapted_unet(LINEAR), tmp_path)
    other = build_tiny_unet(seed=0)
    install_reference_adapter(other, AdapterConfig("linear", image_embed_dim=24, num_tokens=2))
    with pytest.raises(CheckpointMismatchError, match="differs from the installed one"):
        load_adapter(other, tmp_path)
    untouched = copy.deepcopy(adapter_state_dict(other))
    assert all(torch.equal(v, adapter_state_dict(other)[k]) for k, v in untouched.items())
