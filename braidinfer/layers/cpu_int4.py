"""GGUF blocks in the layout of torch's CPU int4 weight-only matmul (`aten._weight_int4pack_mm_for_cpu`), the form
QuantLinear takes on the CPU for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K and Q5_K weights.

That op computes x @ W.T for bfloat16 x with W held as 4-bit codes c and, per run of 32 columns, a bfloat16 scale s
and zero z: w = (c - 8) s + z. Every type above splits exactly into such terms (quant_formats.nibble_terms: one term
for the 4-bit types, two for Q8_0 and the 5-bit types), so the 4-bit types keep their bytes (Q4_1: 0.625 bytes per
weight either way), the others take a second 4-bit term, and only s and z are rounded to bfloat16, as x is. Measured
on a 2-core AVX-512 machine, one row of the embedded SmolLM2-135M's shapes: 2-3x faster than float32 F.linear on the
decoded weight, 11x on the 49152 x 576 lm_head; with AVX2 kernels only, slower than float32 (benchmarks/RESULTS.md),
so `fast_here` gates it.

The op's time grows with every row of x (it is compute-bound: 23 us a row for a 3072 x 576 matrix on that machine,
35 ms for a 1,541-token prompt). With `decoded_rows` set (EngineConfig.cpu_decoded_prefill), from that many rows on
`linear` decodes the codes to a float matrix, a block of rows of W at a time, and multiplies with torch's matmul
instead: bfloat16 where the CPU has AMX tiles (the weights then rounded to bfloat16, as x already is), float32
elsewhere. That needs N a multiple of 64 and the AVX-512 build's packing (`decode` reads its blocks of 64 rows;
`layout_known` checks it). A row's result then depends on how many rows share its step (the two paths round
differently, ~0.3% of an output at most on Q4_K), so a request's greedy answer can differ between alone and in a
batch; off by default for that reason.
"""
from __future__ import annotations

import functools

import torch

GROUP = 32
"""Columns per scale and zero."""
FAST_CAPABILITIES = frozenset({"AVX512"})
"""torch CPU capabilities (torch.backends.cpu.get_cpu_capability()) whose int4 kernels beat float32 F.linear."""

DEQUANTIZE_ROWS = 128
"""The `decoded_rows` the engine passes when EngineConfig.cpu_decoded_prefill is on (2 cores, AMX:
the int4 op 2.9 ms at 128 rows of a 3072 x 576 matrix, decoding 1.1 ms and the bfloat16 product 0.35 ms; float32
products break even near 100 rows)."""
DECODE_BLOCK_WEIGHTS = 1 << 24
"""Weights of W decoded at a time (whole blocks of 64 rows): bounds the float copies' memory (~100 MB for one term)
while the embedded model's layer matrices decode in one piece (its 49152 x 576 lm_head in two; the pieces' outputs
are concatenated)."""

_MM = None  # torch.ops.aten._weight_int4pack_mm_for_cpu.default, once `linear` first runs
_LAYOUT_KNOWN: bool | None = None  # whether `decode` reads this torch's packing, once checked
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


def linear(x: torch.Tensor, terms: list[Int4Term], decoded_rows: int | None = None) -> torch.Tensor:
    """x [M, K] @ W.T for W = the sum of `terms`, returns x's dtype: the int4 op, x rounded to bfloat16, the terms'
    products added in float32; from `decoded_rows` rows of x (None: never), the decoded weights' product (module
    docstring)."""
    global _MM
    if _MM is None:  # bound on first use, not at import: older torch builds lack the op
        _MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    if decoded_rows is not None and x.shape[0] >= decoded_rows and terms[0][1].shape[1] % 64 == 0 \
            and layout_known():
        return _decoded_linear(x, terms)
    xb = x.to(torch.bfloat16).contiguous()  # the op requires it (a float32 x's strides survive `.to`)
    (packed, scales_zeros), *rest = terms
    if not rest:  # one term: the product is bfloat16 either way, converted straight to x's dtype
        return _MM(xb, packed, GROUP, scales_zeros).to(x.dtype)
    y = _MM(xb, packed, GROUP, scales_zeros).float()
    for packed, scales_zeros in rest:
        y += _MM(xb, packed, GROUP, scales_zeros)
    return y.to(x.dtype)


