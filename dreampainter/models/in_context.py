"""In-context reference conditioning: the reference's VAE latents join the generated image's self-attention.

DreamPainter's own form: no separate cross-attention for the reference. The same UNet (trained with
LoRA) runs once on the reference's clean latents (the *reference pass*: timestep 0, inpainting mask
all "keep", masked-image latents = the reference latents, no text), and every self-attention layer
(``attn1``) remembers the hidden states that entered it. While the image is denoised, every ``attn1``
appends ``to_k(ref)`` / ``to_v(ref)`` to its own keys and values, so each position of the image can
attend to every position of the reference in every layer. The positions need no explicit offset:
the two sets of tokens come from separate passes (the reference's are those of a clean, fully kept
image at t = 0), so the model tells them apart by what they carry.

The reference pass does not depend on the image being generated nor on the step: it runs once per
generation (and once per training step), and the denoising steps only pay for the longer keys.

The mechanism belongs to the ``attn1`` modules (forward pre-hooks, like the decoupled branch of
``attention.py``), not to their processors: the hook hands the processor
``encoder_hidden_states = [own tokens; reference tokens]`` and an additive key bias, which every
diffusers processor (default, sliced, fused, xformers, LoRA-wrapped projections) supports. The bias is
``log(scale)`` on the reference keys of rows that have a reference and ``-inf`` on those of rows that
have none, so a row without a reference attends to its own tokens only. A call in which no row has a
reference (or the scale is 0) is left untouched: exactly the text-only UNet.

Usage::

    with in_context_reference(unet, reference_latents, rows):   # rows: reference row per batch row, -1: none
        prediction = unet(sample, t, encoder_hidden_states=text).sample
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from dreampainter.errors import InvalidInputError
from dreampainter.models.backbones import backbone_for_unet

# Pixels per latent of the SD / SDXL VAEs: the reference pass's "image size" for SDXL's micro-conditioning.
_VAE_FACTOR = 8
_STATE = "_dreampainter_in_context"  # on every attn1 and on the UNet: the shared InContextState
_RECORDED = "_dreampainter_in_context_hidden"  # on every attn1: the reference pass's hidden states


class InContextState:
    """What the ``attn1`` hooks of one UNet do now: nothing, record the reference, or append it."""

    __slots__ = ("mode", "rows")

    def __init__(self) -> None:
        self.mode = "off"  # "off" | "record" | "append"
        self.rows: torch.Tensor | None = None  # append: reference row for each batch row (-1: none)


def self_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """Module name -> self-attention layer (``attn1`` of every transformer block), in module order."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and not module.is_cross_attention and name.endswith("attn1")
    }


def has_in_context(unet: nn.Module) -> bool:
    """Whether :func:`install_in_context` wired ``unet``'s self-attention layers."""
    return isinstance(getattr(_unwrap(unet), _STATE, None), InContextState)


def in_context_layers(unet: nn.Module) -> dict[str, Attention]:
    """Module name -> self-attention layer carrying the in-context hooks."""
    return {
        name: attn
        for name, attn in self_attention_layers(_unwrap(unet)).items()
        if _in_context_hook in _pre_hooks(attn)
    }


def install_in_context(unet: nn.Module, scale: float = 1.0) -> None:
    """Hook every ``attn1`` of ``unet`` (in place; no new weights). ``scale``: the reference's weight."""
    unet = _unwrap(unet)
    if has_in_context(unet):
        raise InvalidInputError("in-context reference conditioning is already installed in this UNet")
    layers = self_attention_layers(unet)
    if not layers:
        raise InvalidInputError("this UNet has no self-attention (attn1) layers to add in-context tokens to")
    state = InContextState()
    object.__setattr__(unet, _STATE, state)
    for attn in layers.values():
        object.__setattr__(attn, _STATE, state)
        attn.in_context_scale = float(scale)
        attn.register_forward_pre_hook(_in_context_hook, with_kwargs=True)


def remove_in_context(unet: nn.Module) -> None:
    """Undo :func:`install_in_context`: the UNet computes exactly what it did before."""
    unet = _unwrap(unet)
    for attn in self_attention_layers(unet).values():
        hooks = attn._forward_pre_hooks
        for hook_id in [key for key, hook in hooks.items() if hook is _in_context_hook]:
            del hooks[hook_id]
            attn._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        for name in (_STATE, _RECORDED, "in_context_scale"):
            if name in attn.__dict__:
                object.__delattr__(attn, name)
    if _STATE in unet.__dict__:
        object.__delattr__(unet, _STATE)


def set_in_context_scale(unet: nn.Module, scale: float | dict[str, float]) -> None:
    """One weight for every layer, or ``{module-name prefix: weight}`` (layers not named get 0)."""
    for name, attn in in_context_layers(unet).items():
        if isinstance(scale, dict):
            attn.in_context_scale = next(
                (float(v) for prefix, v in scale.items() if name.startswith(prefix)), 0.0
            )
        else:
            attn.in_context_scale = float(scale)


def reference_pass_input(reference_latents: torch.Tensor) -> torch.Tensor:
    """The 9-channel inpainting input of the reference pass: latents, mask all "keep" (0), latents again."""
    if reference_latents.ndim != 4:
        raise InvalidInputError(
            f"reference_latents: expected (B, C, h, w), got shape {tuple(reference_latents.shape)}"
        )
    keep = reference_latents.new_zeros((reference_latents.shape[0], 1, *reference_latents.shape[-2:]))
    return torch.cat([reference_latents, keep, reference_latents], dim=1)


