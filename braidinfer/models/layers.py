"""Building blocks shared by the model files: RMSNorm and the rotary embedding.

Numerics follow the Hugging Face implementations operation by operation (where each cast happens matters in bf16).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from braidinfer.errors import UnsupportedModelError


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)), computed in float32 and cast back before the weight multiply, as transformers does.

    With `residual`, first adds it (h = x + residual, in the model dtype) and returns (norm(h), h). `fused` selects
    the Triton kernels of `kernels/` (CUDA only), which reproduce these rounding points.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            import kernels

            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        h = x + residual
        return self._norm(h), h

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with Llama 3 / linear scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Same arithmetic as transformers' _compute_llama3_parameters, so positions rotate identically.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Cos/sin tables for rotating q and k by absolute position (HF's half-split "rotate_half" convention).

    The tables are float32 and built lazily per device; they are not module buffers, so casting the model to bf16
    leaves them in float32, as transformers keeps inv_freq.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int):
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.max_positions = max_positions
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [max_positions, head_dim] float32 on `device` (row p rotates position p)."""
        if device not in self._tables:
            freqs = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, hd)
            self._tables[device] = (emb.cos().to(device), emb.sin().to(device))
        return self._tables[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> cos, sin: [T, 1, head_dim] in dtype (computed in float32, then cast)."""
        cos, sin = self.tables(positions.device)
        return cos[positions][:, None, :].to(dtype), sin[positions][:, None, :].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim] -> x rotated by its positions."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
