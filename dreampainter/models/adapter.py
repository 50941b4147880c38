"""Install the reference adapter (projection + decoupled cross-attention) into a diffusers UNet.

After :func:`install_reference_adapter` the UNet is called as usual with one extra argument::

    unet(sample, t, encoder_hidden_states=text_tokens,
         added_cond_kwargs={"image_embeds": reference_features}).sample

``reference_features`` are what the projection consumes (the encoder's global embedding for
``"linear"``, its penultimate tokens for ``"resampler"``; :func:`reference_features` picks them). A
row of all zeros means "no reference" and gives exactly the text-only output for that row.

The wiring follows diffusers' own IP-Adapter path: the projection is the UNet's ``encoder_hid_proj``
with ``encoder_hid_dim_type="ip_image_proj"``, which is the only way a diffusers UNet hands
``image_embeds`` to its attention processors. Everything lives inside the UNet module, so DDP/FSDP
wrap one module and ``unet.parameters()`` includes the adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from dreampainter.errors import InvalidInputError
from dreampainter.models.attention import (
    add_reference_branch,
    attach_reference_hooks,
    has_reference_branch,
    remove_reference_branch,
)
from dreampainter.models.block_scales import expand_block_scales
from dreampainter.models.in_context import (
    has_in_context,
    in_context_layers,
    install_in_context,
    remove_in_context,
    set_in_context_scale,
)
from dreampainter.models.projection import LinearProjection, ReferenceProjection, Resampler
from dreampainter.utils.config import Choice, check_int, coerce_choices, config_from_dict, config_to_dict

ADAPTER_KEY_MARKERS = ("encoder_hid_proj.", ".to_k_ref.", ".to_v_ref.")


class Projection(Choice):
    linear = "linear"  # the encoder's global embedding -> num_tokens tokens (IP-Adapter)
    resampler = "resampler"  # a perceiver over the penultimate tokens (IP-Adapter Plus)


PROJECTIONS = tuple(Projection.values())


class ReferenceConditioning(Choice):
    """How the reference enters the UNet (``reference_mode``)."""

    decoupled = "decoupled"  # CLIP tokens through decoupled cross-attention (IP-Adapter)
    in_context = "in_context"  # the reference's VAE latents appended to every self-attention (models/in_context.py)
    both = "both"  # both together


REFERENCE_MODES = tuple(ReferenceConditioning.values())


@dataclass
class AdapterConfig:
    """What the reference adapter looks like (the schema of ``model.adapter`` and ``adapter_config.json``).

    ``image_embed_dim`` is the encoder's global-embedding size for ``"linear"`` (1024 for ViT-H-14)
    and its hidden size for ``"resampler"`` (1280 for ViT-H-14). The public IP-Adapter SD1.5 files
    are ``linear`` with 4 tokens and ``resampler`` with 16 tokens, depth 4, 12 heads of 64.
    """

    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = (
        "image_embed_dim", "num_tokens", "resampler_depth", "resampler_heads", "resampler_dim_head"
    )

    projection: Projection = Projection.linear
    image_embed_dim: int = 1024
    num_tokens: int = 4
    scale: float = 1.0
    resampler_dim: int | None = None
    resampler_depth: int = 4
    resampler_heads: int = 12
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    reference_mode: ReferenceConditioning = ReferenceConditioning.decoupled
    # in_context / both: the reference's side in pixels before the VAE (padded to a square); None: the target's
    in_context_size: int | None = None

    def __post_init__(self) -> None:
        coerce_choices(self)
        for name in self.POSITIVE_FIELDS:
            check_int(getattr(self, name), name, 1)
        check_int(self.in_context_size, "in_context_size", 1, optional=True)

    @property
    def decoupled(self) -> bool:
        """Whether the CLIP tokens enter through decoupled cross-attention (modes ``decoupled`` and ``both``)."""
        return self.reference_mode != ReferenceConditioning.in_context

    @property
    def in_context(self) -> bool:
        """Whether the reference's VAE latents join the self-attention (modes ``in_context`` and ``both``)."""
        return self.reference_mode != ReferenceConditioning.decoupled

    @property
    def feature_type(self) -> str:
        """``"global"`` (B, D) embeddings or ``"tokens"`` (B, T, C) penultimate hidden states."""
        return "global" if self.projection == Projection.linear else "tokens"

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the projection as its string), as written to ``adapter_config.json``."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        """From a mapping, through the one config loader (unknown keys and bad values name ``source``)."""
        return config_from_dict(cls, data, source)


def _cross_attention_dim(unet: UNet2DConditionModel) -> int:
    dim = unet.config.cross_attention_dim
    if not isinstance(dim, int):
        raise InvalidInputError(f"the reference adapter needs one cross_attention_dim for the whole UNet, got {dim}")
    return dim


def build_projection(config: AdapterConfig, cross_attention_dim: int) -> ReferenceProjection:
    """The projection module described by ``config`` for a UNet with ``cross_attention_dim``."""
    if config.projection == Projection.linear:
        return LinearProjection(config.image_embed_dim, cross_attention_dim, config.num_tokens)
    return Resampler(
        embedding_dim=config.image_embed_dim,
        output_dim=cross_attention_dim,
        dim=config.resampler_dim,
        depth=config.resampler_depth,
        dim_head=config.resampler_dim_head,
        heads=config.resampler_heads,
        num_tokens=config.num_tokens,
        ff_mult=config.resampler_ff_mult,
    )


def cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """Processor name -> cross-attention module, in the UNet's processor order (the IP-Adapter order)."""
    layers = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if isinstance(module, Attention) and module.is_cross_attention:
            layers[name] = module
    return layers


