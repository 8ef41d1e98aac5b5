"""Matrix-vector products for decode steps of a few rows, with the elementwise step before each of a decoder layer's
projections folded into the kernel: y = prologue(x) @ weight.T (+ bias).

At batch 1 a projection reads its whole weight to produce one row, so it is bound by memory bandwidth, and cuBLAS'
GEMM kernels (tiled for many rows, some with a separate split-K reduction) leave much of it unused. Here each program
reads BLOCK_N rows of the weight once for all M <= MAX_ROWS rows of x, accumulating in float32. The prologue is what
the model does to x just before the projection, recomputed by every program (it reads only K values per row):

    none                 o_proj:       y = x @ W.T
    rms_norm             qkv_proj of the first layer: y = RMSNorm(x) @ W.T
    fused_add_rms_norm   qkv_proj, gate_up_proj: h = residual + x; y = RMSNorm(h) @ W.T; h is returned too
    silu_and_mul         down_proj:    y = (silu(gate) * up) @ W.T, x = [gate | up]

The prologue rounds where kernels.rmsnorm and kernels.silu_mul (and so the model) round, so its output is the
references' bit for bit (up to the order of the norm's sum of squares, as in kernels.rmsnorm); the product differs
from F.linear only in the order of the float32 accumulation. On an H100 it beats cuBLAS at one row on every
projection of Qwen3-0.6B and SmolLM2-135M; at 2-8 rows it is right but slower than cuBLAS for wide N (see
launch_config), so the model uses it for one row.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES,
    check_devices,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from .numerics import exp, launch_options, round_to_dtype, wait_for_inputs
from .rmsnorm import fused_add_rms_norm_ref, rms_norm_ref, rms_scale
from .silu_mul import silu_and_mul_ref

MAX_ROWS = 8  # rows of x per launch; every program holds BLOCK_M x BLOCK_N x BLOCK_K float32 partial sums
# The prologue applied to x (constexpr globals, so that the kernel can compare with them).
NONE, RMS_NORM, ADD_RMS_NORM, SILU_AND_MUL = (tl.constexpr(i) for i in range(4))


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N]: nn.Linear."""
    return F.linear(x, weight, bias)


def rms_norm_gemv_ref(x, norm_weight, eps, weight, bias=None) -> torch.Tensor:
    """RMSNorm of x [M, K] (norm_weight [K]), then gemv_ref with weight [N, K] -> [M, N]."""
    return F.linear(rms_norm_ref(x, norm_weight, eps), weight, bias)


def fused_add_rms_norm_gemv_ref(x, residual, norm_weight, eps, weight, bias=None):
    """h = residual + x ([M, K] each), RMSNorm of h, then gemv_ref with weight [N, K] -> ([M, N], h)."""
    normed, h = fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), h


def silu_and_mul_gemv_ref(x, weight, bias=None) -> torch.Tensor:
    """silu(gate) * up of x [M, 2K] (gate first), then gemv_ref with weight [N, K] -> [M, N]."""
    return F.linear(silu_and_mul_ref(x), weight, bias)


class GemvConfig(NamedTuple):
    """A launch configuration: weight rows per program, columns per loop step, warps, software-pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def launch_config(num_rows: int, n: int, k: int, num_sms: int) -> GemvConfig:
    """The configuration for x [num_rows, k] @ W[n, k].T on a device of `num_sms` multiprocessors.

    Chosen with benchmarks/gemv.py on an H100 (132 SMs), microseconds per launch inside a CUDA graph with the
    weights streamed from HBM, one row, cuBLAS' F.linear in brackets (benchmarks/RESULTS.md has the tables):
    qkv 4096x1024 (4, 1024, 8, 1) 5.19 [5.27]; o 1024x2048 (2, 1024, 4, 1) 3.38, (4, 1024, 8, 1) 3.53 [5.75];
    gate_up 6144x1024 (8, 1024, 8, 1) 6.66, (4, 1024, 8, 1) 6.87 [7.07]; down 1024x3072 (4, 1024, 8, 1) 5.10
    [7.59]. Blocks of 1024 columns loaded into registers (num_stages 1) beat the best software-pipelined
    configuration (tl.range num_stages 2-4, through shared memory) by 6-23%; 4 weight rows per program with 8
    warps was best or within 5% everywhere, except that above ~8 programs per SM (gate_up) 8 rows were better. At
    2-8 rows, 4 weight rows and 1024 / rows columns with 4 warps were best of the few tried, but slower than cuBLAS
    for wide N (e.g. qkv at 2 rows 8.35
    against 5.63 us): each weight element then feeds several rows of a 3-d register tile.
    """
    block_m = triton.next_power_of_2(num_rows)
    block_k = min(triton.next_power_of_2(k), 1024 // block_m)
    if block_m > 1:
        return GemvConfig(4, max(64, block_k), num_warps=4, num_stages=1)
    block_n = 4
    if triton.cdiv(n, block_n) > 8 * num_sms:
        block_n = 8
    return GemvConfig(block_n, block_k, num_warps=8, num_stages=1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear.

    x: [M, K], 1 <= M <= MAX_ROWS (0 gives an empty result), float32/float16/bfloat16, unit stride along K;
    weight: [N, K] contiguous (an nn.Linear weight), bias: [N] or None, both x's dtype. config: the launch
    configuration (default: launch_config's). Returns a new [M, N] tensor of x's dtype.
    """
    _check(x, weight, bias)
    return _launch(NONE, x, weight, bias, config=config)[0]


