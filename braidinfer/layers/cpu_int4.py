"""GGUF blocks in the layout of torch's CPU int4 weight-only matmul (`aten._weight_int4pack_mm_for_cpu`), the form
QuantLinear takes on the CPU for Q8_0, Q4_0, Q4_1, Q4_K and Q5_K weights.

That op computes x @ W.T for bfloat16 x with W held as 4-bit codes c and, per run of 32 columns, a bfloat16 scale s
and zero z: w = (c - 8) s + z. Every type above splits exactly into such terms (quant_formats.nibble_terms: one term
for the 4-bit types, two for Q8_0 and Q5_K), so the weights keep their bytes (Q4_1: 0.625 bytes per weight either
way) and only s and z are rounded to bfloat16, as x is. Measured on a 2-core AVX-512 machine, one row of the embedded
SmolLM2-135M's shapes: 2-3x faster than float32 F.linear on the decoded weight, 11x on the 49152 x 576 lm_head; with
AVX2 kernels only, slower than float32 (benchmarks/RESULTS.md), so `fast_here` gates it.
"""
from __future__ import annotations

import torch

GROUP = 32
"""Columns per scale and zero."""
FAST_CAPABILITIES = frozenset({"AVX512"})
"""torch CPU capabilities (torch.backends.cpu.get_cpu_capability()) whose int4 kernels beat float32 F.linear."""

_MM = None  # torch.ops.aten._weight_int4pack_mm_for_cpu.default, once `linear` first runs
Int4Term = tuple[torch.Tensor, torch.Tensor]
"""(packed codes uint8 [N, K / 2], bfloat16 scales and zeros [K / 32, N, 2]): one operand pair of the op."""


def fast_here() -> bool:
    """Whether this machine's torch runs the CPU int4 matmul faster than float32 F.linear."""
    return torch.backends.cpu.get_cpu_capability() in FAST_CAPABILITIES


def packable(qtype: str, shape: tuple[int, int]) -> bool:
    """Whether a [N, K] weight of `qtype` has this form: a type nibble_terms splits, N a multiple of 16 and K of 32
    (the op's tiles)."""
    from braid_kernels.quant_formats import NIBBLE_QTYPES  # imported on use: braid_kernels reads TRITON_INTERPRET

    return qtype in NIBBLE_QTYPES and shape[0] % 16 == 0 and shape[1] % GROUP == 0


def pack(blocks: torch.Tensor, qtype: str) -> list[Int4Term]:
    """The op's operands for W held as CPU blocks [N, row_bytes] of `qtype` (packable): one pair per term."""
    from braid_kernels.quant_formats import nibble_terms

    terms = []
    for codes, scale, offset in nibble_terms(blocks, qtype):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        zero = offset + 8 * scale  # (c - 8) s + z = s c + offset
        terms.append((packed, torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()))
    return terms


def linear(x: torch.Tensor, terms: list[Int4Term]) -> torch.Tensor:
    """x [M, K] @ W.T for W = the sum of `terms`, x rounded to bfloat16, the terms' products added in float32;
    returns x's dtype."""
    global _MM
    if _MM is None:  # bound on first use, not at import: older torch builds lack the op
        _MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    xb = x.to(torch.bfloat16)
    (packed, scales_zeros), *rest = terms
    if not rest:  # one term: the product is bfloat16 either way, converted straight to x's dtype
        return _MM(xb, packed, GROUP, scales_zeros).to(x.dtype)
    y = _MM(xb, packed, GROUP, scales_zeros).float()
    for packed, scales_zeros in rest:
        y += _MM(xb, packed, GROUP, scales_zeros)
    return y.to(x.dtype)