def has_reference_adapter(unet: nn.Module) -> bool:
    """True when ``unet`` carries the reference adapter (it then needs ``added_cond_kwargs["image_embeds"]``)."""
    return getattr(unet, "reference_adapter_config", None) is not None


def get_adapter_config(unet: nn.Module) -> AdapterConfig:
    if not has_reference_adapter(unet):
        raise InvalidInputError("this UNet has no reference adapter installed (call install_reference_adapter)")
    return unet.reference_adapter_config


def install_reference_adapter(unet: UNet2DConditionModel, config: AdapterConfig) -> UNet2DConditionModel:
    """Add the reference projection and a reference branch on every cross-attention layer, in place.

    New ``to_k_ref`` / ``to_v_ref`` (submodules of each cross-attention layer) start as copies of the
    layer's ``to_k`` / ``to_v``; all adapter parameters are float32 whatever the UNet's dtype. The
    attention processors are left as they are: any processor computes the text attention, and the
    layer's hooks add the reference term (see ``attention.py``).
    """
    if has_reference_adapter(unet):
        raise InvalidInputError("a reference adapter is already installed in this UNet; remove it first")
    if not config.decoupled:  # in_context: no new weights, the self-attention layers are hooked
        install_in_context(unet, scale=config.scale)
        unet.reference_adapter_config = config
        return unet
    if unet.encoder_hid_proj is not None:
        raise InvalidInputError(
            f"this UNet already uses encoder_hid_proj ({unet.config.encoder_hid_dim_type}); "
            "the reference adapter needs it for the reference tokens"
        )
    layers = cross_attention_layers(unet)
    if not layers:
        raise InvalidInputError("this UNet has no cross-attention layers to add a reference branch to")
    for attn in layers.values():
        add_reference_branch(attn, scale=config.scale)
    device = next(unet.parameters()).device
    unet.encoder_hid_proj = build_projection(config, _cross_attention_dim(unet)).to(device)
    # Attribute, not dict entry: save_pretrained keeps writing the plain UNet's config (diffusers does the same).
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    if config.in_context:
        install_in_context(unet, scale=config.scale)
    unet.reference_adapter_config = config
    return unet


def _detach_adapter(unet: UNet2DConditionModel) -> tuple[nn.Module, dict[str, dict[str, nn.Module]]]:
    branches = {name: remove_reference_branch(attn) for name, attn in reference_layers(unet).items()}
    projection = unet.encoder_hid_proj
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None
    return projection, branches


