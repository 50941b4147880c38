"""Adapter weights in and out: our safetensors format, and the IP-Adapter layout diffusers loads.

Our format (a folder): ``adapter.safetensors`` (tensors keyed by their names inside the UNet) and
``adapter_config.json`` (the :class:`AdapterConfig` plus a fingerprint of the UNet it was made for).

IP-Adapter layout (one file): ``image_proj.*`` (the projection, same names as ours) and
``ip_adapter.<n>.to_k_ip.weight`` / ``.to_v_ip.weight`` with ``n = 2k + 1`` for the k-th
cross-attention processor in the UNet's processor order: the numbering diffusers'
``load_ip_adapter`` reads (in SD1.5, where self- and cross-attention alternate, n is simply the
index among all attention processors, as in the original IP-Adapter code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, MissingFileError
from dreampainter.models.adapter import (
    AdapterConfig,
    adapter_state_dict,
    check_adapter_complete,
    cross_attention_layers,
    get_adapter_config,
    has_reference_adapter,
    install_reference_adapter,
    reference_layers,
)
from dreampainter.models.state_dicts import check_state_dict
from dreampainter.utils import atomic_path, atomic_write_json

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "dreampainter-adapter"
PROJECTION_PREFIX = "encoder_hid_proj."


def unet_fingerprint(unet: UNet2DConditionModel) -> dict:
    """What an adapter depends on: the cross-attention width and each cross-attention layer's size."""
    return {
        "cross_attention_dim": unet.config.cross_attention_dim,
        "layers": [[name, attn.to_k.out_features] for name, attn in cross_attention_layers(unet).items()],
    }


def _check_fingerprint(unet: UNet2DConditionModel, saved: dict, source: str) -> None:
    own = unet_fingerprint(unet)
    if saved.get("cross_attention_dim") != own["cross_attention_dim"]:
        raise CheckpointMismatchError(
            f"{source}: adapter made for a UNet with cross_attention_dim {saved.get('cross_attention_dim')}, "
            f"this UNet has {own['cross_attention_dim']}"
        )
    saved_layers = [tuple(layer) for layer in saved.get("layers", [])]
    own_layers = [tuple(layer) for layer in own["layers"]]
    if saved_layers != own_layers:
        raise CheckpointMismatchError(
            f"{source}: adapter made for another UNet ({len(saved_layers)} cross-attention layers, "
            f"this UNet has {len(own_layers)}; first difference: "
            f"{next((a, b) for a, b in zip(saved_layers + [None] * 999, own_layers + [None] * 999) if a != b)})"
        )


