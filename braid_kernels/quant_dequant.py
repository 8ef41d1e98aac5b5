"""Triton kernel that writes the weights of GGML blocks (in the planes layout, quant_planes.py) out in a float dtype:
whole matrices (the GEMM path of quant_linear dequantises into a buffer and calls the tensor cores) and looked-up
rows (quant_embedding).

Launchers with argument checks are in braid_kernels/quant.py; this file only launches."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .numerics import launch_options, round_to_dtype, wait_for_inputs
from .quant_decode import GROUP_LANES, GROUPS_PER_BLOCK, QTYPE_IDS, decode_groups, num_groups
from .quant_formats import BLOCK_SIZE, TYPE_SIZE

class DequantConfig(NamedTuple):
    """A program of the dequantising kernel: `rows` rows of W x `groups` groups (256-1024 weights) of each."""
    rows: int = 4
    groups: int = 16
    num_warps: int = 4


DEFAULT_CONFIG = DequantConfig()
LAUNCH_CONFIGS: dict[str, DequantConfig] = {"Q4_K": DequantConfig(2, 32, 2), "Q6_K": DequantConfig(4, 16, 2)}
"""Per GGML type, where it differs from DEFAULT_CONFIG: the best of `benchmarks/quant_kernels.py --dequant` on an
H200 over Llama-3.1-8B's shapes (Q4_K 25-27% faster than the default, 3.3-3.8 TB/s; Q6_K 5-9%)."""


def launch_config(qtype: str) -> DequantConfig:
    return LAUNCH_CONFIGS.get(qtype, DEFAULT_CONFIG)


def launch_dequantize(blocks: torch.Tensor, qtype: str, out: torch.Tensor, ids: torch.Tensor | None = None,
                      config: DequantConfig | None = None) -> None:
    """out[r] = the weights of blocks[ids[r]] (blocks[r] when ids is None), rounded to out's dtype.
    blocks: uint8 [rows, row_bytes] contiguous; out: [len(ids) or rows, cols] contiguous; ids: int [T];
    config: launch_config(qtype) when None."""
    num_rows, cols = out.shape
    if num_rows == 0 or cols == 0:
        return
    config = config or launch_config(qtype)
    groups = num_groups(qtype, cols)
    grid = (triton.cdiv(num_rows, config.rows), triton.cdiv(groups, config.groups))
    _dequantize_kernel[grid](
        blocks, ids, out, num_rows, blocks.shape[0], blocks.shape[1], cols,
        QTYPE=QTYPE_IDS[qtype], BLOCK_SIZE=BLOCK_SIZE[qtype], TYPE_SIZE=TYPE_SIZE[qtype],
        GROUPS=GROUPS_PER_BLOCK[qtype], LANES=GROUP_LANES[qtype], NUM_GROUPS=groups, HAS_IDS=ids is not None,
        BLOCK_R=config.rows, BLOCK_G=config.groups, num_warps=config.num_warps, **launch_options(blocks),
    )


@triton.jit
def _dequantize_kernel(
    blocks_ptr, ids_ptr, out_ptr, num_rows, num_block_rows, row_bytes, cols,
    QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, TYPE_SIZE: tl.constexpr, GROUPS: tl.constexpr,
    LANES: tl.constexpr, NUM_GROUPS: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (r, g): BLOCK_R output rows x BLOCK_G groups of each. Tiles are (row, group, lane)."""
    wait_for_inputs(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)[None, :, None]
    lane = tl.arange(0, LANES)[None, None, :]
    row_ok = rows < num_rows
    src = rows
    if HAS_IDS:
        src = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        row_ok = row_ok & (src >= 0) & (src < num_block_rows)  # an id out of range leaves its row unwritten
    mask = row_ok & (g < NUM_GROUPS)
    w_lo, w_hi, col_lo, col_hi = decode_groups(blocks_ptr, src.to(tl.int64) * row_bytes, row_bytes // TYPE_SIZE, g,
                                               lane, mask, QTYPE, BLOCK_SIZE, GROUPS, LANES)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    out_row = out_ptr + rows.to(tl.int64) * cols
    tl.store(out_row + col_lo, round_to_dtype(w_lo, dtype).to(dtype), mask=mask)
    tl.store(out_row + col_hi, round_to_dtype(w_hi, dtype).to(dtype), mask=mask)
