"""Decoupled cross-attention (IP-Adapter): text and reference tokens attend separately, then add.

``out = Attn(q, K_text, V_text) + scale * Attn(q, K_ref, V_ref)`` with ``K_ref = to_k_ref(ref)`` and
``V_ref = to_v_ref(ref)``, new per-layer projections initialised from the layer's ``to_k`` / ``to_v``.

The reference branch belongs to the attention *module*, not to its processor: ``to_k_ref`` /
``to_v_ref`` are submodules of each cross-attention ``Attention`` and the branch runs in two forward
hooks on it. The processor (diffusers' default, sliced, fused-QKV, xformers, or a user's own) only
ever sees the text tokens and computes the text attention as usual; the hooks add
``scale * to_out(Attn(q, K_ref, V_ref))`` to its output (``to_out`` is linear, so this equals
projecting the sum). Replacing processors therefore never loses a weight or the reference.

The UNet hands the layer ``encoder_hidden_states = (text_tokens, [reference_tokens])`` when its
``encoder_hid_proj`` is the reference projection (``encoder_hid_dim_type="ip_image_proj"``); see
``adapter.py``. Reference tokens that are exactly zero give ``K_ref = V_ref = 0`` (no biases), so
the reference term is exactly zero for that row: that is how "no reference" rows are handled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

# Per-call weight of the reference: ``cross_attention_kwargs={"reference_scale": s}`` (multiplies the layer's).
CALL_SCALE_KWARG = "reference_scale"
_PENDING = "_dreampainter_reference_call"  # set by the layer's pre-hook, cleared by its post-hook
_OWNER = "_dreampainter_reference_layer"  # on to_q / to_out[0]: the layer whose reference they serve


def add_reference_branch(attn: Attention, scale: float = 1.0) -> None:
    """Give ``attn`` its ``to_k_ref`` / ``to_v_ref`` (float32 copies of ``to_k`` / ``to_v``) and the hooks."""
    device = attn.to_k.weight.device
    for name, source in (("to_k_ref", attn.to_k), ("to_v_ref", attn.to_v)):
        layer = nn.Linear(source.in_features, source.out_features, bias=False, device=device)
        with torch.no_grad():
            layer.weight.copy_(source.weight.float())
        attn.add_module(name, layer)
    attn.reference_scale = float(scale)
    attach_reference_hooks(attn)


def attach_reference_hooks(attn: Attention) -> None:
    """Register the forward hooks that run the reference branch (idempotent).

    The hooks are found again by identity (not by handle), so a deep copy of the UNet keeps working hooks.
    """
    if _split_reference not in attn._forward_pre_hooks.values():
        attn.register_forward_pre_hook(_split_reference, with_kwargs=True)
        attn.register_forward_hook(_add_reference, with_kwargs=True)


def _ensure_hook(module: nn.Module, owner: Attention, function, pre: bool) -> None:
    """Hook ``function`` onto ``module`` (the layer's current ``to_q`` / ``to_out[0]``, which a LoRA wrapper
    or a fused projection may have replaced since the last call), remembering the layer that owns it."""
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    if function not in hooks.values():
        (module.register_forward_pre_hook if pre else module.register_forward_hook)(function)
    object.__setattr__(module, _OWNER, owner)


def _detach_hooks(attn: Attention) -> None:
    targets = [
        (attn, attn._forward_pre_hooks, attn._forward_pre_hooks_with_kwargs, _split_reference),
        (attn, attn._forward_hooks, attn._forward_hooks_with_kwargs, _add_reference),
        (attn.to_q, attn.to_q._forward_hooks, attn.to_q._forward_hooks_with_kwargs, _capture_query),
        (attn.to_out[0], attn.to_out[0]._forward_pre_hooks, attn.to_out[0]._forward_pre_hooks_with_kwargs, _add_before_output),
    ]  # fmt: skip
    for _, hooks, kwargs_ids, function in targets:
        for hook_id in [key for key, hook in hooks.items() if hook is function]:
            del hooks[hook_id]
            kwargs_ids.pop(hook_id, None)


def remove_reference_branch(attn: Attention) -> dict[str, nn.Module]:
    """Detach the hooks and the reference projections from ``attn``; returns the projections."""
    _detach_hooks(attn)
    return {name: attn._modules.pop(name) for name in ("to_k_ref", "to_v_ref")}


def has_reference_branch(module: nn.Module) -> bool:
    return isinstance(module, Attention) and isinstance(getattr(module, "to_k_ref", None), nn.Linear)


class _PendingReference:
    """One layer call's reference work, from the layer's pre-hook to its post-hook."""

    __slots__ = ("hidden_states", "reference", "scale", "temb", "query", "added")

    def __init__(self, hidden_states, reference, scale, temb) -> None:
        self.hidden_states, self.reference, self.scale, self.temb = hidden_states, reference, scale, temb
        self.query: torch.Tensor | None = None
        self.added = False


def _split_reference(attn: Attention, args: tuple, kwargs: dict[str, Any]):
    """Layer pre-hook: hand the processor the text tokens alone; keep the reference for the other hooks."""
    call_scale = kwargs.pop(CALL_SCALE_KWARG, None)
    in_kwargs = "encoder_hidden_states" in kwargs
    states = kwargs.get("encoder_hidden_states") if in_kwargs else (args[1] if len(args) > 1 else None)
    reference = None
    if isinstance(states, tuple):
        states, reference = states
        if isinstance(reference, (list, tuple)):
            if len(reference) != 1:
                raise ValueError(f"expected one set of reference tokens, got {len(reference)}")
            reference = reference[0]
        if in_kwargs:
            kwargs["encoder_hidden_states"] = states
        else:
            args = (args[0], states, *args[2:])
    scale = attn.reference_scale * (1.0 if call_scale is None else float(call_scale))
    pending = None
    if reference is not None and scale != 0:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        pending = _PendingReference(hidden_states, reference, scale, kwargs.get("temb"))
        _ensure_hook(attn.to_q, attn, _capture_query, pre=False)
        _ensure_hook(attn.to_out[0], attn, _add_before_output, pre=True)
    object.__setattr__(attn, _PENDING, pending)
    return args, kwargs


def _capture_query(to_q: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """``to_q`` hook: keep the query the processor computed (the reference attends with the same one)."""
    pending = getattr(getattr(to_q, _OWNER, None), _PENDING, None)
    if pending is not None and not pending.added:
        pending.query = output


def _add_before_output(to_out: nn.Module, args: tuple):
    """``to_out[0]`` pre-hook: its input becomes ``Attn(q, K_text, V_text) + scale * Attn(q, K_ref, V_ref)``,
    exactly IP-Adapter's sum, for any processor that projects its attention output with ``to_out[0]``."""
    attn = getattr(to_out, _OWNER, None)
    pending = getattr(attn, _PENDING, None)
    if pending is None or pending.query is None or pending.added or args[0].shape[:-1] != pending.query.shape[:-1]:
        return None
    pending.added = True
    return (args[0] + pending.scale * _reference_attention(attn, pending.query, pending.reference), *args[1:])


