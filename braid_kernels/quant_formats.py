"""The GGML block formats Braid computes from, and their decoding in plain PyTorch (any device).

A quantised weight [rows, cols] is stored as llama.cpp writes it in a GGUF file: each row is cols / BLOCK_SIZE
blocks of TYPE_SIZE bytes, one after the other, so the tensor is uint8 [rows, cols / BLOCK_SIZE * TYPE_SIZE]
(what gguf.GGUFReader gives as a tensor's `.data`, reshaped to rows). Byte layouts of one block (fp16 little-endian):

    Q8_0  34 B / 32:   d fp16 | qs int8[32]                      w = d * qs
    Q4_0  18 B / 32:   d fp16 | qs[16]                           w[i] = d * (lo(qs[i]) - 8), w[16 + i] with hi
    Q4_1  20 B / 32:   d, m fp16 | qs[16]                        w[i] = d * lo(qs[i]) + m, w[16 + i] with hi
    Q5_0  22 B / 32:   d fp16 | qh uint32 | qs[16]               as Q4_0 with q - 16, bit j of qh as bit 4 of q[j]
    Q5_1  24 B / 32:   d, m fp16 | qh uint32 | qs[16]            as Q4_1, bit j of qh as bit 4 of q[j]
    Q4_K 144 B / 256:  d, dmin fp16 | scales[12] | qs[128]       8 sub-blocks of 32 with 6-bit scale and min:
                       w[s * 32 + i] = (d * sc[s]) * q - dmin * m[s], q = lo or hi nibble of qs[s // 2 * 32 + i]
    Q5_K 176 B / 256:  d, dmin fp16 | scales[12] | qh[32] | qs[128]   as Q4_K, q gets bit s of qh[i] as bit 4
    Q6_K 210 B / 256:  ql[128] | qh[64] | scales int8[16] | d fp16    16 sub-blocks of 16: w = (d * sc[s]) * (q - 32),
                       q of element h * 128 + r: nibble r // 64 of ql[h * 64 + r % 64], bits 2 * (r // 32) of
                       qh[h * 32 + r % 32] as bits 4-5

(ggml-common.h's block_q4_K etc.; the 6-bit scales unpack as in `_k_scale_min`). The arithmetic here follows
gguf.quants' dequantisation step by step in float32, so the results are its results bit for bit.
"""
from __future__ import annotations

import torch

BLOCK_SIZE = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
"""Weights per block, by GGML type name."""
TYPE_SIZE = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
"""Bytes per block, by GGML type name."""
QTYPES = frozenset(BLOCK_SIZE)
"""The GGML types Braid keeps quantised."""


def check_qtype(qtype) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {', '.join(sorted(QTYPES))}; got {qtype!r}")


def dequantize_torch(blocks: torch.Tensor, qtype: str, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 blocks [rows, row_bytes] of `qtype` -> weights [rows, row_bytes / TYPE_SIZE * BLOCK_SIZE] of out_dtype,
    computed in float32 (gguf.quants.dequantize's values) and then rounded to out_dtype."""
    check_blocks(blocks, qtype)
    rows, row_bytes = blocks.shape
    b = blocks.reshape(-1, TYPE_SIZE[qtype])  # (num_blocks, type_size)
    w = _DECODERS[qtype](b)  # (num_blocks, block_size) float32
    return w.reshape(rows, row_bytes // TYPE_SIZE[qtype] * BLOCK_SIZE[qtype]).to(out_dtype)


def check_blocks(blocks: torch.Tensor, qtype: str) -> None:
    """Raises ValueError unless `blocks` is uint8 [rows, a whole number of `qtype`'s blocks]."""
    check_qtype(qtype)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % TYPE_SIZE[qtype]:
        raise ValueError(f"blocks must be uint8 [rows, a multiple of {TYPE_SIZE[qtype]} bytes] for {qtype}, got "
                         f"{str(blocks.dtype).removeprefix('torch.')} {tuple(blocks.shape)}")


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian bytes -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes (n, g * group) -> (n, g * 2 * group): each group of bytes' low nibbles, then its high nibbles."""
    qs = qs.reshape(qs.shape[0], qs.shape[1] // group, 1, group)  # sizes given: n may be 0 (an empty lookup)
    return torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(qs.shape[0], qs.shape[1] * 2 * group)


def _q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:], 16).to(torch.int8) - 8).float()


def _q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:], 16).float() + _f16(b[:, 2:4])


def little_endian_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m] -> [..., 8 m] in {0, 1}: bit j of the little-endian run of bytes at position j (Q5_0's and
    Q5_1's qh, whose bit j is bit 4 of weight j; the CPU kernels' planes of fifth bits)."""
    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _q5_0(b):
    return _f16(b[:, :2]) * ((_nibbles(b[:, 6:], 16) | (little_endian_bits(b[:, 2:6]) << 4)).to(torch.int8)
                             - 16).float()


def _q5_1(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 8:], 16) | (little_endian_bits(b[:, 4:8]) << 4)).float() + _f16(b[:, 2:4])


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes (n, 12) -> 6-bit scales and mins (n, 8): bytes 0-3 hold sc[0:4] and the top 2 bits of sc[4:8],
    bytes 4-7 m[0:4] and the top bits of m[4:8], bytes 8-11 the low 4 bits of sc[4:8] (low nibble) and m[4:8]."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: (d * sc) * q - dmin * m per sub-block of 32; q (n, 256) float32."""
    sc, mn = _k_scale_min(b[:, 4:16])
    scale = (_f16(b[:, 0:2]) * sc.float())[:, :, None]  # (n, 8, 1)
    offset = (_f16(b[:, 2:4]) * mn.float())[:, :, None]
    return (scale * q.reshape(-1, 8, 32) - offset).reshape(-1, 256)


