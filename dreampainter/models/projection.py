"""Projections from reference-encoder features to reference tokens for the UNet's cross-attention.

* :class:`LinearProjection` (IP-Adapter): the global image embedding -> ``num_tokens`` tokens + LayerNorm.
* :class:`Resampler` (IP-Adapter Plus): a perceiver resampler over the encoder's patch tokens.

Both keep the IP-Adapter parameter names, so export to that layout is a rename-free prefix. Both
compute in float32 whatever the dtype of their parameters or inputs: a perceiver over CLIP's
penultimate tokens (which carry outliers in the thousands) overflows in fp16 otherwise. The output
is returned in the dtype of the incoming features' consumer (``output_dtype``) or float32.

A batch row whose features are all zero means "no reference": its tokens are exactly zero, which
makes the decoupled attention contribute exactly nothing for that row (see ``attention.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x, layer.weight.float(), bias)


def _layer_norm32(layer: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    weight = None if layer.weight is None else layer.weight.float()
    bias = None if layer.bias is None else layer.bias.float()
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)


def reference_present(features: torch.Tensor) -> torch.Tensor:
    """Bool (B,): True where the row carries a reference (any non-zero feature)."""
    return features.flatten(1).abs().amax(dim=1) > 0


class ReferenceProjection(nn.Module):
    """Base class: maps encoder features (B, ...) to reference tokens (B, num_tokens, cross_attention_dim)."""

    expects: str  # "global" (B, D) embeddings or "tokens" (B, T, C) hidden states
    num_tokens: int

    def project(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        expected_ndim = 2 if self.expects == "global" else 3
        if features.ndim != expected_ndim:
            raise ValueError(
                f"{type(self).__name__} expects {'(B, D) global embeddings' if expected_ndim == 2 else '(B, T, C) tokens'}"
                f" as image_embeds, got shape {tuple(features.shape)}"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            tokens = self.project(features.float())
            keep = reference_present(features).to(tokens.dtype)
            return tokens * keep[:, None, None]


class LinearProjection(ReferenceProjection):
    """IP-Adapter's image projection: global embedding -> ``num_tokens`` tokens, then LayerNorm."""

    expects = "global"

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        tokens = _linear32(self.proj, features).reshape(features.shape[0], self.num_tokens, self.cross_attention_dim)
        return _layer_norm32(self.norm, tokens)


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs, latents] (IP-Adapter Plus naming: norm1, norm2, to_q, to_kv, to_out)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = _layer_norm32(self.norm1, x)
        latents = _layer_norm32(self.norm2, latents)
        context = torch.cat([x, latents], dim=1)
        q = self._split_heads(_linear32(self.to_q, latents))
        k, v = _linear32(self.to_kv, context).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, self._split_heads(k), self._split_heads(v))
        return _linear32(self.to_out, out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear -> GELU -> Linear, no biases (IP-Adapter Plus naming: 0, 1, 3)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _layer_norm32(self[0], x)
        return _linear32(self[3], F.gelu(_linear32(self[1], x)))


class Resampler(ReferenceProjection):
    """IP-Adapter Plus perceiver resampler: ``num_tokens`` learned queries over the encoder's tokens."""

    expects = "tokens"

    def __init__(
        self,
        embedding_dim: int,
        output_dim: int,
        dim: int | None = None,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 12,
        num_tokens: int = 16,
        ff_mult: int = 4,
    ):
        super().__init__()
        dim = output_dim if dim is None else dim
        self.num_tokens = num_tokens
        self.latents = nn.Parameter(torch.randn(1, num_tokens, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head=dim_head, heads=heads), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.float().expand(features.shape[0], -1, -1)
        x = _linear32(self.proj_in, features)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return _layer_norm32(self.norm_out, _linear32(self.proj_out, latents))
