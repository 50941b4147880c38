"""Projections: shapes, the no-reference rows, and numerical safety in fp16/bf16."""

import pytest
import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection

from dreampainter.models import LinearProjection, Resampler


def _outlier_tokens(batch=2, tokens=17, width=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, width, generator=g) * 4
    x[:, 0, :3] = 3000.0  # CLIP penultimate layers carry a few huge activations
    x[:, 5, 7] = -2500.0
    return x


def test_linear_projection_shape_and_zero_rows():
    projection = LinearProjection(image_embed_dim=24, cross_attention_dim=32, num_tokens=4)
    features = torch.randn(3, 24)
    features[1] = 0
    tokens = projection(features)
    assert tokens.shape == (3, 4, 32)
    assert torch.equal(tokens[1], torch.zeros(4, 32))
    assert tokens[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resampler_is_finite_and_accurate_in_half_precision(dtype):
    torch.manual_seed(0)
    resampler = Resampler(embedding_dim=64, output_dim=32, dim=64, depth=2, dim_head=16, heads=4, num_tokens=8)
    x = _outlier_tokens()
    reference = resampler(x)
    half = resampler.to(dtype)
    out = half(x.to(dtype))
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.05


def test_resampler_matches_diffusers_ip_adapter_plus_in_fp32():
    """Same architecture as diffusers' IPAdapterPlusImageProjection (weights mapped by name)."""
    torch.manual_seed(0)
    ours = Resampler(embedding_dim=48, output_dim=32, dim=64, depth=4, dim_head=64, heads=1, num_tokens=6)
    theirs = IPAdapterPlusImageProjection(embed_dims=48, output_dims=32, hidden_dims=64, depth=4, dim_head=64,
                                          heads=1, num_queries=6)
    mapped = {"latents": ours.latents, "proj_in.weight": ours.proj_in.weight, "proj_in.bias": ours.proj_in.bias,
              "proj_out.weight": ours.proj_out.weight, "proj_out.bias": ours.proj_out.bias,
              "norm_out.weight": ours.norm_out.weight, "norm_out.bias": ours.norm_out.bias}
    for i, (attention, ff) in enumerate(ours.layers):
        k, v = attention.to_kv.weight.chunk(2)
        mapped.update({
            f"layers.{i}.ln0.weight": attention.norm1.weight, f"layers.{i}.ln0.bias": attention.norm1.bias,
            f"layers.{i}.ln1.weight": attention.norm2.weight, f"layers.{i}.ln1.bias": attention.norm2.bias,
            f"layers.{i}.attn.to_q.weight": attention.to_q.weight, f"layers.{i}.attn.to_k.weight": k,
            f"layers.{i}.attn.to_v.weight": v, f"layers.{i}.attn.to_out.0.weight": attention.to_out.weight,
            f"layers.{i}.ff.0.weight": ff[0].weight, f"layers.{i}.ff.0.bias": ff[0].bias,
            f"layers.{i}.ff.1.net.0.proj.weight": ff[1].weight, f"layers.{i}.ff.1.net.2.weight": ff[3].weight,
        })
    theirs.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 10, 48)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_resampler_zero_rows_and_shapes():
    resampler = Resampler(embedding_dim=32, output_dim=16, depth=1, dim_head=8, heads=2, num_tokens=5)
    features = torch.randn(2, 9, 32)
    features[0] = 0
    tokens = resampler(features)
    assert tokens.shape == (2, 5, 16)
    assert torch.equal(tokens[0], torch.zeros(5, 16))
