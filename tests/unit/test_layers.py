"""braidinfer.layers on the PyTorch plan against plain formulas, the kernel plan's choice, and which steps the GEMV
path folds into a projection (read off the model's own forward)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from braidinfer.config import EngineConfig
from braidinfer.errors import InvalidRequestError
from braidinfer.layers import (
    GeluAndMul,
    KernelPlan,
    Linear,
    RMSNorm,
    SiluAndMul,
    describe_kernels,
    gemv_prologues,
    select_kernels,
)
from braidinfer.models.config import ModelConfig
from braidinfer.models.registry import ARCHITECTURES


def _config(arch: str, num_layers: int = 2) -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=32, hidden_size=64, intermediate_size=48,
                       num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       rms_norm_eps=1e-6, rope_theta=10_000.0, rope_scaling=None, max_position_embeddings=64,
                       tie_word_embeddings=False)


def test_rmsnorm_is_the_formula():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
    x, residual = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)

    def want(h):
        return norm.weight * h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-5)

    with torch.no_grad():
        torch.testing.assert_close(norm(x), want(x))
        normed, h = norm(x, residual)
        torch.testing.assert_close(h, x + residual)
        torch.testing.assert_close(normed, want(x + residual))


def test_gated_activations_are_the_formulas():
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(4, 2 * 8, generator=g)
    gate, up = x[:, :8], x[:, 8:]
    torch.testing.assert_close(SiluAndMul()(x), gate / (1 + torch.exp(-gate)) * up)
    tanh_gelu = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    torch.testing.assert_close(GeluAndMul("tanh")(x), tanh_gelu * up)
    torch.testing.assert_close(GeluAndMul("none")(x), 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up)
    with pytest.raises(ValueError, match="approximate"):
        GeluAndMul("sigmoid")


def test_linear_is_nn_linear():
    g = torch.Generator().manual_seed(2)
    linear = Linear(8, 5, bias=True)
    x = torch.randn(1, 8, generator=g)
    torch.testing.assert_close(linear(x), x @ linear.weight.T + linear.bias)
    assert set(dict(linear.named_parameters())) == {"weight", "bias"}  # checkpoint names as nn.Linear's


@pytest.mark.parametrize("fused, gemv, device, want", [
    (True, True, "cuda", KernelPlan(triton=True, gemv=True)),
    (True, False, "cuda", KernelPlan(triton=True, gemv=False)),
    (False, True, "cuda", KernelPlan()),
    (True, True, "cpu", KernelPlan()),
])
def test_plan_choice(fused, gemv, device, want):
    assert KernelPlan.choose(fused, gemv, torch.device(device)) == want


def test_gemv_needs_the_fused_attention():
    with pytest.raises(ValueError, match=r"gemv=True\) needs triton=True"):
        KernelPlan(gemv=True)


def test_gemv_decode_is_validated():
    assert EngineConfig(gemv_decode=False).gemv_decode is False
    with pytest.raises(InvalidRequestError, match="gemv_decode"):
        EngineConfig(gemv_decode="sometimes")


# Gemma's (1 + w) float32 norms, GPT-2's LayerNorm and GELU have no prologue form in the GEMV kernel: they run in
# PyTorch and their projections take plain inputs.
_NO_PROLOGUES = {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_gemv_prologues_of_the_decoder(arch):
    """The pre-norms feed qkv_proj and gate_up_proj, the activation down_proj; the final norm (its output leaves the
    model) and Qwen3's q_norm / k_norm (inside the attention) are no prologues."""
    model = ARCHITECTURES[arch](_config(arch))
    want = {f"model.layers.{i}.{name}" for i in range(2)
            for name in ("input_layernorm", "post_attention_layernorm", "mlp.act_fn")}
    if arch in _NO_PROLOGUES:
        want = set()
    assert gemv_prologues(model) == want
    select_kernels(model, KernelPlan(triton=True, gemv=True))
    assert {name for name, m in model.named_modules() if getattr(m, "feeds_gemv", False)} == want
    select_kernels(model, KernelPlan(triton=True))
    assert not any(getattr(m, "feeds_gemv", False) for m in model.modules())