def rms_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """RMSNorm(x) @ weight.T + bias, the norm rounding as kernels.rms_norm_ref.

    x: [M, K]; norm_weight: [K]; eps: added to the mean square; weight, bias, config as for `gemv`.
    Returns a new [M, N] tensor of x's dtype.
    """
    _check(x, weight, bias, norm_weight=norm_weight, eps=eps)
    return _launch(RMS_NORM, x, weight, bias, norm_weight=norm_weight, eps=eps, config=config)[0]


def fused_add_rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            weight: torch.Tensor, bias: torch.Tensor | None = None,
                            config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + x; RMSNorm(h) @ weight.T + bias, rounding as kernels.fused_add_rms_norm_ref.

    x (a sublayer's output) and residual (the stream): [M, K], same dtype; the rest as for `rms_norm_gemv`.
    Returns (y [M, N], h [M, K]), new tensors: x and residual are left intact.
    """
    _check(x, weight, bias, norm_weight=norm_weight, eps=eps, residual=residual)
    return _launch(ADD_RMS_NORM, x, weight, bias, residual=residual, norm_weight=norm_weight, eps=eps, config=config)


def silu_and_mul_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      config: GemvConfig | None = None) -> torch.Tensor:
    """(silu(gate) * up) @ weight.T + bias with x = [gate | up], rounding as kernels.silu_and_mul_ref.

    x: [M, 2 * K] (the gate_up projection's output); weight: [N, K]; bias, config as for `gemv`.
    Returns a new [M, N] tensor of x's dtype.
    """
    _check(x, weight, bias, gate_up=True)
    return _launch(SILU_AND_MUL, x, weight, bias, config=config)[0]


def _check(x, weight, bias, norm_weight=None, eps=0.0, residual=None, gate_up=False) -> None:
    """x [M, K] (M <= MAX_ROWS; [M, 2K] with gate_up), weight [N, K], and the optional tensors, all of one dtype
    and device."""
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    k = weight.shape[1] * (2 if gate_up else 1)
    if x.shape[1] != k:
        raise ValueError(f"x must have {k} columns for a weight of shape {tuple(weight.shape)}, got "
                         f"{tuple(x.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"x may have at most {MAX_ROWS} rows (a GEMV), got {x.shape[0]}; use F.linear")
    check_last_dim_contiguous("x", x)
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous (an nn.Linear weight), got strides {weight.stride()}")
    if weight.numel() >= 2**31:  # the kernel's weight offsets are 32-bit
        raise ValueError(f"weight has {weight.numel()} elements, more than a GEMV kernel indexes (2**31 - 1); "
                         "use F.linear")
    tensors = {"x": x, "weight": weight}
    optional = {"bias": (bias, (weight.shape[0],)), "norm_weight": (norm_weight, (weight.shape[1],)),
                "residual": (residual, tuple(x.shape))}
    for name, (t, shape) in optional.items():
        if t is not None:
            check_tensor(name, t, FLOAT_DTYPES)
            check_shape(name, t, shape)
            tensors[name] = t
    if residual is not None:
        check_last_dim_contiguous("residual", residual)
    check_same_dtype(**tensors)
    check_devices(_gemv_kernel, **tensors)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _launch(prologue, x, weight, bias, residual=None, norm_weight=None, eps=0.0, config=None):
    """-> (y [M, N], h [M, K] or None)."""
    (num_rows, _), (n, k) = x.shape, weight.shape
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    h = torch.empty((num_rows, k), dtype=x.dtype, device=x.device) if prologue == ADD_RMS_NORM else None
    if num_rows == 0 or n == 0:
        return out, h
    if config is None:
        num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        config = launch_config(num_rows, n, k, num_sms)
    block_m = triton.next_power_of_2(num_rows)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, residual, norm_weight, weight, bias, out, h,
        num_rows, n, x.stride(0), residual.stride(0) if residual is not None else 0, float(eps),
        K=k, PROLOGUE=prologue.value, HAS_BIAS=bias is not None, MEAN_BY_RECIPROCAL=x.is_cuda,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=min(config.block_k, triton.next_power_of_2(k)),
        NORM_BLOCK_K=min(triton.next_power_of_2(k), max(64, 4096 // block_m)), NUM_STAGES=config.num_stages,
        num_warps=config.num_warps, **launch_options(x),
    )
    return out, h


@triton.jit
def _gemv_kernel(
    x_ptr, residual_ptr, norm_weight_ptr, weight_ptr, bias_ptr, out_ptr, h_ptr,
    M, N, x_row_stride, residual_row_stride,  # out and h are contiguous, weight [N, K] too
    eps,
    K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, MEAN_BY_RECIPROCAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program n: out[:, n * BLOCK_N : (n + 1) * BLOCK_N] for all M rows, reading its BLOCK_N weight rows once.
    Tensors are 3-d, (row of x, row of weight, k), so that one product broadcasts x over weight rows."""
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)[:, None, None]  # (BM, 1, 1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]  # (1, BN, 1)
    row_ok, col_ok = rows < M, cols < N
    dtype: tl.constexpr = out_ptr.dtype.element_ty

    scale = tl.zeros([BLOCK_M, 1, 1], tl.float32)
    if PROLOGUE == RMS_NORM or PROLOGUE == ADD_RMS_NORM:
        sum_sq = tl.zeros([BLOCK_M, 1, NORM_BLOCK_K], tl.float32)
        for k0 in range(0, K, NORM_BLOCK_K):
            norm_ks = k0 + tl.arange(0, NORM_BLOCK_K)[None, None, :]
            x = _residual_sum(x_ptr, residual_ptr, rows, norm_ks, row_ok & (norm_ks < K), x_row_stride,
                              residual_row_stride, PROLOGUE == ADD_RMS_NORM, dtype)
            sum_sq += x * x
        scale = rms_scale(tl.sum(sum_sq, axis=2, keep_dims=True), K, eps, MEAN_BY_RECIPROCAL)

    h_rows = tl.where(pid == 0, M, 0)  # rows of h this program writes
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)[None, None, :]
        # x's block before the weight's: then Triton computes in the layout the weight block is loaded in and
        # moves x's small block to it; the other order moved the weight block through shared memory every step
        # (seen in the compiled TTGIR for sm_90).
        a = _prologue(x_ptr, residual_ptr, norm_weight_ptr, h_ptr, rows, ks, row_ok & (ks < K), h_rows,
                      x_row_stride, residual_row_stride, scale, K, PROLOGUE, dtype)
        w = tl.load(weight_ptr + cols * K + ks, mask=col_ok & (ks < K), other=0.0)
        acc = tl.math.fma(w.to(tl.float32), a, acc)

    y = tl.sum(acc, axis=2, keep_dims=True)  # (BM, BN, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * N + cols, round_to_dtype(y, dtype).to(dtype), mask=row_ok & col_ok)