def _load_tensors(unet: UNet2DConditionModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` (UNet-internal names) into the installed adapter; every key must match exactly."""
    check_state_dict(adapter_state_dict(unet), tensors, source, what="the adapter")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))


def save_adapter(unet: UNet2DConditionModel, folder: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` + ``adapter_config.json`` to ``folder`` (each atomically)."""
    config = get_adapter_config(unet)
    check_adapter_complete(unet)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(unet).items()}
    with atomic_path(folder / ADAPTER_WEIGHTS_NAME) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    meta = {"format": ADAPTER_FORMAT, "version": 2, "adapter": config.to_dict(), "unet": unet_fingerprint(unet)}
    atomic_write_json(folder / ADAPTER_CONFIG_NAME, meta)
    return folder


def read_adapter_config(folder: str | os.PathLike) -> tuple[AdapterConfig, dict]:
    """The adapter config and UNet fingerprint saved in ``folder``."""
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.exists():
        raise MissingFileError(f"adapter config not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{path}: invalid JSON ({error.msg})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise InvalidInputError(f"{path}: not a DreamPainter adapter config (format {meta.get('format')!r})")
    return AdapterConfig.from_dict(meta["adapter"], source=str(path)), meta.get("unet", {})


def load_adapter(unet: UNet2DConditionModel, folder: str | os.PathLike) -> AdapterConfig:
    """Load an adapter saved by :func:`save_adapter`, installing it first when the UNet has none."""
    config, fingerprint = read_adapter_config(folder)
    weights = Path(folder) / ADAPTER_WEIGHTS_NAME
    if not weights.exists():
        raise MissingFileError(f"adapter weights not found: {weights}")
    _check_fingerprint(unet, fingerprint, str(folder))
    if has_reference_adapter(unet):
        if get_adapter_config(unet).to_dict() | {"scale": 0} != config.to_dict() | {"scale": 0}:
            raise CheckpointMismatchError(
                f"{folder}: adapter config {config.to_dict()} differs from the installed one {get_adapter_config(unet).to_dict()}"
            )
    else:
        install_reference_adapter(unet, config)
    _load_tensors(unet, _current_key_names(load_file(str(weights))), str(weights))
    return config


def _current_key_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapters saved before format version 2 kept ``to_k_ref`` / ``to_v_ref`` inside each layer's
    attention processor (``...attn2.processor.to_k_ref.weight``); they now belong to the layer itself."""
    return {key.replace(".processor.to_k_ref.", ".to_k_ref.").replace(".processor.to_v_ref.", ".to_v_ref."): value
            for key, value in tensors.items()}


# ------------------------------------------------------------------------- IP-Adapter layout
def _check_diffusers_compatible(config: AdapterConfig) -> None:
    if config.projection == "linear" and config.num_tokens != 4:
        raise InvalidInputError(
            f"diffusers' load_ip_adapter assumes 4 tokens for a linear projection; this adapter has {config.num_tokens}"
        )
    resampler_shape = (config.resampler_dim_head, config.resampler_depth, config.resampler_ff_mult)
    if config.projection == "resampler" and resampler_shape != (64, 4, 4):
        raise InvalidInputError(
            "diffusers' load_ip_adapter reads a resampler only with dim_head 64, depth 4 and ff_mult 4; this adapter "
            f"has dim_head {config.resampler_dim_head}, depth {config.resampler_depth}, ff_mult {config.resampler_ff_mult}"
        )


def ip_adapter_state_dict(unet: UNet2DConditionModel, check_diffusers: bool = True) -> dict[str, torch.Tensor]:
    """The adapter as flat ``image_proj.*`` / ``ip_adapter.<n>.*`` tensors (IP-Adapter layout)."""
    config = get_adapter_config(unet)
    if not config.decoupled:
        raise InvalidInputError(
            f"reference_mode {config.reference_mode}: no decoupled cross-attention, so no IP-Adapter layout"
        )
    if check_diffusers:
        _check_diffusers_compatible(config)
    out = {}
    for key, value in unet.encoder_hid_proj.state_dict().items():
        out[f"image_proj.{key}"] = value.detach().cpu().contiguous()
    for k, attn in enumerate(reference_layers(unet).values()):
        out[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = attn.to_k_ref.weight.detach().cpu().contiguous()
        out[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = attn.to_v_ref.weight.detach().cpu().contiguous()
    return out


def export_ip_adapter(unet: UNet2DConditionModel, path: str | os.PathLike, check_diffusers: bool = True) -> Path:
    """Write the adapter in the IP-Adapter layout: ``.safetensors`` (flat keys) or ``.bin`` (nested dicts).

    Load it in diffusers with ``pipe.load_ip_adapter(folder, subfolder="", weight_name=name,
    image_encoder_folder=None)``.
    """
    path = Path(path)
    tensors = ip_adapter_state_dict(unet, check_diffusers=check_diffusers)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix not in (".safetensors", ".bin"):
        raise InvalidInputError(f"{path}: IP-Adapter export must end in .safetensors or .bin")
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            save_file(tensors, str(temporary), metadata={"format": "pt"})
        else:
            nested = {"image_proj": {}, "ip_adapter": {}}
            for key, value in tensors.items():
                group, name = key.split(".", 1)
                nested[group][name] = value
            torch.save(nested, temporary)
    return path


def read_ip_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(image_proj, ip_adapter)`` tensors from a ``.safetensors`` or ``.bin`` IP-Adapter file (no unpickling)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(
            f"IP-Adapter weights not found: {path} (e.g. download ip-adapter_sd15.safetensors from h94/IP-Adapter)"
        )
    try:
        if path.suffix == ".safetensors":
            flat = load_file(str(path))
            image_proj = {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")}
            ip_adapter = {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")}
        else:
            nested = torch.load(path, map_location="cpu", weights_only=True)
            image_proj, ip_adapter = nested.get("image_proj", {}), nested.get("ip_adapter", {})
    except Exception as error:  # noqa: BLE001 - corrupt or foreign files are the user's to fix
        raise InvalidInputError(f"{path}: cannot read IP-Adapter weights ({type(error).__name__}: {error})") from None
    if not image_proj or not ip_adapter:
        raise CheckpointMismatchError(f"{path}: no 'image_proj' / 'ip_adapter' weights; is it an IP-Adapter file?")
    return image_proj, ip_adapter


def infer_ip_adapter_config(image_proj: dict[str, torch.Tensor], cross_attention_dim: int, source: str) -> AdapterConfig:
    """The :class:`AdapterConfig` of IP-Adapter (linear) or IP-Adapter Plus (resampler) weights."""
    if "proj.weight" in image_proj and "norm.weight" in image_proj and "proj.0.weight" not in image_proj:
        out_features, embed_dim = image_proj["proj.weight"].shape
        if out_features % cross_attention_dim:
            raise CheckpointMismatchError(
                f"{source}: 'image_proj.proj.weight' has {out_features} outputs, not a multiple of this UNet's "
                f"cross_attention_dim {cross_attention_dim}"
            )
        return AdapterConfig("linear", image_embed_dim=embed_dim, num_tokens=out_features // cross_attention_dim)
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        dim = image_proj["latents"].shape[2]
        depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
        dim_head = 64
        return AdapterConfig(
            "resampler",
            image_embed_dim=image_proj["proj_in.weight"].shape[1],
            num_tokens=image_proj["latents"].shape[1],
            resampler_dim=None if dim == cross_attention_dim else dim,
            resampler_depth=depth,
            resampler_heads=image_proj["layers.0.0.to_q.weight"].shape[0] // dim_head,
            resampler_dim_head=dim_head,
            resampler_ff_mult=image_proj["layers.0.1.1.weight"].shape[0] // dim,
        )
    raise CheckpointMismatchError(
        f"{source}: unsupported IP-Adapter variant (image_proj keys {sorted(image_proj)[:4]}...); "
        "supported: IP-Adapter (linear) and IP-Adapter Plus (resampler)"
    )


def import_ip_adapter(unet: UNet2DConditionModel, path: str | os.PathLike, scale: float = 1.0) -> AdapterConfig:
    """Initialise our adapter from an IP-Adapter-layout file (e.g. the public ip-adapter_sd15 weights)."""
    image_proj, ip_adapter = read_ip_adapter_file(path)
    source = str(path)
    config = infer_ip_adapter_config(image_proj, unet.config.cross_attention_dim, source)
    config.scale = scale
    layer_names = list(cross_attention_layers(unet))
    file_layers = sorted({int(k.split(".")[0]) for k in ip_adapter})
    expected = [2 * k + 1 for k in range(len(layer_names))]
    if file_layers != expected:
        raise CheckpointMismatchError(
            f"{source}: weights for {len(file_layers)} cross-attention layers (ids {file_layers[:4]}...), "
            f"this UNet has {len(layer_names)} (ids {expected[:4]}...); was it made for another UNet?"
        )
    if has_reference_adapter(unet):
        installed = get_adapter_config(unet)
        if installed.to_dict() | {"scale": 0} != config.to_dict() | {"scale": 0}:
            raise CheckpointMismatchError(f"{source}: IP-Adapter config {config.to_dict()} differs from the installed adapter")
    else:
        install_reference_adapter(unet, config)
    tensors = {f"encoder_hid_proj.{k}": v for k, v in image_proj.items()}
    for k, name in enumerate(layer_names):
        for ours, theirs in (("to_k_ref", "to_k_ip"), ("to_v_ref", "to_v_ip")):
            tensors[f"{name.removesuffix('.processor')}.{ours}.weight"] = ip_adapter[f"{2 * k + 1}.{theirs}.weight"]
    _load_tensors(unet, tensors, source)
    return config