class _SandwichNormModel(nn.Module):
    """A Gemma-2-style block: the norm after the attention projection is added to the stream, not projected."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(8, 16)
        self.pre_norm, self.proj, self.post_norm = RMSNorm(16, 1e-6), Linear(16, 16), RMSNorm(16, 1e-6)
        self.up_proj, self.act_fn, self.down_proj = Linear(16, 32), SiluAndMul(), Linear(16, 16)

    def forward(self, input_ids, batch):
        h = self.embed_tokens(input_ids)
        h = h + self.post_norm(self.proj(self.pre_norm(h)))
        return self.down_proj(self.act_fn(self.up_proj(h)))


def test_gemv_prologues_follow_the_dataflow():
    model = _SandwichNormModel(config=None)
    assert gemv_prologues(model) == {"pre_norm", "act_fn"}


def test_describe_names_each_path():
    model = ARCHITECTURES["Qwen3ForCausalLM"](_config("Qwen3ForCausalLM"))
    assert describe_kernels(model) == [
        "linear (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head): torch F.linear",
        "attention (attn): qk-norm + rope in torch, then the backend's kv write and attend",
        "silu_and_mul (act_fn): torch",
        "rmsnorm (input_layernorm, post_attention_layernorm, norm): torch",
    ]


def test_padded_heads_attend_as_the_unpadded_pool():
    """A KV pool whose heads are wider than the model's (FlashInfer's 128 for Phi-3-mini's 96): K and V land
    zero-padded, and the layer's output equals that over a pool of the model's own width (plain SDPA as reference),
    two sequences, prefill then decode over the cached tokens."""
    from braidinfer.attention import AttentionMetadata, SeqSpan, TorchAttention
    from braidinfer.layers.attention import PagedAttention, pad_heads
    from braidinfer.models.forward_batch import ForwardBatch

    heads, kv_heads, hd, wide, page_size = 4, 2, 24, 32, 4
    layer = PagedAttention(0, heads, kv_heads, hd, rotary=False)
    holder = nn.ModuleList([layer])
    pools = {width: torch.zeros(1, 8, 2, kv_heads, page_size, width) for width in (hd, wide)}
    backends = {width: TorchAttention(pool, hd**-0.5) for width, pool in pools.items()}
    g = torch.Generator().manual_seed(3)
    tables = [torch.tensor([0, 1, 2]), torch.tensor([5, 3])]

    def step(q_lens, ctx_lens):
        spans, slots, start = [], [], 0
        for q_len, ctx, table in zip(q_lens, ctx_lens, tables):
            spans.append(SeqSpan(start, q_len, ctx, table))
            pos = torch.arange(ctx - q_len, ctx)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
            start += q_len
        meta = AttentionMetadata(spans, torch.cat(slots), start)
        qkv = torch.randn(start, (heads + 2 * kv_heads) * hd, generator=g)
        outs = {}
        for width in (hd, wide):
            pad_heads(holder, width)
            batch = ForwardBatch(positions=torch.zeros(start, dtype=torch.int64), meta=meta, attention=backends[width])
            outs[width] = layer(qkv, batch)
        return qkv, meta, outs

    for q_lens, ctx_lens in (([9, 5], [9, 5]), ([1, 1], [10, 6])):
        qkv, meta, outs = step(q_lens, ctx_lens)
        assert outs[wide].shape == (meta.num_tokens, heads * hd)
        torch.testing.assert_close(outs[wide], outs[hd], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pools[wide][..., :hd], pools[hd])
    assert pools[wide][..., hd:].abs().max() == 0
    # The reference: plain causal SDPA of the last step's first sequence (decode over its 10 tokens).
    k_cache, v_cache = (pools[hd][0, tables[0], i].permute(1, 0, 2, 3).reshape(kv_heads, -1, hd)[:, :10]
                        for i in (0, 1))
    q = qkv[0, : heads * hd].view(heads, 1, hd)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k_cache.repeat_interleave(heads // kv_heads, 0), v_cache.repeat_interleave(heads // kv_heads, 0))
    torch.testing.assert_close(outs[wide][0], ref.reshape(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot hold"):
        pad_heads(holder, hd - 8)
