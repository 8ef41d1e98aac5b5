"""The references in braid_kernels/ compute what the model computes today, bit for bit: each is checked against
braidinfer's own modules (RMSNorm, the MLP, the attention block with the torch backend's KV write), so a kernel that
matches its reference matches the model. Plain PyTorch on the CPU; no kernel runs here."""
from __future__ import annotations

import pytest
import torch

from braidinfer.attention import AttentionMetadata, SeqSpan, TorchAttention
from braidinfer.models.config import ModelConfig
from braidinfer.models.forward_batch import ForwardBatch
from braidinfer.layers import RMSNorm, RotaryEmbedding
from braidinfer.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from braidinfer.models.qwen3 import Qwen3Attention
from braid_kernels import fused_add_rms_norm_ref, qk_norm_rope_write_kv_ref, rms_norm_ref, silu_and_mul_ref
from tests.kernels.common import assert_same_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _config(**shape) -> ModelConfig:
    fields = dict(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                  rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False)
    return ModelConfig(**{**fields, **shape})


@pytest.mark.parametrize("shape", [(5, 576), (3, 4, 128)])  # hidden states; per-head q/k
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_ref_is_the_models_rmsnorm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(0.5 + 95.5 * torch.rand(shape[-1], generator=g))  # Qwen3 k_norm-sized
    x, sublayer_out = ((3 * torch.randn(shape, generator=g)).to(dtype) for _ in range(2))
    weight = norm.weight.detach()
    with torch.no_grad():
        assert_same_bits(rms_norm_ref(x, weight, 1e-6), norm(x))
        h = x + sublayer_out  # LlamaDecoderLayer: h = h + self_attn(...), then post_attention_layernorm(h)
        normed, residual = fused_add_rms_norm_ref(sublayer_out, x, weight, 1e-6)
        assert_same_bits(residual, h)
        assert_same_bits(normed, norm(h))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_ref_is_the_models_mlp(dtype):
    """With identity projections the MLP's output is its activation; the loader packs gate_proj first."""
    inter = 48
    cfg = _config(hidden_size=2 * inter, intermediate_size=inter)
    mlp = LlamaMLP(cfg).to(dtype)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(torch.eye(2 * inter))  # gate_up = x, exactly
        mlp.down_proj.weight.copy_(torch.cat([torch.eye(inter), torch.zeros(inter, inter)]))  # first half = act
        x = (4 * torch.randn(5, 2 * inter, generator=torch.Generator().manual_seed(1))).to(dtype)
        assert_same_bits(silu_and_mul_ref(x), mlp(x)[:, :inter])
    packed = LlamaForCausalLM(cfg).packed_slot("model.layers.0.mlp.gate_proj.weight")
    assert packed == ("model.layers.0.mlp.gate_up_proj.weight", 0, inter)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_qk_norm_rope_write_kv_ref_is_the_models_attention_input(arch, dtype):
    """Qwen3Attention / LlamaAttention with an identity qkv_proj: the q they hand to the attention backend and the
    pool TorchAttention writes, against the reference given the same qkv, positions, tables and slots."""
    hq, hkv, hd, page_size = 4, 2, 64, 4
    cfg = _config(architecture=f"{arch.capitalize()}ForCausalLM", hidden_size=(hq + 2 * hkv) * hd,
                  num_attention_heads=hq, num_key_value_heads=hkv, head_dim=hd, rope_theta=1_000_000.0,
                  rope_scaling=None if arch == "qwen3" else {"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 16})
    g = torch.Generator().manual_seed(2)
    attention = (Qwen3Attention if arch == "qwen3" else LlamaAttention)(cfg, layer_idx=0).to(dtype)
    with torch.no_grad():
        attention.qkv_proj.weight.copy_(torch.eye(cfg.hidden_size))
        if arch == "qwen3":
            attention.q_norm.weight.copy_(0.5 + 3.5 * torch.rand(hd, generator=g))
            attention.k_norm.weight.copy_(0.5 + 95.5 * torch.rand(hd, generator=g))
    rotary = RotaryEmbedding(hd, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    # One sequence of 11 tokens in pages 5, 2, 7: the first 6 cached, 5 new ones at positions 6..10.
    page_table = torch.tensor([5, 2, 7])
    positions = torch.arange(6, 11)
    slot_mapping = page_table[positions // page_size] * page_size + positions % page_size
    meta = AttentionMetadata(spans=[SeqSpan(0, 5, 11, page_table)], slot_mapping=slot_mapping, num_tokens=5)
    pool = torch.randn(1, 8, 2, hkv, page_size, hd, generator=g).to(dtype)  # [layers, pages, 2, kvh, ps, hd]
    ref_pool = pool.clone()
    backend, seen = TorchAttention(pool, hd ** -0.5), {}

    def record_q(layer, q, k, v, meta):
        seen["q"] = q.clone()
        return backend(layer, q, k, v, meta)

    qkv = (3 * torch.randn(5, cfg.hidden_size, generator=g)).to(dtype)
    with torch.no_grad():
        attention(qkv, ForwardBatch(positions=positions, meta=meta, attention=record_q, rope=rotary.at(positions)))
        cos_table, sin_table = (t[:, 0] for t in rotary.cos_sin(torch.arange(cfg.max_position_embeddings),
                                                                torch.float32))  # the float32 tables
        norms = {}
        if arch == "qwen3":
            norms = dict(q_norm_weight=attention.q_norm.weight, k_norm_weight=attention.k_norm.weight)
        q = qk_norm_rope_write_kv_ref(qkv, positions, cos_table, sin_table, ref_pool[0], slot_mapping,
                                      eps=cfg.rms_norm_eps, **norms)
    assert_same_bits(q, seen["q"])
    assert_same_bits(ref_pool, pool)