def _q4_k(b):
    return _k_affine(b, _nibbles(b[:, 16:], 32).float())


def _q5_k(b):
    qh = b[:, 16:48][:, None, :]  # (n, 1, 32): bit s of qh[i] is bit 4 of element s * 32 + i
    high = (qh >> torch.arange(8, dtype=torch.uint8, device=b.device)[None, :, None]) & 1  # (n, 8, 32)
    return _k_affine(b, (_nibbles(b[:, 48:], 32) | (high.reshape(-1, 256) << 4)).float())


def q6_k_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks [n, 210] -> (q uint8 [n, 256] in 0..63, scale d sc float32 [n, 16]): w = scale (q - 32) per 16."""
    low = _nibbles(b[:, :128], 64)  # (n, 256): halves of 128, each 64 low then 64 high nibbles
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh >> shifts) & 3).reshape(-1, 256)
    return low | (high << 4), _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()


def _q6_k(b):
    q, scale = q6_k_parts(b)
    q = (q.to(torch.int8) - 32).float().reshape(-1, 16, 16)
    return (scale[:, :, None] * q).reshape(-1, 256)


NIBBLE_QTYPES = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"})
"""The types `nibble_terms` writes as 4-bit codes with a scale and offset per run of 32 weights."""


def nibble_terms(blocks: torch.Tensor, qtype: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """uint8 blocks [rows, row_bytes] of `qtype` (one of NIBBLE_QTYPES) as terms (codes, scale, offset) with

        W = sum over terms of scale * codes + offset     (scale and offset repeated over each run of 32 columns)

    codes: uint8 [rows, cols] in 0..15; scale, offset: float32 [rows, cols / 32]. Each term is gguf's arithmetic
    split exactly: Q4_0 (d, -8 d), Q4_1 (d, m), Q4_K (d sc, -dmin m); Q8_0's signed byte q = 16 h + l is two terms,
    h + 8 with (16 d, -128 d) and l with (d, 0); Q5_0, Q5_1 and Q5_K are Q4_0's (with -16 d for -8 d), Q4_1's and
    Q4_K's term plus the fifth bit with (16 d, 0) or (16 d sc, 0). Q6_K (a scale per 16 weights) has no such form."""
    if qtype not in NIBBLE_QTYPES:
        raise ValueError(f"qtype must be one of {', '.join(sorted(NIBBLE_QTYPES))} for 4-bit terms, got {qtype!r}")
    check_blocks(blocks, qtype)
    rows, row_bytes = blocks.shape
    cols = row_bytes // TYPE_SIZE[qtype] * BLOCK_SIZE[qtype]
    b = blocks.reshape(-1, TYPE_SIZE[qtype])
    if qtype in ("Q4_K", "Q5_K"):
        sc, mn = _k_scale_min(b[:, 4:16])
        scale, offset = _f16(b[:, 0:2]) * sc.float(), -(_f16(b[:, 2:4]) * mn.float())
        qs = b[:, 16:] if qtype == "Q4_K" else b[:, 48:]
        terms = [(_nibbles(qs, 32), scale, offset)]
        if qtype == "Q5_K":
            qh = b[:, 16:48][:, None, :]
            high = (qh >> torch.arange(8, dtype=torch.uint8, device=b.device)[None, :, None]) & 1
            terms.append((high.reshape(-1, 256), 16 * scale, torch.zeros_like(offset)))
    else:
        d = _f16(b[:, :2])
        if qtype == "Q8_0":
            q = b[:, 2:].view(torch.int8)
            terms = [(((q >> 4) + 8).view(torch.uint8), 16 * d, -128 * d), (b[:, 2:] & 0x0F, d, torch.zeros_like(d))]
        elif qtype == "Q4_0":
            terms = [(_nibbles(b[:, 2:], 16), d, -8 * d)]
        elif qtype == "Q4_1":
            terms = [(_nibbles(b[:, 4:], 16), d, _f16(b[:, 2:4]))]
        else:  # Q5_0, Q5_1: the low nibbles' term, then the fifth bit's
            qh_at = 2 if qtype == "Q5_0" else 4
            offset = -16 * d if qtype == "Q5_0" else _f16(b[:, 2:4])
            terms = [(_nibbles(b[:, qh_at + 4:], 16), d, offset),
                     (little_endian_bits(b[:, qh_at:qh_at + 4]), 16 * d, torch.zeros_like(d))]
    return [(c.reshape(rows, cols), s.reshape(rows, cols // 32), o.reshape(rows, cols // 32)) for c, s, o in terms]


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k,
             "Q6_K": _q6_k}
