"""What a loaded model's weights occupy and how they are held: the engine's load summary and LLM.memory_stats."""
from __future__ import annotations

from torch import nn


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
                 on_cpu: bool = False) -> list[str]:
    """Lines for the log: weight bytes, tensors kept quantised by qtype (`on_cpu`: projections decoded at load, see
    QuantLinear), and every quantised tensor dequantised anyway with the reason."""
    lines = [f"weights: {weight_bytes(model) / 2**20:.1f} MiB"]
    kept: dict[str, int] = {}
    for name, qtype in quantized_names.items():
        if name not in dequantized:
            kept[qtype] = kept.get(qtype, 0) + 1
    if kept:
        counts = ", ".join(f"{n} {q}" for q, n in sorted(kept.items()))
        lines.append(f"quantised tensors ({counts}): projections decoded to float at load for the CPU's matmul, "
                     "untied embeddings kept quantised" if on_cpu else f"kept quantised: {counts}")
    lines += [f"dequantised: {name} ({why})" for name, why in sorted(dequantized.items())]
    return lines
