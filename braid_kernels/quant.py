"""Computing from weights kept as GGML blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; layouts in quant_formats.py):
dequantisation, the linear layer and the embedding lookup, each beside its reference.

Every function here takes the blocks in the planes layout (`to_planes` of the GGUF bytes, quant_planes.py: each row's
fields regrouped so that the kernels read their quants as aligned vectors; the same bytes, the same shape); the
references take the GGUF blocks themselves.

The references are independent of this code: gguf.quants.dequantize (the gguf package's numpy decoder) to float32,
then a plain float32 torch matmul or index. The kernels differ from them only in the order of the float32 sums
(quant_linear's GEMV) or, on the GEMM path, by rounding the weights to x's dtype before the tensor cores.

Where they run: Triton on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, as the tests do); on the CPU
otherwise, the PyTorch decoder `dequantize_torch` followed by torch's matmul or index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import INDEX_DTYPES, check_devices, check_float_dtype, check_linear_inputs, check_shape, \
    check_tensor
from .int8_rows import Int8Rows, check_int8_rows, quantize_rows
from .numerics import is_interpreted
from .quant_dequant import _dequantize_kernel, launch_dequantize
from .quant_dot import dot_launch_config, launch_dot_gemv
from .quant_formats import BLOCK_SIZE, QTYPES, TYPE_SIZE, check_qtype, dequantize_torch
from .quant_gemm import HALF_BLOCK_TYPES, QuantGemmConfig, launch_gemm, uses_half_block
from .quant_gemv import MAX_ROWS, QuantGemvConfig, launch_gemv
from .quant_planes import from_planes, to_planes
from .quant_stream import launch_stream_gemv, launch_stream_gemv_pair, uses_stream

# Rows of x up to which quant_linear's default is a GEMV (integer-dot for 16-bit x, float for float32 x); above, the
# fused GEMM up to GEMM_DEFAULT_ROWS rows of 16-bit x on matrices of at least GEMM_MIN_WEIGHTS weights, otherwise W
# dequantised to x's dtype and multiplied by cuBLAS. Measured on an H200 in the planes layout (benchmarks/RESULTS.md),
# time against bf16 matmul's: at 4 rows the integer-dot GEMV 0.75-0.97x; at 8 rows 0.36-0.58x, dequantise + cuBLAS
# 0.33-0.54x. Q4_K / Q6_K at 16 and 64 rows, fused GEMM against dequantise + cuBLAS: 28672x4096 and 4096x14336
# 0.36-0.47x against 0.32-0.39x (the GEMM ahead by 5-26%), 4096x4096 0.39-0.53x against 0.42-0.47x (within 15%
# either way); at 256 rows the GEMM is 1.5-2x slower. Q4_K and Q6_K have GEMM kernels of their own (quant_gemm.py):
# 0.48-0.66x at 16 rows, 0.45-0.58x at 64 and 0.38-0.55x at 128 on 4096x4096 to 28672x4096, ahead of dequantise +
# cuBLAS (0.31-0.51x, 0.35-0.46x at 128) on every shape, so they take the GEMM up to HALF_BLOCK_ROWS whatever the
# matrix's size; not beyond (at 256 rows 0.28-0.42x against 0.43-0.59x).
GEMV_DEFAULT_ROWS = 4
GEMM_DEFAULT_ROWS = 64
HALF_BLOCK_ROWS = 128
GEMM_MIN_WEIGHTS = 1 << 25
PATHS = ("dot", "gemv", "gemm", "dequantize")

__all__ = [
    "BLOCK_SIZE", "GEMM_DEFAULT_ROWS", "GEMM_MIN_WEIGHTS", "GEMV_DEFAULT_ROWS", "HALF_BLOCK_ROWS", "MAX_ROWS", "PATHS",
    "QTYPES", "TYPE_SIZE", "QuantGemmConfig", "QuantGemvConfig",
    "Int8Rows", "dequantize", "dequantize_reference", "dequantize_torch", "from_planes", "quantize_rows", "to_planes",
    "quant_embedding", "quant_embedding_reference",
    "linear_path", "quant_linear", "quant_linear_pair", "quant_linear_reference",
    "num_columns",
]


def num_columns(blocks: torch.Tensor, qtype: str) -> int:
    """Weights per row of blocks [rows, row_bytes] of `qtype` (either layout)."""
    return blocks.shape[1] // TYPE_SIZE[qtype] * BLOCK_SIZE[qtype]


def dequantize_reference(blocks: torch.Tensor, qtype: str, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """gguf.quants.dequantize of blocks [rows, row_bytes] -> [rows, cols] of out_dtype on blocks' device."""
    import gguf.quants
    from gguf import GGMLQuantizationType

    check_qtype(qtype)
    w = gguf.quants.dequantize(blocks.cpu().numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(w).to(device=blocks.device, dtype=out_dtype)


def quant_linear_reference(x: torch.Tensor, blocks: torch.Tensor, qtype: str,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) in float32 with W = dequantize_reference(blocks) [N, K], rounded to x's dtype."""
    w = dequantize_reference(blocks, qtype)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def quant_embedding_reference(ids: torch.Tensor, blocks: torch.Tensor, qtype: str,
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequantize_reference(blocks)[ids] -> [T, H] of out_dtype."""
    return dequantize_reference(blocks, qtype)[ids.long()].to(out_dtype)


def dequantize(blocks: torch.Tensor, qtype: str, out_dtype: torch.dtype = torch.bfloat16,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The weights of blocks, gguf.quants.dequantize's float32 values rounded to out_dtype.

    blocks: uint8 [rows, row_bytes] in the planes layout, contiguous, row_bytes a multiple of TYPE_SIZE[qtype];
    qtype: one of QTYPES; out_dtype: float32/float16/bfloat16. out: optional [rows, cols] tensor of out_dtype to
    write into (a reusable buffer). Returns [rows, cols = row_bytes / TYPE_SIZE * BLOCK_SIZE].
    """
    _check_blocks(blocks, qtype)
    check_float_dtype("out_dtype", out_dtype)
    shape = (blocks.shape[0], num_columns(blocks, qtype))
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=blocks.device)
    else:
        _check_out(out, *shape, out_dtype, blocks.device, blocks=blocks)
        check_devices(_dequantize_kernel, blocks=blocks, out=out)
    if _use_torch(blocks):
        return out.copy_(dequantize_torch(from_planes(blocks, qtype), qtype, out_dtype))
    launch_dequantize(blocks, qtype, out)
    return out


def quant_linear(x: torch.Tensor | Int8Rows, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None,
                 config: QuantGemvConfig | QuantGemmConfig | None = None, path: str | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias with W [N, K] held as GGML blocks, as F.linear on the dequantised weight.

    x: [M, K] float32/float16/bfloat16, unit stride along K; blocks: uint8 [N, K / BLOCK_SIZE * TYPE_SIZE]
    contiguous, a GGUF tensor's bytes in the planes layout (to_planes); qtype: one of QTYPES; bias: [N] of x's
    dtype or None. Returns a new [M, N] tensor of x's dtype. The path, by M, x's dtype and W's size (linear_path)
    unless `path` names one of PATHS:
    - "dot", by default for M <= GEMV_DEFAULT_ROWS (4) and 16-bit x, possible up to MAX_ROWS (8): x rounded to int8
      per 32 columns, integer dot products with the weights' codes (braid_kernels/quant_dot.py; `config`: a
      QuantGemvConfig);
    - "gemv", by default for M <= GEMV_DEFAULT_ROWS and float32 x, possible up to MAX_ROWS: the dequantising GEMV,
      float32 sums (`config`: a QuantGemvConfig);
    - "gemm", by default for GEMV_DEFAULT_ROWS < M <= GEMM_DEFAULT_ROWS (64), 16-bit x and N * K >=
      GEMM_MIN_WEIGHTS (Q4_K and Q6_K: up to HALF_BLOCK_ROWS (128) rows, any size): the fused dequantising GEMM on
      the tensor cores, the weights rounded to x's dtype in registers (`config`: a QuantGemmConfig);
    - "dequantize", otherwise: W dequantised to x's dtype into a buffer, then F.linear (cuBLAS).
    x may also be the Int8Rows of x [M, K] (int8_rows.py: from quantize_rows, or from the norm or activation kernel
    that produced x), for the "dot" path at up to MAX_ROWS rows: the int8 rounding "dot" would do, done already
    (once for several matrices, or inside the producing kernel). The output has the dtype the rows were made from.
    out: optional contiguous [M, N] tensor of that dtype on x's device that the result is written into and returned
    as (e.g. one part's columns of a one-row output, which are contiguous), instead of a new tensor.
    """
    _check_blocks(blocks, qtype)
    k = num_columns(blocks, qtype)
    if isinstance(x, Int8Rows):
        return _quant_linear_int8(x, blocks, qtype, bias, config, path, k, out)
    check_linear_inputs(_dequantize_kernel, x, k, blocks.shape[0], bias, "blocks", blocks,
                        f"{qtype} blocks of shape {tuple(blocks.shape)}")
    _check_out(out, x.shape[0], blocks.shape[0], x.dtype, x.device, x=x, bias=bias, blocks=blocks)
    path = path or linear_path(x.shape[0], x.dtype, blocks.shape[0] * k,
                               qtype if uses_half_block(qtype, blocks.shape[1], x.dtype) else None)
    if path not in PATHS or (path in ("dot", "gemv") and x.shape[0] > MAX_ROWS):
        raise ValueError(f"path must be one of {', '.join(PATHS)} (dot and gemv for at most {MAX_ROWS} rows), got "
                         f"{path!r} for {x.shape[0]} rows")
    if k == 0:  # a sum of nothing: the bias, or zeros
        return _into(F.linear(x, x.new_zeros((blocks.shape[0], 0)), bias), out)
    if _use_torch(blocks):
        return _into(F.linear(x, dequantize_torch(from_planes(blocks, qtype), qtype, x.dtype), bias), out)
    if path == "dequantize":
        # Tensor cores need the weights in x's dtype; a reusable buffer from the caching allocator holds them.
        return _into(F.linear(x, dequantize(blocks, qtype, x.dtype), bias), out)
    if out is None:
        out = torch.empty((x.shape[0], blocks.shape[0]), dtype=x.dtype, device=x.device)
    if path == "dot":
        _launch_dot(x, blocks, qtype, bias, out, config, k)
    else:
        launch = launch_gemv if path == "gemv" else launch_gemm
        launch(x, blocks, qtype, bias, out, config=config)
    return out


def quant_linear_pair(x: Int8Rows, a: torch.Tensor, a_qtype: str, b: torch.Tensor, b_qtype: str,
                      out: torch.Tensor) -> bool:
    """quant_linear of one x with two matrices into out [1, Na + Nb] (A's products in its first Na columns, B's in
    the rest) as one launch, where quant_linear's default path would stream the rows of each (one row of x as its
    int8 rows, on CUDA: quant_stream.uses_stream), e.g. a layer's q/k rows in Q4_K beside its v rows in Q6_K. Returns
    whether it did; where not, nothing is launched (the caller runs quant_linear on each)."""
    if not isinstance(x, Int8Rows) or _use_torch(a):
        return False
    for name, blocks, qtype in (("a", a, a_qtype), ("b", b, b_qtype)):
        try:
            _check_blocks(blocks, qtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if not (uses_stream(x.shape[0], a_qtype, a, None) and uses_stream(x.shape[0], b_qtype, b, None)):
        return False
    for name, blocks, qtype in (("a", a, a_qtype), ("b", b, b_qtype)):
        if num_columns(blocks, qtype) != x.shape[1]:
            raise ValueError(f"{name} has {num_columns(blocks, qtype)} columns, x {x.shape[1]}")
    check_int8_rows("x", x, 1, x.shape[1])
    check_devices(_dequantize_kernel, **{"x.q": x.q, "x.dx": x.dx, "x.sx": x.sx, "a": a, "b": b})
    _check_out(out, 1, a.shape[0] + b.shape[0], x.dtype, x.q.device, **{"x.q": x.q, "x.dx": x.dx, "x.sx": x.sx},
               a=a, b=b)
    launch_stream_gemv_pair(x, a, a_qtype, b, b_qtype, out, _num_sms(x.device))
    return True


def _check_out(out: torch.Tensor | None, num_rows: int, n: int, dtype: torch.dtype, device: torch.device,
               **inputs: torch.Tensor | None) -> None:
    """An `out` argument (quant_linear's, dequantize's): None, or a contiguous [num_rows, n] tensor of dtype on device
    sharing no memory with `inputs` (the kernels read those while writing out); ValueError otherwise."""
    if out is None:
        return
    check_tensor("out", out, (dtype,), ndim=2)
    check_shape("out", out, (num_rows, n))
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if out.device != device:
        raise ValueError(f"out must be on {device}, got {out.device}")
    for name, t in inputs.items():
        if t is not None and _overlap(out, t):
            raise ValueError(f"out must not overlap {name}")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte spans of a and b (first to last element, whatever the strides) intersect."""
    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _into(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """y, or y copied into out (quant_linear's paths that compute a new tensor)."""
    return y if out is None else out.copy_(y)


def _quant_linear_int8(x: Int8Rows, blocks, qtype, bias, config, path, k, out) -> torch.Tensor:
    """quant_linear of x's Int8Rows: the dot path only."""
    if path not in (None, "dot") or x.shape[0] > MAX_ROWS:
        raise ValueError(f"x given as int8 rows takes the dot path, at most {MAX_ROWS} rows; got path {path!r} for "
                         f"{x.shape[0]} rows")
    check_tensor("x.q", x.q, (torch.int8,), ndim=2)
    m = x.q.shape[0]
    check_int8_rows("x", x, m, k)
    tensors = {"x.q": x.q, "x.dx": x.dx, "x.sx": x.sx, "blocks": blocks}
    if bias is not None:
        check_tensor("bias", bias, (x.dtype,), ndim=1)
        check_shape("bias", bias, (blocks.shape[0],))
        tensors["bias"] = bias
    check_devices(_dequantize_kernel, **tensors)
    _check_out(out, m, blocks.shape[0], x.dtype, x.q.device, **{"x.q": x.q, "x.dx": x.dx, "x.sx": x.sx},
               bias=bias, blocks=blocks)
    if _use_torch(blocks):
        return _into(F.linear(x.dequantize().to(x.dtype), dequantize_torch(from_planes(blocks, qtype), qtype,
                                                                            x.dtype), bias), out)
    if out is None:
        out = torch.empty((m, blocks.shape[0]), dtype=x.dtype, device=x.device)
    _launch_dot(x, blocks, qtype, bias, out, config, k)
    return out


def _launch_dot(x: torch.Tensor | Int8Rows, blocks, qtype, bias, out, config, k) -> None:
    """The integer-dot GEMV into out, at `config` or the default for this device and shape: one row of x times Q4_K
    or Q6_K blocks of the measured shapes, without a bias, streams rows through persistent programs
    (quant_stream.uses_stream), anything else takes quant_dot's launch."""
    num_sms = _num_sms(x.device)
    if config is None and uses_stream(x.shape[0], qtype, blocks, bias):
        launch_stream_gemv(x if isinstance(x, Int8Rows) else quantize_rows(x), blocks, qtype, out, num_sms)
        return
    launch_dot_gemv(x, blocks, qtype, bias, out, config or dot_launch_config(qtype, x.shape[0], blocks.shape[0],
                                                                             num_sms, k))


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the launch shapes scale with them); 1 elsewhere."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def linear_path(num_rows: int, dtype: torch.dtype = torch.bfloat16, num_weights: int = 0,
                qtype: str | None = None) -> str:
    """quant_linear's default path for x of num_rows rows of dtype times a matrix of num_weights (N * K) weights of
    qtype: "dot", "gemv", "gemm" or "dequantize" (see quant_linear, GEMV_DEFAULT_ROWS and GEMM_DEFAULT_ROWS; Q4_K and
    Q6_K, whose GEMM kernels beat dequantise + cuBLAS on every shape measured up to 128 rows, take the GEMM up to
    HALF_BLOCK_ROWS rows whatever the matrix's size; quant_linear passes qtype None for a Q6_K matrix whose rows the
    half-block kernel cannot read, quant_gemm.uses_half_block)."""
    if num_rows <= GEMV_DEFAULT_ROWS:
        return "gemv" if dtype == torch.float32 else "dot"
    if dtype != torch.float32 and qtype in HALF_BLOCK_TYPES:
        return "gemm" if num_rows <= HALF_BLOCK_ROWS else "dequantize"
    if num_rows <= GEMM_DEFAULT_ROWS and dtype != torch.float32 and num_weights >= GEMM_MIN_WEIGHTS:
        return "gemm"
    return "dequantize"


