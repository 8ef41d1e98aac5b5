"""What the kernel tests share: inputs whose float32 sums are exact, RoPE tables, and the two comparisons.

A kernel reproduces its reference's rounding points exactly; the one thing it cannot reproduce is the order in which
a reduction adds (torch's tree versus Triton's), and under the interpreter numpy's exp versus torch's. Hence:
- `assert_same_bits` wherever neither matters: no reduction (RoPE, residual add), or inputs whose sums of squares
  are exact in float32 in any order (`exact_sum_values`), or silu on CUDA, where both call expf;
- `assert_rounding_matches` elsewhere: in bf16/fp16 an ulp of float32 in the norm's scale moves an output only when
  it sits at a rounding midpoint, so almost every element is identical and the rest differ by about one step of the
  output dtype. A rounding point out of place (weight multiplied before the cast, say) changes far more than the
  allowed fraction (test_rmsnorm checks the comparison catches that). In float32 every element of a row can move by
  a few ulp, so float32 is compared with a tolerance of a few ulp instead.
"""
from __future__ import annotations

import math

import torch

MAX_MISMATCH_FRACTION = 1e-3  # observed: 0 on the CPU shapes, ~1e-5 expected on GPU shapes; wrong rounding: >10%


def exact_sum_values(shape, dtype, device, generator=None) -> torch.Tensor:
    """Multiples of 1/8 in [-2, 2]: exact in bf16, and sums of up to 2**18 of their squares are exact in float32."""
    k = torch.randint(-16, 17, shape, generator=generator)
    return (k.float() / 8).to(dtype).to(device)


def norm_weight(size, dtype, device, high=4.0, generator=None) -> torch.Tensor:
    """RMSNorm weights in [0.5, high]; Qwen3's k_norm reaches ~96, so tests use high=96 for it."""
    return (0.5 + (high - 0.5) * torch.rand(size, generator=generator)).to(dtype).to(device)


def rope_tables(head_dim: int, theta: float, max_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin [max_positions, head_dim], built as braidinfer's RotaryEmbedding builds them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape,
                                                                               expected.dtype, expected.shape)
    differ = actual != expected
    assert not differ.any(), (f"{int(differ.sum())} of {differ.numel()} elements differ; largest difference "
                              f"{(actual.float() - expected.float()).abs().max().item():.3g}")


def assert_rounding_matches(actual: torch.Tensor, expected: torch.Tensor,
                            max_mismatch_fraction: float = MAX_MISMATCH_FRACTION) -> None:
    """Equal but for float32 summation order: see the module docstring."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    step = torch.finfo(expected.dtype).eps  # one unit in the last place, relative
    if expected.dtype == torch.float32:
        tolerance = 8 * step
    else:
        differ = int((actual != expected).sum())
        allowed = max(2, math.floor(max_mismatch_fraction * expected.numel()))
        assert differ <= allowed, f"{differ} of {expected.numel()} elements differ (at most {allowed} may)"
        tolerance = 2 * step
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance * scale)


# Output rounding a quantised product may show against the float32 reference: one step of the dtype (the GEMM paths
# also round the weights to it, which moves a sum of K products by about that much again), a few float32 ulps of the
# sum order.
QUANT_REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_quant_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """got within QUANT_REL_TOL[dtype] of want, relative to each element plus the mean magnitude."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.float(), want.float()
    bound = QUANT_REL_TOL[dtype] * (want.abs() + want.abs().mean())
    worst = ((got - want).abs() - bound).max().item()
    assert worst <= 0, f"max excess error {worst}; max error {(got - want).abs().max().item()}"