def _add_reference(attn: Attention, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
    """Layer post-hook: a processor that did not go through ``to_q`` / ``to_out[0]`` gets the reference term
    added to its output instead (``to_out`` is linear, so this equals projecting the sum)."""
    pending = getattr(attn, _PENDING, None)
    object.__setattr__(attn, _PENDING, None)
    if pending is None or pending.added:
        return output
    return output + pending.scale * reference_attention_output(attn, pending.hidden_states, pending.reference, pending.temb)


def _projection_dtype(layer: nn.Module, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype to feed ``layer``: its weights' (float32 trainable weights under a bf16 UNet), unless
    they are only stored in a narrow format (layerwise casting) and computed in ``compute_dtype``."""
    dtype = layer.weight.dtype
    return dtype if dtype.is_floating_point and torch.finfo(dtype).bits >= 16 else compute_dtype


def reference_attention_output(
    attn: Attention, hidden_states: torch.Tensor, reference: torch.Tensor, temb: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference term of the layer's output: ``to_out(Attn(q, K_ref, V_ref)) - to_out(0)`` (the output
    projection's linear part, LoRA included), in the layout of ``hidden_states`` (B, N, C) or (B, C, H, W),
    divided by ``attn.rescale_output_factor`` as the layer's output is."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    out = _reference_attention(attn, query, reference)
    projection = attn.to_out[0]  # a Linear, a LoRA-wrapped Linear, or a layerwise-cast Linear: call it
    out = projection(out) - projection(out.new_zeros((1, 1, out.shape[-1])))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
    return out / attn.rescale_output_factor


def _reference_attention(attn: Attention, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``Attn(q, K_ref, V_ref)`` for the layer's projected query ``(B, N, heads * head_dim)``, same layout."""
    batch_size, heads = query.shape[0], attn.heads
    head_dim = query.shape[-1] // heads
    query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    tokens = reference.flatten(1, 2) if reference.ndim == 4 else reference  # diffusers' (B, images, N, C)
    tokens = tokens.to(_projection_dtype(attn.to_k_ref, query.dtype))
    key = attn.to_k_ref(tokens).to(query.dtype).view(batch_size, -1, heads, head_dim).transpose(1, 2)
    value = attn.to_v_ref(tokens).to(query.dtype).view(batch_size, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
