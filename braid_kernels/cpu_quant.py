"""Quantised weights' products on x86 CPUs with AVX-512 VNNI: cpu_quant.c (integer dot products of 4-, 5- or 8-bit
weight codes with x rounded to int8 per 32 values, as llama.cpp computes), built on first use (cpu_library.py) and
called through ctypes.

A weight is packed once (`pack`: GGUF blocks of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K) into unsigned codes
with a scale and offset per 32 weights (Q6_K: 16), w = s c + o, in the byte order cpu_quant.c describes; where every
offset is a fixed multiple of its scale (Q4_0, Q5_0, Q8_0, Q6_K: OFFSET_FACTORS) the offsets are not stored. The
32-weight types keep GGUF's float16 d and m exactly (0.5625 bytes a weight for Q4_0, 0.625 for Q4_1, 0.6875 for
Q5_0, 0.75 for Q5_1, 1.0625 for Q8_0), the K-types take float32 scales (their d times a 6- or 8-bit scale; Q6_K 1.25
bytes a weight). `linear` computes x @ W.T in float32; `linear_ref` is the same arithmetic in plain PyTorch.

`available()` is False where there is no C compiler, the CPU lacks AVX-512 VNNI, or the build fails (the reason:
`unavailable_reason()`); callers then keep another path.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from .cpu_library import available, library, unavailable_reason
from .quant_formats import NIBBLE_QTYPES, TYPE_SIZE, check_blocks, little_endian_bits, nibble_terms, q6_k_parts

__all__ = ["PackedWeight", "QTYPES", "available", "dequantize", "dequantize_rows", "linear", "linear_ref", "pack", "quantize_x_ref",
           "unavailable_reason", "unpack"]

BLOCK = 32
"""Weights per scale and offset; x is rounded to int8 per run of this many values."""
CHUNK = 64
"""Weights per interleaved chunk of a row (cpu_quant.c)."""
QTYPES = NIBBLE_QTYPES | {"Q6_K"}
"""The GGUF types `pack` takes."""
OFFSET_FACTORS = {"Q4_0": -8.0, "Q5_0": -16.0, "Q8_0": -128.0, "Q6_K": -32.0}
"""Types whose every offset is this multiple of its scale (GGUF's symmetric codes: w = d (q - 8), d (q - 16), d q
with q + 128 stored, d sc (q - 32)): packed without offsets."""


class _Weight(ctypes.Structure):
    """cpu_quant.c's struct braid_weight."""

    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("n", ctypes.c_long), ("k", ctypes.c_long), ("bits", ctypes.c_long), ("scales_f32", ctypes.c_long),
                ("group16", ctypes.c_long), ("offset_factor", ctypes.c_float)]


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """W [n, k] as cpu_quant.c reads it: codes uint8 [n, k * bits / 8] (bits 4, 5 or 8), scales and offsets float16
    or float32 [n, k / 32], or float32 [n, k / 16] (Q6_K: `group` 16); offsets None: `offset_factor` times the
    scales. The tensors must not be modified or resized (the library holds their addresses)."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    bits: int
    offset_factor: float = 0.0

    @functools.cached_property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 8 // self.bits

    @property
    def group(self) -> int:
        """Weights per scale and offset: 32, or 16 (Q6_K)."""
        return self.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offsets) if t is not None)

    @functools.cached_property
    def _struct(self) -> ctypes.c_void_p:
        """A pointer to this weight's struct braid_weight, built on first use (kept alive with it)."""
        n, k = self.shape
        offsets = None if self.offsets is None else self.offsets.data_ptr()
        struct = _Weight(self.codes.data_ptr(), self.scales.data_ptr(), offsets, n, k, self.bits,
                         int(self.scales.dtype == torch.float32), int(self.group == 16), self.offset_factor)
        self.__dict__["_struct_keep"] = struct
        return ctypes.cast(ctypes.pointer(struct), ctypes.c_void_p)


