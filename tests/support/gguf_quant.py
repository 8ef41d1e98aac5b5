"""A reference quantiser for the GGML types Braid keeps quantised: float32 [rows, cols] -> the GGUF bytes
uint8 [rows, cols / block_size * type_size]. Also Q2_K, a type Braid dequantises at load (for the tests of that
path).

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 come from gguf.quants.quantize (llama.cpp's own rounding). The gguf package cannot
write the K-types, so Q2_K, Q4_K, Q5_K and Q6_K are encoded here in numpy with the simplest valid choice of scales
(each sub-block's range split evenly, the scales themselves quantised against their maximum), not llama.cpp's
error-minimising search: kernels only need valid blocks, and gguf.quants.dequantize reads them back. Layouts as in
braid_kernels/quant_formats.py.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

QK_K = 256
ENCODED = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q4_K", "Q5_K", "Q6_K"})
"""The types `quantize` writes."""


def quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    """float [rows, cols] -> uint8 [rows, row_bytes] in GGML type `qtype` (cols a multiple of the block size)."""
    if qtype not in ENCODED:
        raise ValueError(f"qtype must be one of {', '.join(sorted(ENCODED))}, got {qtype!r}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return gguf_quantize(array, GGMLQuantizationType[qtype])
    rows, cols = array.shape
    if cols % QK_K:
        raise ValueError(f"{qtype} rows need a multiple of {QK_K} values, got {cols}")
    blocks = array.reshape(-1, QK_K)
    encoded = {"Q2_K": _q2_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[qtype](blocks)
    return encoded.reshape(rows, -1)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """(n,) float -> (n, 2) uint8, and the float32 value those bytes hold."""
    half = values.astype(np.float16)
    return half.reshape(-1, 1).view(np.uint8), half.astype(np.float32)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (an all-zero sub-block)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _affine_k(blocks: np.ndarray, levels: int):
    """Q4_K/Q5_K: per sub-block of 32, w ~ (d * sc) * q - dmin * m with q in [0, levels], sc and m 6-bit.
    -> (d bytes, dmin bytes, scales (n, 8), mins (n, 8), q (n, 256))."""
    sub = blocks.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=2), 0.0)  # (n, 8): the offset is subtracted, so it covers negatives only
    scale = (sub.max(axis=2) - low) / levels
    d_bytes, d = _fp16_bytes(scale.max(axis=1) / 63)
    dmin_bytes, dmin = _fp16_bytes(-low.min(axis=1) / 63)
    sc = np.clip(np.rint(_div(scale, d[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_div(-low, dmin[:, None])), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[:, :, None]
    offset = (dmin[:, None] * mn)[:, :, None]
    q = np.clip(np.rint(_div(sub + offset, step)), 0, levels).astype(np.uint8)
    return d_bytes, dmin_bytes, sc, mn, q.reshape(-1, QK_K)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit (n, 8) scales and mins -> (n, 12) bytes, the inverse of quant_formats._k_scale_min."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _pack_nibbles(q: np.ndarray, group: int) -> np.ndarray:
    """(n, 256) values < 16 -> (n, 128) bytes: per 2 * group values, the first group in low nibbles, the next high."""
    q = q.reshape(q.shape[0], -1, 2, group)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def _q4_k(blocks):
    d, dmin, sc, mn, q = _affine_k(blocks, 15)
    return np.concatenate([d, dmin, _pack_scales(sc, mn), _pack_nibbles(q, 32)], axis=1)


def _q5_k(blocks):
    d, dmin, sc, mn, q = _affine_k(blocks, 31)
    high = (q >> 4).reshape(-1, 8, 32)  # bit s of qh[i] is bit 4 of element s * 32 + i
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    return np.concatenate([d, dmin, _pack_scales(sc, mn), qh, _pack_nibbles(q & 0x0F, 32)], axis=1)


def _q6_k(blocks):
    sub = blocks.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=2) / 31  # (n, 16): q - 32 in [-32, 31]
    d_bytes, d = _fp16_bytes(scale.max(axis=1) / 127)
    sc = np.clip(np.rint(_div(scale, d[:, None])), -128, 127).astype(np.int8)
    step = (d[:, None] * sc)[:, :, None]
    q = (np.clip(np.rint(_div(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)  # halves of 128
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)  # (n, 2, 64)
    top = (q >> 4).reshape(-1, 2, 4, 32)  # bits 4-5 of element h * 128 + u * 32 + i
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)  # (n, 2, 32)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d_bytes], axis=1)


def _q2_k(blocks):
    """Q2_K (84 B / 256: scales[16] | qs[64] | d, dmin fp16): per sub-block of 16, w = (d * (sc & 15)) * q -
    dmin * (sc >> 4) with q 2-bit; q of element h * 128 + u * 32 + i in bits 2u of qs[h * 32 + i] (gguf's order)."""
    sub = blocks.reshape(-1, 16, 16)
    low = np.minimum(sub.min(axis=2), 0.0)
    scale = (sub.max(axis=2) - low) / 3
    d_bytes, d = _fp16_bytes(scale.max(axis=1) / 15)
    dmin_bytes, dmin = _fp16_bytes(-low.min(axis=1) / 15)
    sc = np.clip(np.rint(_div(scale, d[:, None])), 0, 15).astype(np.uint8)
    mn = np.clip(np.rint(_div(-low, dmin[:, None])), 0, 15).astype(np.uint8)
    step = (d[:, None] * sc)[:, :, None]
    q = np.clip(np.rint(_div(sub + (dmin[:, None] * mn)[:, :, None], step)), 0, 3).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # (block, half h, shift u, i)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)  # (n, 2, 32)
    return np.concatenate([sc | (mn << 4), qs.reshape(-1, 64), d_bytes, dmin_bytes], axis=1)
