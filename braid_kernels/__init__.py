"""Fused Triton kernels for Braid's decoder, each beside the plain-PyTorch reference whose rounding it reproduces.

Standalone: nothing here imports braidinfer. The kernels need CUDA tensors, or TRITON_INTERPRET=1 set before this
package is imported to run them on the CPU (slowly; that is how CI tests them).
"""
from .decode_attention import DecodeWorkspace, decode_attention, decode_attention_ref
from .gemv import (
    fused_add_rms_norm_gemv,
    fused_add_rms_norm_gemv_ref,
    gemv,
    gemv_ref,
    rms_norm_gemv,
    rms_norm_gemv_ref,
    silu_and_mul_gemv,
    silu_and_mul_gemv_ref,
)
from .qk_norm_rope import qk_norm_rope_write_kv, qk_norm_rope_write_kv_ref
from .int8_rows import Int8Rows, empty_int8_rows, quantize_rows, quantize_rows_ref
from .rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_int8, rms_norm_ref
from .silu_mul import silu_and_mul, silu_and_mul_int8, silu_and_mul_ref

__all__ = [
    "DecodeWorkspace", "decode_attention", "decode_attention_ref",
    "Int8Rows", "empty_int8_rows", "quantize_rows", "quantize_rows_ref", "rms_norm_int8", "silu_and_mul_int8",
    "fused_add_rms_norm", "fused_add_rms_norm_ref",
    "fused_add_rms_norm_gemv", "fused_add_rms_norm_gemv_ref",
    "gemv", "gemv_ref",
    "qk_norm_rope_write_kv", "qk_norm_rope_write_kv_ref",
    "rms_norm", "rms_norm_ref",
    "rms_norm_gemv", "rms_norm_gemv_ref",
    "silu_and_mul", "silu_and_mul_ref",
    "silu_and_mul_gemv", "silu_and_mul_gemv_ref",
]