def pack(blocks: torch.Tensor, qtype: str) -> PackedWeight:
    """W held as uint8 GGUF blocks [n, row_bytes] of `qtype` (one of QTYPES; k a multiple of 32) in this module's
    form. Q4_0/Q4_1/Q4_K take 4-bit codes; Q5_0/Q5_1/Q5_K 5-bit ones (the nibble plus 16 times the fifth bit); Q8_0
    (q + 128) and Q6_K (q, with a scale d sc per 16 weights) 8-bit ones; the offsets of OFFSET_FACTORS' types are not
    stored."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {', '.join(sorted(QTYPES))}, got {qtype!r}")
    if qtype == "Q6_K":
        codes, scale = q6_k_codes(blocks)
        return PackedWeight(_order(codes, 8), scale.contiguous(), None, 8, OFFSET_FACTORS[qtype])
    terms = nibble_terms(blocks, qtype)
    if len(terms) == 1:
        (codes, scale, offset), bits = terms[0], 4
    else:  # Q8_0 and the 5-bit types: two terms, one with 16 times the other's scale, make one 8- or 5-bit code
        (c0, s0, o0), (c1, s1, o1) = terms
        if torch.equal(s1, 16 * s0):
            (c0, s0, o0), (c1, s1, o1) = (c1, s1, o1), (c0, s0, o0)
        if not torch.equal(s0, 16 * s1):
            raise ValueError(f"{qtype}'s two terms do not make one code")
        codes, scale, offset, bits = c1 + 16 * c0, s1, o0 + o1, (5 if qtype in ("Q5_0", "Q5_1", "Q5_K") else 8)
    exact = qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") and all(
        torch.equal(t.half().float(), t) for t in (scale, offset))  # GGUF's own float16 d and m: kept exactly
    dtype = torch.float16 if exact else torch.float32
    scale, offset = scale.to(dtype).contiguous(), offset.to(dtype).contiguous()
    factor = OFFSET_FACTORS.get(qtype)
    if factor is not None and torch.equal(offset.float(), factor * scale.float()):
        return PackedWeight(_order(codes, bits), scale, None, bits, factor)
    return PackedWeight(_order(codes, bits), scale, offset, bits)


def q6_k_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks [n, row_bytes] as (q uint8 [n, k] in 0..63, scale d sc float32 [n, k / 16]): w = scale (q - 32),
    gguf's arithmetic."""
    check_blocks(blocks, "Q6_K")
    rows = blocks.shape[0]
    q, scale = q6_k_parts(blocks.reshape(-1, TYPE_SIZE["Q6_K"]))
    return q.reshape(rows, -1), scale.reshape(rows, -1)


def _order(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [n, k] in cpu_quant.c's byte order (whole chunks interleaved by block, a last lone block in
    natural order), two to a byte for 4 bits; for 5 bits, each chunk's (and the tail's) low four bits as 4-bit codes,
    then their fifth bits, one a bit (little-endian: bit i for byte i of the 8-bit order)."""
    n, k = codes.shape
    whole = k // CHUNK * CHUNK
    # weight p of block h of a chunk -> byte 4 (2 (p / 4) + h) + p % 4
    chunks = codes[:, :whole].reshape(n, k // CHUNK, 2, 8, 4).permute(0, 1, 3, 2, 4).reshape(n, -1, 2, 32)
    tail = codes[:, whole:].reshape(n, -1, 2, 16)
    if bits == 5:
        chunks = torch.cat((_nibble_pairs(chunks & 15), _bit_plane(chunks >> 4)), dim=2)
        tail = torch.cat((_nibble_pairs(tail & 15), _bit_plane(tail >> 4)), dim=2)
    elif bits == 4:
        chunks, tail = _nibble_pairs(chunks), _nibble_pairs(tail)
    return torch.cat((chunks.reshape(n, -1), tail.reshape(n, -1)), dim=1).contiguous()


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2, h] codes below 16 -> [..., h] bytes: the first h in the low nibbles, the second h in the high ones."""
    return codes[..., 0, :] | (codes[..., 1, :] << 4)