def remove_reference_adapter(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Undo :func:`install_reference_adapter`: the UNet computes exactly what it did before."""
    get_adapter_config(unet)
    _detach_adapter(unet)
    if has_in_context(unet):
        remove_in_context(unet)
    unet.reference_adapter_config = None
    return unet


@contextlib.contextmanager
def without_reference_adapter(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """Temporarily detach the adapter (e.g. to ``save_pretrained`` a plain diffusers UNet), then reattach it."""
    config = get_adapter_config(unet)
    projection, branches = _detach_adapter(unet)
    unet.reference_adapter_config = None
    try:
        yield unet
    finally:
        for name, modules in branches.items():
            attn = unet.get_submodule(name)
            for module_name, module in modules.items():
                attn.add_module(module_name, module)
            attach_reference_hooks(attn)
        unet.encoder_hid_proj = projection
        unet.config.encoder_hid_dim_type = "ip_image_proj" if projection is not None else None
        unet.reference_adapter_config = config


def reference_layers(unet: nn.Module) -> dict[str, Attention]:
    """Module name -> cross-attention layer carrying a reference branch, in the IP-Adapter (processor) order."""
    return {
        name.removesuffix(".processor"): attn
        for name, attn in cross_attention_layers(unet).items()
        if has_reference_branch(attn)
    }


def set_reference_scale(unet: UNet2DConditionModel, scale: float | dict) -> None:
    """Set the attention-level reference scale globally (a float) or per block (diffusers' dict form).

    The dict form is that of ``set_ip_adapter_scale``, e.g. ``{"down": {"block_2": [0.0, 1.0]},
    "up": {"block_0": [0.0, 1.0, 0.0]}}``; layers not named get 0, as in diffusers.
    """
    layers = reference_layers(unet)
    if has_in_context(unet):
        set_in_context_scale(unet, scale if not isinstance(scale, dict) else expand_block_scales(unet, scale, default=0.0))
    elif not layers:
        raise InvalidInputError("this UNet has no reference adapter installed (call install_reference_adapter)")
    if not isinstance(scale, dict):
        for attn in layers.values():
            attn.reference_scale = float(scale)
        return
    expanded = expand_block_scales(unet, scale, default=0.0)
    for name, attn in layers.items():
        attn.reference_scale = 0.0
        for prefix, value in expanded.items():
            if name.startswith(prefix):
                attn.reference_scale = float(value)


def check_adapter_complete(unet: nn.Module) -> None:
    """Raise naming what is missing unless the projection and every layer's ``to_k_ref`` / ``to_v_ref`` are there
    (decoupled modes) and every self-attention layer carries the in-context hooks (in-context modes)."""
    config = get_adapter_config(unet)
    if config.in_context and not in_context_layers(unet):
        raise InvalidInputError("incomplete reference adapter: reference_mode needs the in-context hooks, none installed")
    if not config.decoupled:
        return
    if unet.encoder_hid_proj is None or not list(unet.encoder_hid_proj.parameters()):
        raise InvalidInputError("incomplete reference adapter: the projection (encoder_hid_proj) is missing")
    missing = [
        f"{name.removesuffix('.processor')}.{part}"
        for name, attn in cross_attention_layers(unet).items()
        for part in ("to_k_ref", "to_v_ref")
        if not isinstance(getattr(attn, part, None), nn.Linear)
    ]
    if missing:
        raise InvalidInputError(
            f"incomplete reference adapter: {len(missing)} projection(s) missing, e.g. {missing[0]}; "
            "it would not load again, so it is not written"
        )


def adapter_parameter_names(unet: nn.Module) -> list[str]:
    return [name for name, _ in unet.named_parameters() if any(m in name for m in ADAPTER_KEY_MARKERS)]


def adapter_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable reference-adapter parameters (projection + every to_k_ref / to_v_ref)."""
    return [p for name, p in unet.named_parameters() if any(m in name for m in ADAPTER_KEY_MARKERS)]


def adapter_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by their names inside the UNet."""
    return {k: v for k, v in unet.state_dict().items() if any(m in k for m in ADAPTER_KEY_MARKERS)}


def cast_frozen_unet(unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every parameter that does not require grad (and every buffer) to ``dtype``.

    Mark the trainable parameters first (adapter, LoRA): they stay float32 while the frozen UNet runs
    in fp16/bf16.
    """
    for param in unet.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in unet.modules():
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[key] = buffer.to(dtype)
    return unet


def reference_features(encoder_output: Any, config: AdapterConfig) -> torch.Tensor:
    """Pick what the projection consumes from a :class:`ReferenceEncoderOutput`."""
    return encoder_output.image_embeds if config.feature_type == "global" else encoder_output.hidden_states


def drop_references(features: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero the rows where ``drop`` is True: those rows become "no reference" (text only)."""
    keep = (~drop.to(torch.bool)).to(features.dtype).reshape(-1, *([1] * (features.ndim - 1)))
    return features * keep