def record_reference(
    unet, reference_latents: torch.Tensor, dtype: torch.dtype | None = None, **unet_kwargs: Any
) -> None:
    """Run the reference pass on ``reference_latents`` (B, C, h, w), keeping every ``attn1``'s input.

    ``unet`` may be a wrapped module (DDP, accelerate); gradients flow through the kept states, so a
    LoRA trains through both passes. ``unet_kwargs`` are extra UNet arguments (``added_cond_kwargs``
    when a decoupled adapter is installed too: zeros, "no reference"). The text is one token of zeros (and,
    for SDXL, zero pooled embeddings with the pass's own size as micro-conditioning).
    ``dtype``: what to feed the UNet (default: the latents' own).
    """
    model = _unwrap(unet)
    state = _state(model)
    sample = reference_pass_input(reference_latents)
    dtype = dtype or sample.dtype
    width = model.config.cross_attention_dim
    text = sample.new_zeros((sample.shape[0], 1, width), dtype=dtype)
    timestep = torch.zeros(sample.shape[0], dtype=torch.long, device=sample.device)
    pixel_size = (sample.shape[-2] * _VAE_FACTOR, sample.shape[-1] * _VAE_FACTOR)
    null = backbone_for_unet(model).null_conditions(model, sample.shape[0], pixel_size, sample.device, dtype)
    if null:  # SDXL: zero pooled embeddings and the pass's size, beside any image_embeds already given
        unet_kwargs = {**unet_kwargs, "added_cond_kwargs": {**null, **unet_kwargs.get("added_cond_kwargs", {})}}
    state.mode = "record"
    try:
        unet(sample.to(dtype), timestep, encoder_hidden_states=text, **unet_kwargs)
    finally:
        state.mode = "off"


def set_rows(unet: nn.Module, rows: torch.Tensor | None) -> None:
    """Which recorded reference each row of the next UNet calls attends to (-1: none); ``None``: stop appending."""
    state = _state(_unwrap(unet))
    if rows is None or not bool((rows >= 0).any()):
        state.mode, state.rows = "off", None
        return
    state.mode, state.rows = "append", rows.to(torch.long)


def clear(unet: nn.Module) -> None:
    """Forget the recorded reference and stop appending (frees the kept states and their graph)."""
    model = _unwrap(unet)
    state = _state(model)
    state.mode, state.rows = "off", None
    for attn in self_attention_layers(model).values():
        if _RECORDED in attn.__dict__:
            object.__delattr__(attn, _RECORDED)


@contextlib.contextmanager
def in_context_reference(
    unet,
    reference_latents: torch.Tensor | None,
    rows: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    **unet_kwargs: Any,
) -> Iterator[None]:
    """Record ``reference_latents`` once, then let every UNet call inside append them (``rows``: the
    reference row of each batch row, -1 for none; default one each). ``None`` latents: nothing changes."""
    if reference_latents is None or reference_latents.shape[0] == 0:
        yield
        return
    record_reference(unet, reference_latents, dtype, **unet_kwargs)
    if rows is None:
        rows = torch.arange(reference_latents.shape[0])
    set_rows(unet, rows)
    try:
        yield
    finally:
        clear(unet)


# --------------------------------------------------------------------------- the hook


def _unwrap(unet: nn.Module) -> nn.Module:
    """The UNet inside a DDP / DeepSpeed / compile wrapper."""
    while hasattr(unet, "module") and isinstance(unet.module, nn.Module):
        unet = unet.module
    return getattr(unet, "_orig_mod", unet)


def _pre_hooks(module: nn.Module) -> list:
    return list(module._forward_pre_hooks.values())


def _state(model: nn.Module) -> InContextState:
    state = getattr(model, _STATE, None)
    if not isinstance(state, InContextState):
        raise InvalidInputError(
            "this UNet has no in-context reference conditioning installed (reference_mode in_context or both)"
        )
    return state


def _in_context_hook(attn: Attention, args: tuple, kwargs: dict[str, Any]):
    """``attn1`` pre-hook: record its input (reference pass) or append the recorded tokens as keys/values."""
    state: InContextState | None = getattr(attn, _STATE, None)
    if state is None or state.mode == "off":
        return None
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if state.mode == "record":
        object.__setattr__(attn, _RECORDED, hidden_states)
        return None
    recorded = getattr(attn, _RECORDED, None)
    scale = float(getattr(attn, "in_context_scale", 1.0))
    if recorded is None or scale == 0:
        return None
    if hidden_states.ndim != 3:
        raise InvalidInputError(
            f"in-context tokens: {type(attn).__name__} got (B, C, H, W) input; only token inputs are supported"
        )
    rows = state.rows.to(hidden_states.device)
    if rows.shape[0] != hidden_states.shape[0]:
        raise InvalidInputError(
            f"in-context rows: {rows.shape[0]} given for a UNet call of {hidden_states.shape[0]} rows"
        )
    if kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
        raise InvalidInputError(
            "in-context tokens: this self-attention layer already gets other tokens or a mask"
        )
    reference = recorded[rows.clamp(min=0)].to(hidden_states.dtype)
    kwargs = dict(kwargs)
    kwargs["encoder_hidden_states"] = torch.cat([hidden_states, reference], dim=1)
    has = rows >= 0
    if not bool(has.all()) or scale != 1.0:
        own = hidden_states.shape[1]
        bias = hidden_states.new_zeros((hidden_states.shape[0], 1, own + reference.shape[1]))
        log_scale = torch.full_like(has, math.log(scale), dtype=hidden_states.dtype)
        log_scale = torch.where(has, log_scale, torch.full_like(log_scale, float("-inf")))
        bias[:, :, own:] = log_scale.view(-1, 1, 1)
        kwargs["attention_mask"] = bias
    return args, kwargs