def quant_embedding(ids: torch.Tensor, blocks: torch.Tensor, qtype: str,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows ids of the table W [V, H] held as GGML blocks, dequantising only those rows.

    ids: int32/int64 [T], each in [0, V) (not checked on the device: that would synchronise; an id out of range
    leaves its output row unwritten); blocks: uint8 [V, H / BLOCK_SIZE * TYPE_SIZE] contiguous, planes layout;
    out_dtype: float32/float16/bfloat16. Returns a new [T, H] tensor of out_dtype, gguf's float32 values rounded to it.
    """
    _check_blocks(blocks, qtype)
    check_float_dtype("out_dtype", out_dtype)
    check_tensor("ids", ids, INDEX_DTYPES, ndim=1)
    check_devices(_dequantize_kernel, ids=ids, blocks=blocks)
    if _use_torch(blocks):
        return dequantize_torch(from_planes(blocks[ids.long()], qtype), qtype, out_dtype)
    out = torch.empty((ids.shape[0], num_columns(blocks, qtype)), dtype=out_dtype, device=blocks.device)
    launch_dequantize(blocks, qtype, out, ids=ids.contiguous())
    return out


def _use_torch(blocks: torch.Tensor) -> bool:
    """CPU tensors without Triton's interpreter take the PyTorch decoder."""
    return not blocks.is_cuda and not is_interpreted(_dequantize_kernel)


def _check_blocks(blocks, qtype) -> None:
    check_qtype(qtype)
    check_tensor("blocks", blocks, (torch.uint8,), ndim=2)
    if blocks.shape[1] % TYPE_SIZE[qtype]:
        raise ValueError(f"blocks must have a multiple of {TYPE_SIZE[qtype]} bytes per row for {qtype} "
                         f"({BLOCK_SIZE[qtype]} weights per block), got shape {tuple(blocks.shape)}")
    if not blocks.is_contiguous():
        raise ValueError(f"blocks must be contiguous, got strides {blocks.stride()}")
    if blocks.data_ptr() % 4:  # the kernels load fp16 fields and 32-bit words of the planes in place
        raise ValueError("blocks must start at a 4-byte aligned address (a fresh tensor, or a view at an offset of a "
                         f"multiple of 4 bytes), got an offset of {blocks.data_ptr() % 4} bytes past one")

