"""Llama 3 rope scaling recovered from the `rope_freqs` tensor that llama.cpp stores in place of the parameters.

llama.cpp's converter turns `rope_scaling = {"rope_type": "llama3", ...}` into one divisor per rotary frequency
(1 for high frequencies, `factor` for low ones, a smooth blend between) and writes no scaling metadata. The blend is
linear in 1 / wavelength, so two or more blended frequencies pin it down. Only the wavelength thresholds
`original_max_position_embeddings / {low,high}_freq_factor` matter, so the original length is fixed at llama.cpp's
own default and the two factors are solved for.
"""
from __future__ import annotations

import math

import numpy as np

from braidinfer.errors import UnsupportedModelError

_ORIGINAL_CONTEXT = 8192  # llama.cpp's converter assumes this when the HF config does not say
_RTOL = 1e-4


def llama3_rope_scaling(rope_freqs: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """The HF `rope_scaling` dict whose llama3 frequencies equal `base / rope_freqs`; None if nothing is scaled."""
    divisors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != wavelen.shape:
        raise UnsupportedModelError(f"rope_freqs has {divisors.size} entries, expected head_dim / 2 = {wavelen.size}")
    if np.allclose(divisors, 1.0, rtol=_RTOL):
        return None
    factor = float(divisors.max())
    blended = (divisors > 1 + _RTOL) & (divisors < factor * (1 - _RTOL))
    if blended.sum() < 2:
        raise UnsupportedModelError("cannot recover Llama 3 rope scaling from rope_freqs: too few blended frequencies")
    smooth = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[blended], smooth, 1)  # smooth = (old / wavelen - low) / (high - low)
    scaling = {
        "rope_type": "llama3",
        "factor": _tidy(factor),
        "low_freq_factor": _tidy(-intercept * _ORIGINAL_CONTEXT / slope),
        "high_freq_factor": _tidy((1 - intercept) * _ORIGINAL_CONTEXT / slope),
        "original_max_position_embeddings": _ORIGINAL_CONTEXT,
    }
    if not np.allclose(llama3_divisors(scaling, wavelen), divisors, rtol=10 * _RTOL):
        raise UnsupportedModelError("rope_freqs does not follow Llama 3 rope scaling; this GGUF is not supported")
    return scaling


def llama3_divisors(scaling: dict, wavelen: np.ndarray) -> np.ndarray:
    """llama.cpp's per-frequency divisors for a llama3 `rope_scaling` dict (its converter's arithmetic)."""
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended))


def _tidy(x: float) -> float:
    # The divisors are stored in float32; six significant digits gives back the round numbers of the HF config.
    return float(f"{x:.6g}")
