"""Decoupled cross-attention (IP-Adapter): text and reference tokens attend separately, then add.

``out = Attn(q, K_text, V_text) + scale * Attn(q, K_ref, V_ref)`` with ``K_ref = to_k_ref(ref)`` and
``V_ref = to_v_ref(ref)``, new per-layer projections initialised from the layer's ``to_k`` / ``to_v``.

The UNet hands the processor ``encoder_hidden_states = (text_tokens, reference_tokens)`` when its
``encoder_hid_proj`` is the reference projection (``encoder_hid_dim_type="ip_image_proj"``); see
``adapter.py``. Reference tokens that are exactly zero give ``K_ref = V_ref = 0`` (no biases), so
the reference term is exactly zero for that row: that is how "no reference" rows are handled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class DecoupledCrossAttnProcessor(nn.Module):
    """Attention processor for one cross-attention layer, holding that layer's ``to_k_ref`` / ``to_v_ref``.

    The trainable projections compute in their own dtype (kept float32 while a frozen UNet runs in
    fp16/bf16); their outputs are cast to the query's dtype for the attention itself.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.scale = scale
        self.to_k_ref = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ref = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    @classmethod
    def from_attention(cls, attn: Attention, scale: float = 1.0) -> DecoupledCrossAttnProcessor:
        """A processor for ``attn`` with ``to_k_ref`` / ``to_v_ref`` copied from its ``to_k`` / ``to_v``."""
        processor = cls(attn.to_k.out_features, attn.to_k.in_features, scale=scale)
        with torch.no_grad():
            processor.to_k_ref.weight.copy_(attn.to_k.weight.float())
            processor.to_v_ref.weight.copy_(attn.to_v.weight.float())
        return processor.to(device=attn.to_k.weight.device)

    def _reference_attention(
        self, attn: Attention, query: torch.Tensor, reference_tokens: torch.Tensor
    ) -> torch.Tensor:
        batch_size, heads = query.shape[0], attn.heads
        tokens = reference_tokens.to(self.to_k_ref.weight.dtype)
        if tokens.ndim == 4:  # diffusers' (B, num_images, N, C) layout
            tokens = tokens.flatten(1, 2)
        key = self.to_k_ref(tokens).to(query.dtype)
        value = self.to_v_ref(tokens).to(query.dtype)
        head_dim = key.shape[-1] // heads
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        reference_scale: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        reference_tokens = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, reference_tokens = encoder_hidden_states
            if isinstance(reference_tokens, (list, tuple)):
                if len(reference_tokens) != 1:
                    raise ValueError(f"expected one set of reference tokens, got {len(reference_tokens)}")
                reference_tokens = reference_tokens[0]

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        scale = self.scale if reference_scale is None else self.scale * reference_scale
        if reference_tokens is not None and scale != 0:
            hidden_states = hidden_states + scale * self._reference_attention(attn, query, reference_tokens)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
