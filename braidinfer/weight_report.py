"""What a loaded model's weights occupy and how they are held: the engine's load summary and LLM.memory_stats."""
from __future__ import annotations

import re

from torch import nn

NAMES_SHOWN = 3
"""Tensor names the load summary shows for each reason some were dequantised (a Q3_K_M file can have hundreds)."""


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, each storage counted once (a tied lm_head shares the
    embedding's)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def load_summary(model: nn.Module, quantized_names: dict[str, str], dequantized: dict[str, str],
                 form: str = "blocks") -> list[str]:
    """Lines for the log: weight bytes, tensors kept quantised by qtype and how the projections hold them (`form`,
    see QuantLinear.finalize), and the quantised tensors dequantised anyway: a line per reason, with their count and
    the first NAMES_SHOWN names in layer order."""
    lines = [f"weights: {weight_bytes(model) / 2**20:.1f} MiB"]
    kept: dict[str, int] = {}
    for name, qtype in quantized_names.items():
        if name not in dequantized:
            kept[qtype] = kept.get(qtype, 0) + 1
    if kept:
        counts = ", ".join(f"{n} {q}" for q, n in sorted(kept.items()))
        lines.append(_kept_line(counts, form))
    by_reason: dict[str, list[str]] = {}
    for name in sorted(dequantized, key=_layer_order):
        by_reason.setdefault(dequantized[name], []).append(name)
    for why, names in by_reason.items():
        count = f"{len(names)} tensors" if len(names) > 1 else "1 tensor"
        more = f", and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
        lines.append(f"dequantised ({why}): {count}: {', '.join(names[:NAMES_SHOWN])}{more}")
    return lines


def _layer_order(name: str) -> list[str | int]:
    """A sort key that orders a name's numbers as numbers (layers.2 before layers.10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _kept_line(counts: str, form: str) -> str:
    """The summary's line on the tensors kept quantised ("n qtype, ..." in `counts`), worded for `form`: "blocks"
    keeps them all as GGUF blocks, "dot" packs the projections for braid_kernels/cpu_quant.c, "int4" holds the
    packable projections in torch's CPU int4 form, and any other form ("float") decodes the projections at load."""
    if form == "blocks":
        return f"kept quantised: {counts}"
    if form == "dot":
        from braid_kernels.cpu_quant import QTYPES  # imported on use: braid_kernels reads TRITON_INTERPRET
        from braid_kernels.quant_formats import BLOCK_SIZE

        types = "/".join(q for q in BLOCK_SIZE if q in QTYPES)
        return (f"quantised tensors ({counts}): projections of {types} packed for Braid's CPU integer-dot kernels, "
                "others decoded to float at load; embeddings kept quantised")
    if form == "int4":
        from braid_kernels.quant_formats import BLOCK_SIZE, NIBBLE_QTYPES  # imported on use, as in cpu_int4

        types = "/".join(q for q in BLOCK_SIZE if q in NIBBLE_QTYPES)  # the formats table's order: Q8_0 first
        return (f"quantised tensors ({counts}): projections of {types} in torch's CPU int4 form, others decoded to "
                "float at load; embeddings kept quantised, but for a tied table whose lm_head is decoded to float "
                "(it shares that float copy)")
    return (f"quantised tensors ({counts}): projections decoded to float at load for the CPU's matmul, untied "
            "embeddings kept quantised")