@functools.cache
def product_dtype() -> torch.dtype:
    """The dtype of the decoded weights' product: bfloat16 with AMX tiles (oneDNN's bfloat16 matmul: 2.1 ms for
    1,541 x 576 @ 576 x 3072 on 2 cores, float32 16.4 ms), else float32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return torch.bfloat16 if amx is not None and amx() else torch.float32


def decode(terms: list[Int4Term], start: int = 0, stop: int | None = None) -> torch.Tensor:
    """W.T [K, stop - start] in float32 for rows start:stop of W (N and start multiples of 64), W = the sum of
    `terms`: w = (c - 8) s + z per term, computed as c s + (z - 8 s).

    The op packs each block of 64 rows of W as [K, 32] bytes, byte (k, j) holding row j's code at column k in its
    low nibble and row 32 + j's in its high one (checked against the op by `layout_known`)."""
    total = None
    for packed, scales_zeros in terms:
        n = scales_zeros.shape[1]
        k = packed.numel() * 2 // n
        stop_ = n if stop is None else stop
        blocks = packed.view(n // 64, k, 32)[start // 64:(stop_ + 63) // 64]
        codes = torch.cat((blocks & 15, blocks >> 4), dim=-1)  # (rows / 64, K, 64): codes[b, k, c] = W[64 b + c, k]
        codes = codes.permute(1, 0, 2).reshape(k // GROUP, GROUP, -1)  # (K / 32, 32, rows)
        scale = scales_zeros[:, start:stop_, 0].float()[:, None, :]  # (K / 32, 1, rows)
        offset = scales_zeros[:, start:stop_, 1].float()[:, None, :] - 8 * scale
        term = torch.addcmul(offset, codes.float(), scale)  # uint8 codes straight in: 9x slower
        total = term if total is None else total.add_(term)
    return total.view(-1, total.shape[-1])


def layout_known() -> bool:
    """Whether `decode` reads this torch build's packing (the AVX-512 kernels' blocks of 64 rows; AVX2 and plain
    builds pack blocks of 32 another way): checked once on a probe of seeded random codes, three blocks of rows and an
    odd number of 32-column groups, so that a change of row, column or nibble order fails it."""
    global _LAYOUT_KNOWN
    if _LAYOUT_KNOWN is None:
        codes = torch.randint(0, 16, (192, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        scales_zeros = torch.stack((torch.ones(3, 192), torch.full((3, 192), 8.0)), dim=-1).to(torch.bfloat16)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            _LAYOUT_KNOWN = torch.equal(decode([(packed, scales_zeros)]), codes.t().float())
        except (RuntimeError, ValueError):
            _LAYOUT_KNOWN = False
    return _LAYOUT_KNOWN


def _decoded_linear(x: torch.Tensor, terms: list[Int4Term]) -> torch.Tensor:
    """x [M, K] @ W.T through `decode`, DECODE_BLOCK_WEIGHTS weights of W at a time, in product_dtype()."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-d [rows, in_features], got shape {tuple(x.shape)}")
    dtype = product_dtype()
    n, k = terms[0][1].shape[1], terms[0][0].numel() * 2 // terms[0][1].shape[1]
    step = max(64, DECODE_BLOCK_WEIGHTS // k // 64 * 64)
    xd = x.to(dtype)
    out = [xd @ decode(terms, start, min(start + step, n)).to(dtype) for start in range(0, n, step)]
    return (out[0] if len(out) == 1 else torch.cat(out, dim=1)).to(x.dtype)
