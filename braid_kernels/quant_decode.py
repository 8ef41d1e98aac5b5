"""Triton device code that decodes GGML blocks into float32 weights, shared by the dequantising kernels
(quant_dequant.py), the float GEMV (quant_gemv.py), the integer-dot GEMV's scales (quant_dot.py) and the fused GEMM
(quant_gemm.py). The blocks are read in the planes layout (quant_planes.py): `block_fields` gives the byte pointers
of a block's fields (quants, high bits, scales, fp16 head) in its row's planes; offsets below are within a field.

Every format is read in *groups*: GROUP_LANES consecutive bytes of a block whose low and high parts (nibbles, or the
two halves of Q8_0's bytes) are two runs of GROUP_LANES consecutive weights, `lo` and `hi`. A tile of groups is then
a tile of contiguous byte runs, which Triton loads as wide vectors wherever the row keeps them aligned, not byte by
byte, and each group's scales are decoded once for its 2 * GROUP_LANES weights:

    type  lanes groups/block  group c of a block: quant bytes        lo weights        hi weights
    Q8_0  16    1             qs[0:16] | qs[16:32]                  0..15             16..31
    Q4_0  16    1             qs[0:16]                              0..15             16..31
    Q4_1  16    1             qs[0:16]                              0..15             16..31
    Q5_0  16    1             qs[0:16], qh bytes 0-1 | 2-3          0..15             16..31
    Q5_1  16    1             qs[0:16], qh bytes 0-1 | 2-3          0..15             16..31
    Q4_K  32    4             qs[32c : 32c + 32]                    64c + 0..31       64c + 32..63
    Q5_K  32    4             qs[32c : 32c + 32], qh[0:32]          64c + 0..31       64c + 32..63
    Q6_K  16    8 (h, t)      ql[64h + 16t ...], qh[32h + 16(t%2)]  128h + 16t + ...  128h + 64 + 16t + ...

The arithmetic is gguf.quants' in float32 ((d * sc) * q - dmin * m, ...), so with mul+add contraction off
(numerics.launch_options) a decoded weight is gguf's bit for bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

# GGML types as kernel constants (constexpr globals, so that kernels can compare with them).
Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1 = (tl.constexpr(i) for i in range(8))
QTYPE_IDS = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "Q5_0": 6, "Q5_1": 7}
GROUP_LANES = {"Q8_0": 16, "Q4_0": 16, "Q4_1": 16, "Q5_0": 16, "Q5_1": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}
GROUPS_PER_BLOCK = {"Q8_0": 1, "Q4_0": 1, "Q4_1": 1, "Q5_0": 1, "Q5_1": 1, "Q4_K": 4, "Q5_K": 4, "Q6_K": 8}


def num_groups(qtype: str, cols: int) -> int:
    """Groups (2 * GROUP_LANES[qtype] weights each) in a row of `cols` weights of `qtype`."""
    return cols // (2 * GROUP_LANES[qtype])


@triton.jit
def _byte(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _fp16(ptr, mask):
    """The fp16 at ptr (a uint8 pointer, 2-aligned: the planes layout keeps every fp16 field so) as float32."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def block_fields(row, blk, nb, QTYPE: tl.constexpr):
    """Byte pointers to the fields of blocks blk (an index tensor) of the row at byte pointer row, nb blocks per row,
    in the planes layout (braid_kernels/quant_planes.py): (quants, high bits, scales, head). quants: qs (Q6_K: ql);
    high bits: Q5_K's and Q6_K's qh; scales: the K-types' packed scales; head: the block's fp16 fields (d, then m or
    dmin). Q5_0's and Q5_1's high bits: their qh word. Fields a type lacks point at its quants."""
    if QTYPE == Q8_0:
        q = row + blk * 32
        return q, q, q, row + nb * 32 + blk * 2
    elif QTYPE == Q4_0:
        q = row + blk * 16
        return q, q, q, row + nb * 16 + blk * 2
    elif QTYPE == Q4_1:
        q = row + blk * 16
        return q, q, q, row + nb * 16 + blk * 4
    elif QTYPE == Q5_0:
        q = row + blk * 16
        return q, row + nb * 16 + blk * 4, q, row + nb * 20 + blk * 2
    elif QTYPE == Q5_1:
        q = row + blk * 16
        return q, row + nb * 16 + blk * 4, q, row + nb * 20 + blk * 4
    elif QTYPE == Q4_K:
        q = row + blk * 128
        return q, q, row + nb * 128 + blk * 12, row + nb * 140 + blk * 4
    elif QTYPE == Q5_K:
        return row + blk * 128, row + nb * 128 + blk * 32, row + nb * 160 + blk * 12, row + nb * 172 + blk * 4
    else:  # Q6_K
        return row + blk * 128, row + nb * 128 + blk * 64, row + nb * 192 + blk * 16, row + nb * 208 + blk * 2