def _bit_plane(bits: torch.Tensor) -> torch.Tensor:
    """[..., 2, h] zeros and ones -> [..., h / 4] bytes, bit i of the little-endian run for value i (h a multiple of
    4)."""
    flat = bits.reshape(*bits.shape[:-2], bits.shape[-2] * bits.shape[-1] // 8, 8).to(torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=bits.device)
    return (flat * weights).sum(dim=-1).to(torch.uint8)


def _unpack_codes(packed: torch.Tensor, bits: int, size: int) -> torch.Tensor:
    """_order's packing of [n, groups, size] codes undone for one kind of run (chunks of 64, or the 32-weight tail):
    packed uint8 [n, groups * size * bits / 8] -> codes [n, groups, size] in the run's byte order."""
    n = packed.shape[0]
    if bits == 8:
        return packed.reshape(n, -1, size)
    if bits == 4:
        runs = packed.reshape(n, -1, size // 2)
        return torch.cat((runs & 15, runs >> 4), dim=2)
    runs = packed.reshape(n, -1, size * 5 // 8)
    low = runs[:, :, :size // 2]
    return torch.cat((low & 15, low >> 4), dim=2) | (little_endian_bits(runs[:, :, size // 2:]) << 4)


def unpack(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [n, k] in natural order, scales float32 [n, k / group], offsets float32): `pack`'s inverse, for
    references and tests."""
    n, k = weight.shape
    whole = k // CHUNK * CHUNK
    split = whole * weight.bits // 8
    chunks = _unpack_codes(weight.codes[:, :split], weight.bits, CHUNK)
    tail = _unpack_codes(weight.codes[:, split:], weight.bits, BLOCK)
    chunks = chunks.reshape(n, -1, 8, 2, 4).permute(0, 1, 3, 2, 4).reshape(n, whole)
    codes = torch.cat((chunks, tail.reshape(n, -1)), dim=1)
    scales = weight.scales.float()
    return codes, scales, weight.offset_factor * scales if weight.offsets is None else weight.offsets.float()


def dequantize(weight: PackedWeight) -> torch.Tensor:
    """W [n, k] in float32: s c + o (GGUF's values exactly: s c is exact in float32 for every packed type, Q6_K's d
    sc q included, at most 24 significant bits, and so is the sum, GGUF's own value)."""
    codes, scales, offsets = unpack(weight)
    n, k = codes.shape
    w = codes.float().view(n, -1, weight.group) * scales[..., None] + offsets[..., None]
    return w.view(n, k)


def dequantize_rows(weight: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` ([T] int64) of W in float32, [T, k]: an embedding lookup in a table packed for its tied lm_head."""
    offsets = None if weight.offsets is None else weight.offsets[rows]
    picked = PackedWeight(weight.codes[rows], weight.scales[rows], offsets, weight.bits, weight.offset_factor)
    return dequantize(picked)


def quantize_x_ref(x: torch.Tensor, terms: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, k] float32 rounded as cpu_quant.c rounds it: (integers q int32 [m, k / 32, 32], scales dx [m, k / 32],
    sums of the rounded x [m, k / 32]), x ~ dx q. terms 1: d = max |x| / 127 over each 32 values, q = x / d rounded
    half to even (int8), dx = d; terms 2: also the remainder r = x - d q as q2 = r 256 / d rounded (int8), and
    q = 256 q + q2, dx = d / 256."""
    xb = x.float().view(x.shape[0], -1, BLOCK)
    d = xb.abs().amax(dim=-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127).to(torch.int32)
    if terms == 2:
        remainder = torch.addcmul(xb, q.float(), -d[..., None])
        q2 = torch.round(remainder * (256 * inv)[..., None]).clamp(-127, 127).to(torch.int32)
        q, d = 256 * q + q2, d / 256
    return q, d, d * q.sum(dim=-1).float()


def linear_ref(x: torch.Tensor, weight: PackedWeight, x_terms: int = 1) -> torch.Tensor:
    """x [m, k] @ W.T as `linear` computes it, in plain PyTorch: per group of weights sharing a scale (32, or Q6_K's
    16), s dx (codes . q) + o dx sum(q), summed over groups in float64 (`linear` sums in float32, in another order:
    equal to rounding)."""
    codes, scales, offsets = unpack(weight)
    q, dx, _ = quantize_x_ref(x, x_terms)
    n, m, g = codes.shape[0], q.shape[0], weight.group
    q = q.reshape(m, -1, g)
    dx = dx.repeat_interleave(BLOCK // g, dim=1)  # x's scale per 32 values, for each group in them
    sx = dx * q.sum(dim=-1).float()
    dots = torch.einsum("nbi,mbi->mnb", codes.view(n, -1, g).double(), q.double())  # exact integers
    y = (dots * scales.double()[None] * dx.double()[:, None]).sum(-1) + sx.double() @ offsets.double().t()
    return y.float()


def linear(x: torch.Tensor, weight: PackedWeight, out: torch.Tensor | None = None,
           threads: int | None = None, x_terms: int = 2) -> torch.Tensor:
    """x [m, k] float32 (rows contiguous) @ W.T -> float32 [m, n], written into `out` (a [m, n] float32 view whose
    rows are contiguous, e.g. columns of a wider output) when given; `threads`: OpenMP threads (None: torch's
    count on this thread). x_terms: x rounded to one int8 per value and 32-value block scale (llama.cpp's rounding),
    or 2: a second int8 for the remainder (~16 bits of x, two integer dot products a block; the default).
    Needs `available()`. Each row of the result is computed alone: the same whatever other rows x has."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the CPU quantised-product library is unavailable: {unavailable_reason()}")
    n, k = weight.shape
    if x.dtype is not torch.float32 or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1 or not x.is_cpu:
        raise ValueError(f"x must be a float32 CPU tensor [rows, {k}] with contiguous rows, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}")
    m = x.shape[0]
    if out is None:
        out = x.new_empty((m, n))  # float32 on the CPU, as x (not torch's default dtype or device)
    elif out.dtype is not torch.float32 or out.shape != (m, n) or out.stride(1) != 1 or not out.is_cpu:
        raise ValueError(f"out must be a float32 CPU tensor [{m}, {n}] with contiguous rows, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()} on {out.device}")
    ldx, ldy = (x.stride(0), out.stride(0)) if m > 1 else (k, n)  # (a one-row view may have any row stride)
    rc = lib.braid_cpu_quant_linear(weight._struct, x.data_ptr(), m, ldx, out.data_ptr(), ldy, x_terms,
                                    threads or torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"cpu_quant: no memory for x's int8 copy ({m} x {k})") if rc == -2 else \
            ValueError(f"cpu_quant rejected its arguments (m={m}, n={n}, k={k}, bits={weight.bits})")
    return out