@triton.jit
def _residual_sum(x_ptr, residual_ptr, rows, ks, mask, x_row_stride, residual_row_stride,
                  ADD_RESIDUAL: tl.constexpr, dtype: tl.constexpr):
    """x[rows, ks] (+ residual[rows, ks], rounded to dtype) in float32."""
    x = tl.load(x_ptr + rows * x_row_stride + ks, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + rows * residual_row_stride + ks, mask=mask, other=0.0).to(tl.float32)
        x = round_to_dtype(residual + x, dtype)
    return x


@triton.jit
def _prologue(x_ptr, residual_ptr, norm_weight_ptr, h_ptr, rows, ks, mask, h_rows, x_row_stride,
              residual_row_stride, scale, K: tl.constexpr, PROLOGUE: tl.constexpr, dtype: tl.constexpr):
    """The GEMV's input at columns ks of rows: (BM, 1, BK) float32 holding dtype values. With the residual add, the
    first h_rows rows of h are stored too: all M by program 0, none by the others (no program reads h)."""
    if PROLOGUE == SILU_AND_MUL:  # x = [gate | up], K columns each
        gate = tl.load(x_ptr + rows * x_row_stride + ks, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + rows * x_row_stride + K + ks, mask=mask, other=0.0).to(tl.float32)
        silu = round_to_dtype(tl.math.div_rn(gate, 1.0 + exp(-gate)), dtype)
        a = round_to_dtype(silu * up, dtype)
    else:
        a = _residual_sum(x_ptr, residual_ptr, rows, ks, mask, x_row_stride, residual_row_stride,
                          PROLOGUE == ADD_RMS_NORM, dtype)
        if PROLOGUE == ADD_RMS_NORM:
            tl.store(h_ptr + rows * K + ks, a.to(dtype), mask=mask & (rows < h_rows))
        if PROLOGUE == RMS_NORM or PROLOGUE == ADD_RMS_NORM:
            a = round_to_dtype(a * scale, dtype)  # rounded before the weight multiply, as the model does
            norm_weight = tl.load(norm_weight_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            a = round_to_dtype(norm_weight * a, dtype)
    return a