@triton.jit
def fp16_bits(bits):
    """The fp16 in the low 16 bits of int32 `bits`, as float32."""
    return (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def k_scale_bytes(scales_ptr, s, mask):
    """Q4_K/Q5_K: the three of the 12 packed scale bytes at scales_ptr that sub-block s (0-7) reads, as int32 (for
    k_unpack_scale_min; loaded apart so that a kernel can load them a step ahead)."""
    a = _byte(scales_ptr + s, mask)
    b = _byte(scales_ptr + s + 4, mask)
    c = _byte(scales_ptr + (s % 4), mask)  # scales[s - 4] for s >= 4
    return a, b, c


@triton.jit
def k_unpack_scale_min(a, b, c, s):
    """Q4_K/Q5_K: the 6-bit scale and min (int32) of sub-block s from its k_scale_bytes."""
    low = s < 4
    sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, mn


@triton.jit
def _k_scale_min(scales_ptr, s, mask):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block s (0-7) from the 12 packed bytes at scales_ptr, as float32."""
    a, b, c = k_scale_bytes(scales_ptr, s, mask)
    sc, mn = k_unpack_scale_min(a, b, c, s)
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def k_group_scales(head, scales, c, mask):
    """Q4_K/Q5_K, the block whose head (d, dmin) and packed scales are at byte pointers head and scales, group c
    (sub-blocks 2c and 2c + 1): (d * sc, dmin * m) of the low sub-block, then of the high one, float32 as gguf
    computes them."""
    d = _fp16(head, mask)
    dmin = _fp16(head + 2, mask)
    sc_lo, mn_lo = _k_scale_min(scales, 2 * c, mask)
    sc_hi, mn_hi = _k_scale_min(scales, 2 * c + 1, mask)
    return d * sc_lo, dmin * mn_lo, d * sc_hi, dmin * mn_hi


@triton.jit
def q6_group(ql, qh, scales, head, c, mask):
    """Q6_K, the block whose fields are at byte pointers ql, qh, scales and head (block_fields), group c = (half h,
    quarter t) of its 128-weight halves: (d * sc) of the low and high runs, the pointers to the group's ql and qh
    bytes, the shift of its 2-bit qh fields and the column of its first weight in the block."""
    h = c // 4
    t = c % 4
    d = _fp16(head, mask)
    sc_lo = tl.load(scales + h * 8 + t, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    sc_hi = tl.load(scales + 4 + h * 8 + t, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return d * sc_lo, d * sc_hi, ql + h * 64 + t * 16, qh + h * 32 + (t % 2) * 16, 2 * (t // 2), h * 128 + t * 16


@triton.jit
def q5_high_bits(qh, lane, mask):
    """Q5_0/Q5_1: bit 4 of weights lane and 16 + lane (lane in 0..15) from the block's little-endian uint32 qh at
    byte pointer qh (bit j for weight j), as int32 0 or 1, read a byte at a time (qh is 2-aligned at least)."""
    bit_lo = (_byte(qh + lane // 8, mask) >> (lane % 8)) & 1
    bit_hi = (_byte(qh + 2 + lane // 8, mask) >> (lane % 8)) & 1
    return bit_lo, bit_hi


@triton.jit
def decode_groups(blocks_ptr, row_offset, nb, g, lane, mask, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  GROUPS: tl.constexpr, LANES: tl.constexpr):
    """Weights of groups g (broadcastable index tensors) of the rows starting at byte row_offset (int64), nb blocks
    per row, in the planes layout.

    row_offset, g and lane broadcast together (e.g. (BN, 1, 1), (1, S, 1), (1, 1, LANES)); mask says which are
    real. Returns (w_lo, w_hi, col_lo, col_hi): float32 weights and their columns in the row, col_hi = col_lo + a
    constant stride, zeros where masked.
    """
    blk = g // GROUPS
    c = g % GROUPS
    qs, qh_ptr, scales, head = block_fields(blocks_ptr + row_offset, blk, nb, QTYPE)
    col = blk * BLOCK_SIZE
    if QTYPE == Q8_0:
        d = _fp16(head, mask)
        lo = tl.load(qs + lane, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        hi = tl.load(qs + 16 + lane, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        return d * lo, d * hi, col + lane, col + 16 + lane
    elif QTYPE == Q4_0:
        d = _fp16(head, mask)
        q = _byte(qs + lane, mask)
        return d * ((q & 15) - 8).to(tl.float32), d * ((q >> 4) - 8).to(tl.float32), col + lane, col + 16 + lane
    elif QTYPE == Q4_1:
        d = _fp16(head, mask)
        m = _fp16(head + 2, mask)
        q = _byte(qs + lane, mask)
        return (d * (q & 15).to(tl.float32) + m, d * (q >> 4).to(tl.float32) + m, col + lane, col + 16 + lane)
    elif QTYPE == Q5_0 or QTYPE == Q5_1:
        d = _fp16(head, mask)
        q = _byte(qs + lane, mask)
        bit_lo, bit_hi = q5_high_bits(qh_ptr, lane, mask)
        q_lo = ((q & 15) | (bit_lo << 4)).to(tl.float32)
        q_hi = ((q >> 4) | (bit_hi << 4)).to(tl.float32)
        if QTYPE == Q5_0:
            return d * (q_lo - 16.0), d * (q_hi - 16.0), col + lane, col + 16 + lane
        else:
            m = _fp16(head + 2, mask)
            return d * q_lo + m, d * q_hi + m, col + lane, col + 16 + lane
    elif QTYPE == Q4_K or QTYPE == Q5_K:
        s_lo, m_lo, s_hi, m_hi = k_group_scales(head, scales, c, mask)
        q = _byte(qs + c * 32 + lane, mask)
        if QTYPE == Q4_K:
            q_lo = q & 15
            q_hi = q >> 4
        else:
            qh = _byte(qh_ptr + lane, mask)  # bit s of qh[i] is bit 4 of sub-block s's weight i
            q_lo = (q & 15) | (((qh >> (2 * c)) & 1) << 4)
            q_hi = (q >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
        w_lo = s_lo * q_lo.to(tl.float32) - m_lo
        w_hi = s_hi * q_hi.to(tl.float32) - m_hi
        col_lo = col + c * 64 + lane
        return w_lo, w_hi, col_lo, col_lo + 32
    else:  # Q6_K: group c = (half h, quarter t) of the 128-weight halves
        s_lo, s_hi, ql_ptr, qh_run, shift, first = q6_group(qs, qh_ptr, scales, head, c, mask)
        ql = _byte(ql_ptr + lane, mask)
        qh = _byte(qh_run + lane, mask)
        q_lo = ((ql & 15) | (((qh >> shift) & 3) << 4)) - 32
        q_hi = ((ql >> 4) | (((qh >> (shift + 4)) & 3) << 4)) - 32
        col_lo = col + first + lane
        return s_lo * q_lo.to(tl.float32), s_hi * q_hi.to(tl.float32), col_lo, col_lo + 64


@triton.jit
def _unit(bits):
    """float32 1 + m / 2^23 for the mantissa bits m (int32, below 2^23): a quant code made a float by placing it in
    the mantissa of 1.0, one integer operation instead of an int-to-float conversion (quarter rate on sm_90)."""
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def decode_codes(blocks_ptr, row_offset, nb, g, lane, mask, QTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 GROUPS: tl.constexpr, LANES: tl.constexpr):
    """The weights of groups g as codes and per-group affine maps: weight = a * f + b, f in [1, 2).

    Arguments as decode_groups. Returns (f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi) as block_codes, with
    the columns counted from the row's first weight. Masked groups give a = b = 0.
    """
    blk = g // GROUPS
    qs, qh, scales, head = block_fields(blocks_ptr + row_offset, blk, nb, QTYPE)
    f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi = block_codes(qs, qh, scales, head, g % GROUPS, lane, mask,
                                                                     QTYPE)
    col = blk * BLOCK_SIZE
    return f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, col + col_lo, col + col_hi


@triton.jit
def block_codes(qs, qh_ptr, scales, head, c, lane, mask, QTYPE: tl.constexpr):
    """Group c, lanes `lane` of the blocks whose fields are at byte pointers qs, qh_ptr, scales and head (block_fields;
    the pointers, c and lane broadcast together; mask says which are real) as codes and per-group affine maps: weight =
    a * f + b, f in [1, 2).

    Returns (f_lo, f_hi, a_lo, b_lo, a_hi, b_hi, col_lo, col_hi): f of the shape of the pointers, c and lane broadcast
    together; a and b of the shape of the pointers and c (no lane dimension), so that a dot product over a group's lanes
    costs one multiply-add per weight, sum(w * x) = a * sum(f * x) + b * sum(x); the columns of the weights in their
    block. A code q of B bits is f = 1 + q / 2^B (exact), so a = 2^B * scale and b = offset - a for the format's weight
    = scale * q + offset. Masked groups give a = b = 0 (weight 0).
    """
    if QTYPE == Q8_0:
        d = _fp16(head, mask)
        # int8 q as the byte u = q + 128 (top bit flipped) in bits 15-22: 1 + u / 256; weight = d * (u - 128).
        lo = _unit((_byte(qs + lane, mask) << 15) ^ 0x400000)
        hi = _unit((_byte(qs + 16 + lane, mask) << 15) ^ 0x400000)
        a = 256.0 * d
        return lo, hi, a, -1.5 * a, a, -1.5 * a, lane, 16 + lane
    elif QTYPE == Q4_0 or QTYPE == Q4_1:
        d = _fp16(head, mask)
        q = _byte(qs + lane, mask)
        if QTYPE == Q4_0:
            b = -24.0 * d  # d * (q - 8) = 16 d f - 24 d
        else:
            b = _fp16(head + 2, mask) - 16.0 * d  # d * q + m = 16 d f - 16 d + m
        a = 16.0 * d
        return _unit((q << 19) & 0x780000), _unit((q << 15) & 0x780000), a, b, a, b, lane, 16 + lane
    elif QTYPE == Q5_0 or QTYPE == Q5_1:
        d = _fp16(head, mask)
        q = _byte(qs + lane, mask)
        bit_lo, bit_hi = q5_high_bits(qh_ptr, lane, mask)
        a = 32.0 * d
        if QTYPE == Q5_0:
            b = -1.5 * a  # d * (q - 16) = 32 d f - 48 d
        else:
            b = _fp16(head + 2, mask) - a  # d * q + m = 32 d f - 32 d + m
        lo = _unit(((q << 18) & 0x3C0000) | (bit_lo << 22))
        hi = _unit(((q << 14) & 0x3C0000) | (bit_hi << 22))
        return lo, hi, a, b, a, b, lane, 16 + lane
    elif QTYPE == Q4_K or QTYPE == Q5_K:
        s_lo, m_lo, s_hi, m_hi = k_group_scales(head, scales, c, mask)
        q = _byte(qs + c * 32 + lane, mask)
        if QTYPE == Q4_K:
            lo = _unit((q << 19) & 0x780000)
            hi = _unit((q << 15) & 0x780000)
            unit = 16.0
        else:
            qh = _byte(qh_ptr + lane, mask)  # bit s of qh[i] is bit 4 of sub-block s's weight i
            lo = _unit(((q << 18) & 0x3C0000) | (((qh >> (2 * c)) & 1) << 22))
            hi = _unit(((q << 14) & 0x3C0000) | (((qh >> (2 * c + 1)) & 1) << 22))
            unit = 32.0
        a_lo = unit * s_lo
        a_hi = unit * s_hi
        col_lo = c * 64 + lane
        return lo, hi, a_lo, -a_lo - m_lo, a_hi, -a_hi - m_hi, col_lo, col_lo + 32
    else:  # Q6_K, groups as in decode_groups; weight = d * sc * (q - 32) = 64 d sc f - 96 d sc
        s_lo, s_hi, ql_ptr, qh_run, shift, first = q6_group(qs, qh_ptr, scales, head, c, mask)
        ql = _byte(ql_ptr + lane, mask)
        qh = _byte(qh_run + lane, mask) >> shift
        lo = _unit(((ql << 17) & 0x1E0000) | ((qh << 21) & 0x600000))
        hi = _unit(((ql << 13) & 0x1E0000) | ((qh << 17) & 0x600000))
        a_lo = 64.0 * s_lo
        a_hi = 64.0 * s_hi
        col_lo = first + lane
        return lo, hi, a_lo, -1.5 * a_lo, a_hi, -1.5 * a_hi, col_lo, col_lo + 64
