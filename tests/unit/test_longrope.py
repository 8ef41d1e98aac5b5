"""LongRoPE tables against transformers' own arithmetic; key shifting with partial rotary and an attention factor."""
from __future__ import annotations

import pytest
import torch

from braidinfer.layers.longrope import LongRoPEEmbedding, longrope_parameters
from braidinfer.layers.rotary import apply_rotary


def _phi3_config(**kw):
    import transformers

    g = torch.Generator().manual_seed(0)
    factors = {k: (1 + 3 * torch.rand(6, generator=g)).tolist() for k in ("short_factor", "long_factor")}
    return transformers.Phi3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32,
                                   max_position_embeddings=4096, original_max_position_embeddings=64,
                                   partial_rotary_factor=0.75, rope_scaling={"type": "longrope", **factors}, **kw)


@pytest.mark.parametrize("long", [False, True])
def test_parameters_match_transformers(long):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _phi3_config()
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=65 if long else 64)
    scaling = cfg.rope_parameters
    inv_freq, factor = longrope_parameters(12, scaling["rope_theta"], scaling, 64, 4096, long)
    assert torch.equal(inv_freq, ref_inv_freq)
    assert factor == pytest.approx(ref_factor, rel=1e-12) and factor > 1


def test_shift_keys_is_a_pure_rotation_of_the_rotary_dims():
    scaling = _phi3_config().rope_parameters
    rope = LongRoPEEmbedding(12, 10000.0, scaling, 64, 256, use_long=True)
    k = torch.randn(3, 2, 16)  # (keys, kv_heads, head_dim): 12 rotary dims, 4 passed through
    cos, sin = rope.cos_sin(torch.tensor([5, 5, 5]), torch.float32)
    at_5 = torch.cat((apply_rotary(k[..., :12], cos, sin), k[..., 12:]), -1)
    cos, sin = rope.cos_sin(torch.tensor([12, 12, 12]), torch.float32)
    at_12 = torch.cat((apply_rotary(k[..., :12], cos, sin), k[..., 12:]), -1)
    torch.testing.assert_close(rope.shift_keys(at_5, 7), at_12)
