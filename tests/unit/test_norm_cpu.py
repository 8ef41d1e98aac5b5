"""RMSNorm's CPU float32 path (one fused torch op) against transformers' LlamaRMSNorm, the independent reference, bit
for bit: the engine's CPU decode and its tests against transformers rely on the same values."""
from __future__ import annotations

import pytest
import torch

from braidinfer.layers import RMSNorm


@pytest.mark.parametrize("dim", [64, 576, 1024, 4096])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_cpu_float32_rms_norm_is_transformers_bit_for_bit(dim, rows):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(dim + rows)
    weight = torch.randn(dim, generator=gen)
    ours, ref = RMSNorm(dim, eps=1e-5), LlamaRMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ref.weight.copy_(weight)
    for scale in (1e-3, 1.0, 30.0):
        x = torch.randn(rows, dim, generator=gen) * scale
        residual = torch.randn(rows, dim, generator=gen)
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x))
            normed, h = ours(x, residual)
            assert torch.equal(h, x + residual) and torch.equal(normed, ref(x + residual))
