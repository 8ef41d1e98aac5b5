"""Device functions that make Triton round where PyTorch eager rounds, on the GPU and under TRITON_INTERPRET=1.

A model in bf16 rounds every intermediate tensor to bf16; a fused kernel keeps values in float32 registers and must
round them at the same points, with the same rounding, to give bit-identical results. Three things get in the way:

- Triton's interpreter (3.9) casts float32 to bfloat16 by truncating the mantissa, not to nearest-even as torch
  and the GPU do, so `round_to_dtype` rounds bf16 with integer arithmetic, identically on both.
- `tl.exp` is an approximate exp2-based instruction on NVIDIA GPUs and Triton's `/` is `div.full.f32` (2 ulp);
  torch calls expf and divides exactly, so kernels use `exp` below and `tl.math.div_rn`.
- LLVM contracts a * b + c into one fused multiply-add, which rounds once where torch rounds twice; launches pass
  `launch_options` to turn that off.

It also holds what every kernel of the package shares about its launch: programmatic dependent launch (`pdl_options`).

Checked on an H100 (torch 2.11, Triton 3.6): libdevice exp with div_rn gives torch's float32 silu bit for bit
(tl.exp or `/` do not); tl.math.rsqrt is torch's rsqrt; with fp fusion on, a * b + c differs from torch in ~25%.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction



@triton.jit
def round_to_dtype(x, dtype: tl.constexpr):
    """float32 `x` rounded to the nearest `dtype` value (ties to even) and returned as float32: torch's
    `x.to(dtype).float()`. Storing the result to a `dtype` pointer is then exact."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # round half to even at bit 16
        rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded)  # a NaN stays NaN
    else:
        return x.to(dtype).to(tl.float32)


INTERPRETED = tl.constexpr(isinstance(round_to_dtype, InterpretedFunction))


@triton.jit
def exp(x):
    """float32 e**x as CUDA's expf computes it (libdevice), which is what torch calls; numpy's exp when interpreted,
    since the interpreter has no libdevice."""
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


def is_interpreted(kernel) -> bool:
    """Whether `kernel` was decorated under TRITON_INTERPRET=1 (then it runs on CPU tensors, not CUDA ones)."""
    return isinstance(kernel, InterpretedFunction)


try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # an older Triton: no programmatic dependent launch
    gdc_launch_dependents = gdc_wait = None
    _HAS_GDC = False


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch needs sm_90+ (griddepcontrol) and Triton's gdc_wait."""
    return _HAS_GDC and torch.cuda.get_device_capability(device_index)[0] >= 9


# Programmatic dependent launch (PDL, Hopper+): a kernel of the package launched with `pdl_options` is scheduled as
# soon as the kernel before it in the stream ends, without the full serialisation of two dependent launches (a CUDA
# graph's too), and waits in `wait_for_inputs` until that kernel's writes are visible. Batch-1 decode runs ~10 short
# kernels per layer, so the gaps matter: Llama-3.1-8B shape on an H200, Q4_K_M 365 -> 389 tok/s, Q8_0 345 -> 367,
# bf16 199 -> 200 (benchmarks/RESULTS.md). Only some kernels trigger their dependents early (release_dependents,
# which says which and when): with that trigger at every kernel's start Q4_K_M fell to 328 tok/s (presumably the
# waiting dependents held SM slots the running kernel needed). Every kernel launched with these options takes the PDL
# constexpr and calls wait_for_inputs(PDL) before its first load or store, except the loads of inputs no kernel of
# a step writes (weights, rotary tables; page tables, positions and KV slots copied from the host) and L2 prefetch
# hints, in the kernels that
# tests/kernels/test_numerics.py lists (it checks the package): the wait is also what orders it after everything
# earlier in the stream. Decided per device at the first launch on it, so importing the package does not
# initialise CUDA.
def pdl_options(t: torch.Tensor) -> dict:
    """Launch keyword arguments of a kernel of the package on t's device: PDL (the kernel's constexpr) and Triton's
    launch_pdl where the device supports it."""
    if t.is_cuda and _pdl_supported(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def launch_options(t: torch.Tensor) -> dict:
    """pdl_options, plus no mul+add contraction: for the kernels whose float arithmetic reproduces torch's."""
    return {"enable_fp_fusion": False, **pdl_options(t)}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under programmatic dependent launch (PDL): wait for the previous kernel in the stream to finish, its writes
    visible. Call in every kernel launched with pdl_options / launch_options before anything the kernels ahead may
    write is read (see the comment above pdl_options for what may come first); nothing without PDL."""
    if PDL:
        gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Under PDL: let the next kernel in the stream be scheduled now (griddepcontrol.launch_dependents) rather than
    when this one ends; nothing without PDL. The dependent is scheduled once every program has released (or ended)
    and still waits for this kernel's end and writes in its wait_for_inputs. Called:
    - right after wait_for_inputs by the short kernels that a decode step runs just before an integer-dot GEMV
      (norms and SiLU-and-mul where they write int8 rows, x's int8 rounding), whose few programs leave most SMs free
      while the GEMV (quant_stream.py) loads its first weight rows, which no kernel writes, before waiting for its x.
      Not where they write a tensor (quantised steps of more rows, whose dependent is a GEMM or the dequantising
      kernel; bf16 models' steps of 2-8 rows, before a bf16 GEMV): the release there was never measured to gain,
      and while it was in every launch Q8_0 decode at batch 64 ran ~20% slower (on an H100, 3,494-3,572 tok/s with
      it, 4,282-4,365 without; benchmarks/RESULTS.md, "The decode attention's merge on a GPU");
    - right after wait_for_inputs by the QK-norm / RoPE kernel (the attention after it reads its host-copied page
      tables meanwhile) and by the decode attention (o_proj's GEMV after it).
    Not by the GEMVs: a dependent made resident early by a large kernel only holds SM slots it needs (Q4_K_M decode
    fell from 389 to 328 tok/s when every kernel released its dependents at its start, and from 429 to 385 when each
    stream GEMV program released them as it started on its last row; benchmarks/RESULTS.md)."""
    if PDL:
        gdc_launch_dependents()
