"""Rotary position embedding (RoPE): the tables, their scaling (linear, Llama 3), and the rotation of q and k.

Numerics follow transformers: float32 tables, each row cast to the model dtype before the rotation (where each cast
happens matters in bf16).
"""
from __future__ import annotations

import math

import torch

from braidinfer.errors import UnsupportedModelError


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
    leaves them in float32, as transformers keeps inv_freq. The tables cover len(inv_freq) * 2 dims: a partial rotary
    embedding (rotary_dim < head_dim) rotates only the leading dims of each head.
    """

    attention_factor = 1.0
    """Multiplies cos and sin in float32 (LongRoPE's attention scaling, where transformers applies it too)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int):
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.max_positions = max_positions
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [max_positions, head_dim] float32 on `device` (row p rotates position p)."""
        if device not in self._tables:
            freqs = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, hd)
            cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
            self._tables[device] = (cos.to(device), sin.to(device))
        return self._tables[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> cos, sin: [T, 1, head_dim] in dtype (computed in float32, then cast)."""
        cos, sin = self.tables(positions.device)
        return cos[positions][:, None, :].to(dtype), sin[positions][:, None, :].to(dtype)

    def at(self, positions: torch.Tensor) -> Rotation:
        """The rotation of one step's tokens, shared by every layer."""
        return Rotation(self, positions)

    def shift_keys(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotary-embedded keys [..., kv_heads, head_dim] moved `delta` positions later (RoPE is a rotation per
        frequency, so rotating by delta composes with the rotation already applied); computed in float32. Only the
        leading rotary dims turn, and without the attention factor: the key was scaled once when first rotated."""
        freqs = delta * self.inv_freq  # float32, as a table row
        emb = torch.cat((freqs, freqs)).to(k.device)  # (rotary_dim,)
        rotary_dim = emb.numel()
        rotated = apply_rotary(k[..., :rotary_dim].float(), emb.cos(), emb.sin())
        return torch.cat((rotated, k[..., rotary_dim:].float()), dim=-1).to(k.dtype)


class Rotation:
    """One step's positions with their rotary tables. The PyTorch path reads `cos_sin(dtype)`, computed once per step
    on first use; the fused attention kernel indexes the float32 `tables` itself, so it never computes them."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor):
        self.rotary, self.positions = rotary, positions
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cos_sin: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [max_positions, head_dim] float32 on the positions' device."""
        if self._tables is None:
            self._tables = self.rotary.tables(self.positions.device)
        return self._tables

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, head_dim] in dtype for the step's positions."""
        if dtype not in self._cos_sin:
            self._cos_sin[dtype] = self.rotary.cos_sin(self.positions, dtype)
        return self._cos_sin[dtype]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim] -> x rotated by its positions."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
