"""The planes layout: the GGML blocks of each weight row regrouped field by field, the layout every Triton kernel of
braid_kernels/quant.py reads.

A GGUF row is its blocks one after the other (quant_formats.py), so a block's quant bytes sit at a 34-byte (Q8_0) or
210-byte (Q6_K) stride, only 2-byte aligned, and a GEMV thread must assemble them from 16-bit loads. Here each row
holds the same bytes as planes: first field 0 of every block of the row, then field 1 of every block, and so on:

    type  planes, in order (bytes per block)                      row = nb blocks
    Q8_0  qs (32) | d (2)                                         qs of block b at 32 b, d at 32 nb + 2 b
    Q4_0  qs (16) | d (2)
    Q4_1  qs (16) | d, m (4)
    Q5_0  qs (16) | qh (4) | d (2)
    Q5_1  qs (16) | qh (4) | d, m (4)
    Q4_K  qs (128) | scales (12) | d, dmin (4)
    Q5_K  qs (128) | qh (32) | scales (12) | d, dmin (4)
    Q6_K  ql (128) | qh (64) | scales (16) | d (2)                (GGUF's own field order)

The rows keep their length (row_bytes = nb * TYPE_SIZE), so memory is unchanged and rows are still independent (a
fused projection's parts join along rows as before). Every quant plane starts at a multiple of its row's start, so
a row's quants are as aligned as row_bytes allows: 16 bytes for every Q4_K / Q5_K row and for Q8_0, Q4_0, Q5_0 and
Q6_K rows of a multiple of 8 blocks (Q4_1: 4; Q5_1: 2), where a thread reads its quants as 16-byte vectors; the
integer-dot GEMV reads 32-bit words (Q5_0's and Q5_1's qh included) where row_bytes is a multiple of 4 and assembles
them from 16-bit loads otherwise. The fp16 fields are 2-aligned in any row.

Measured on an H200 (the integer-dot GEMV at one row of x, the same kernel on both layouts, same run; 28672x4096 /
4096x14336 / 128256x4096): Q8_0 56.9 / 27.7 / 222.3 us on GGUF rows against 34.2 / 20.3 / 126.0 on planes, Q6_K 53.7
/ 29.4 / 218.2 against 28.4 / 19.8 / 104.7, Q4_K 37.5 / 20.5 / 147.9 against 25.5 / 18.4 / 93.5 (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from .quant_formats import TYPE_SIZE, check_qtype

PLANES = {
    "Q8_0": ((2, 32), (0, 2)),
    "Q4_0": ((2, 16), (0, 2)),
    "Q4_1": ((4, 16), (0, 4)),
    "Q5_0": ((6, 16), (2, 4), (0, 2)),
    "Q5_1": ((8, 16), (4, 4), (0, 4)),
    "Q4_K": ((16, 128), (4, 12), (0, 4)),
    "Q5_K": ((48, 128), (16, 32), (4, 12), (0, 4)),
    "Q6_K": ((0, 128), (128, 64), (192, 16), (208, 2)),
}
"""Per GGML type, its planes in row order as (byte offset in the GGUF block, bytes per block)."""


def to_planes(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF blocks uint8 [rows, row_bytes] of `qtype` -> the same bytes in the planes layout (a new contiguous
    tensor of the same shape, on blocks' device)."""
    rows, nb = _check(blocks, qtype)
    b = blocks.reshape(rows, nb, TYPE_SIZE[qtype])
    return torch.cat([b[..., o:o + size].reshape(rows, nb * size) for o, size in PLANES[qtype]], dim=1)


def from_planes(planes: torch.Tensor, qtype: str) -> torch.Tensor:
    """The inverse of to_planes: planes-layout uint8 [rows, row_bytes] -> GGUF blocks (a new contiguous tensor)."""
    rows, nb = _check(planes, qtype)
    fields, start = {}, 0
    for o, size in PLANES[qtype]:
        fields[o] = planes[:, start:start + nb * size].reshape(rows, nb, size)
        start += nb * size
    return torch.cat([fields[o] for o in sorted(fields)], dim=2).reshape(rows, nb * TYPE_SIZE[qtype])


def _check(blocks: torch.Tensor, qtype: str) -> tuple[int, int]:
    """(rows, blocks per row) of uint8 [rows, a multiple of TYPE_SIZE bytes]; ValueError otherwise."""
    check_qtype(qtype)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % TYPE_SIZE[qtype]:
        raise ValueError(f"blocks must be uint8 [rows, a multiple of {TYPE_SIZE[qtype]} bytes] for {qtype}, got "
                         f"{str(blocks.dtype).removeprefix('torch.')} {tuple(blocks.shape)}")
    return blocks.shape[0], blocks.shape[1] // TYPE_SIZE[qtype]
