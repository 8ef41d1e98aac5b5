"""A projection whose weight stays as GGUF blocks: the layer that replaces a Linear when the checkpoint holds that
weight quantised (weights.load_model swaps the module; the model's code is unchanged)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.layers import cpu_int4
from braidinfer.layers.deferred import Deferred
from braidinfer.loader.quantized import QuantizedTensor

if TYPE_CHECKING:
    from braid_kernels.cpu_quant import PackedWeight

FORMS = ("blocks", "float", "int4", "dot")
_cpu_quant_linear = None  # braid_kernels.cpu_quant.linear, bound on first use (braid_kernels reads TRITON_INTERPRET)


def cpu_quant_linear(x: torch.Tensor, weight: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """braid_kernels.cpu_quant.linear(x, weight, out)."""
    global _cpu_quant_linear
    if _cpu_quant_linear is None:
        from braid_kernels.cpu_quant import linear

        _cpu_quant_linear = linear
    return _cpu_quant_linear(x, weight, out)


def int8_input_rows(num_rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a projection of GGUF blocks (QuantLinear.takes_int8_rows) takes num_rows rows of x of dtype on device
    as int8 rows: 16-bit x on CUDA, at a row count quant_linear serves by its integer-dot ("dot") path."""
    if not (device.type == "cuda" and num_rows > 0 and dtype in (torch.float16, torch.bfloat16)):
        return False
    from braid_kernels.quant import linear_path

    return linear_path(num_rows, dtype) == "dot"


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W [out_features, in_features] held as row ranges ("parts"), each GGUF blocks of one
    qtype or a float matrix (a tensor the loader had to dequantise).

    A fused projection (q/k/v, gate/up) is filled part by part; `finalize` joins neighbouring parts of the same
    qtype into one matrix of blocks, so a projection whose checkpoint tensors share a type runs one kernel, and one
    mixing types (Q4_K_M's Q4_K q/k beside a Q6_K v) runs one per type, each written straight into its columns of the
    output (the "dot" form, and GGUF blocks at one row of x) or concatenated; two parts whose rows would both stream
    at one row of x (braid_kernels.quant.quant_linear_pair) take one launch.

    Forms (`finalize`): "blocks" (CUDA): braid_kernels.quant.quant_linear (dequantising GEMV up to 4 rows, the fused
    GEMM up to 64 on large matrices, else dequantise + matmul). "dot" (x86 CPUs with AVX-512 VNNI, where
    braid_kernels/cpu_quant.c builds): parts of every kept type as that library's packed codes (integer dot products
    with x rounded to two int8 terms per value and 32-value block, float32 out), float parts as they are. "int4" (the
    CPU where torch's int4 kernels are fast): parts of every kept type but Q6_K as torch's CPU int4 weight-only matmul
    operands (cpu_int4.py, x rounded to bfloat16), other parts decoded to float once. "float" (other CPUs): every
    part decoded once into a float matrix, as decoding per call is slower still.

    Where x takes the integer-dot GEMV (a few rows of 16-bit x, every part blocks), x is rounded to int8 once for
    all parts; and on the GEMV plan a norm or SiLU-and-mul before it arrives Deferred (plan.gemv_prologues) and its
    kernel writes x straight in that int8 form (braid_kernels/int8_rows.py), saving the rounding's own launch, as
    does the attention before an o_proj (PagedAttention.int8_output: an AttentionOutput, computed already).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._pending: dict[int, torch.Tensor | QuantizedTensor] = {}  # first row -> part, until finalize
        self.qtypes: list[str | None] = []  # per part; None: a float matrix
        self._int4_terms: dict[int, list[cpu_int4.Int4Term]] = {}  # int4 part -> its buffers, in order
        self._only_int4: list[cpu_int4.Int4Term] | None = None  # the terms, when int4 part 0 is the whole matrix
        self._dot: dict[int, PackedWeight] = {}  # "dot" part -> its packed weight
        self._only_dot: PackedWeight | None = None  # when dot part 0 is the whole matrix
        self.decoded_rows: int | None = None
        """Int4 parts: from this many rows of x, multiply by the decoded weights instead of the int4 op
        (cpu_int4.linear; set by the engine from EngineConfig.cpu_decoded_prefill); None: never."""

    def set_part(self, start: int, weight: torch.Tensor | QuantizedTensor) -> None:
        """Rows [start, start + rows) of W: blocks (QuantizedTensor) or a float [rows, in_features] tensor."""
        rows, cols = weight.shape
        if cols != self.in_features or start < 0 or start + rows > self.out_features:
            raise ValueError(f"a [{rows}, {cols}] part at row {start} does not fit a [{self.out_features}, "
                             f"{self.in_features}] projection")
        self._pending[start] = weight

    def finalize(self, form: str = "blocks") -> None:
        """Checks the parts cover every row once and lays them out for computing; call after the last set_part.
        form: "blocks" keeps the GGUF blocks in the planes layout (braid_kernels/quant_planes.py; neighbouring parts
        of one qtype joined); "float" decodes every part into one float matrix of `dtype` (gguf's values rounded to
        it); "int4" (CPU) makes each joined part of a cpu_int4.packable type the CPU int4 matmul's operands and
        decodes the others to `dtype`; "dot" (CPU, float32 `dtype`) packs each joined part of a type
        braid_kernels.cpu_quant takes for its integer-dot product and decodes the others."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        parts, row = [], 0
        for start in sorted(self._pending):
            part = self._pending[start]
            if start != row:
                raise ValueError(f"rows {row}..{start} of a [{self.out_features}, {self.in_features}] projection "
                                 f"are missing or filled twice")
            qtype = part.qtype if isinstance(part, QuantizedTensor) else None
            if qtype is None:
                weight = part.to(self.dtype)
            else:  # the kernels read the planes layout; the CPU decoders and int4 packing GGUF's
                weight = part.in_planes().blocks if form == "blocks" else part.gguf_blocks()
            if parts and qtype is not None and parts[-1][0] == qtype:
                parts[-1][1].append(weight)
            else:
                parts.append((qtype, [weight]))
            row = start + part.shape[0]
        if row != self.out_features:
            raise ValueError(f"rows {row}..{self.out_features} of a projection are missing")
        self._pending.clear()
        joined = [(q, tensors[0] if len(tensors) == 1 else torch.cat(tensors)) for q, tensors in parts]
        if form != "blocks":
            from braid_kernels.quant_formats import dequantize_torch

            decoded = [(q, w) if q is None or self._packable(form, q, w.shape[0])
                       else (None, dequantize_torch(w, q, self.dtype)) for q, w in joined]
            joined = []
            for q, w in decoded:  # neighbouring float parts become one matrix
                if q is None and joined and joined[-1][0] is None:
                    joined[-1] = (None, torch.cat((joined[-1][1], w)))
                else:
                    joined.append((q, w))
        for i, (qtype, weight) in enumerate(joined):  # a single part keeps its tensor: a tied lm_head shares it
            if qtype is not None and form == "dot":
                from braid_kernels import cpu_quant

                packed = cpu_quant.pack(weight, qtype)
                for field in ("codes", "scales", "offsets"):
                    self.register_buffer(f"part{i}_{field}", getattr(packed, field), persistent=False)
                self._dot[i] = packed
            elif qtype is not None and form == "int4":
                terms = cpu_int4.pack(weight, qtype)
                for j, (packed, scales_zeros) in enumerate(terms):
                    self.register_buffer(f"part{i}_{j}", packed, persistent=False)
                    self.register_buffer(f"part{i}_{j}_scales", scales_zeros, persistent=False)
                self._int4_terms[i] = terms  # the same tensors, without a lookup per call
            else:
                self.register_buffer(f"part{i}", weight, persistent=False)
            self.qtypes.append(qtype)
        if len(self.qtypes) == 1 and 0 in self._int4_terms:
            self._only_int4 = self._int4_terms[0]
        if len(self.qtypes) == 1 and 0 in self._dot:
            self._only_dot = self._dot[0]

    def packed_part(self, i: int):
        """Part i's braid_kernels.cpu_quant.PackedWeight (the "dot" form)."""
        return self._dot[i]

    def _packable(self, form: str, qtype: str, rows: int) -> bool:
        """Whether a part of `qtype` and `rows` rows keeps a quantised form under CPU `form` ("int4" or "dot")
        rather than being decoded at load."""
        if form == "dot":
            from braid_kernels.cpu_quant import QTYPES

            return qtype in QTYPES and self.in_features % 32 == 0 and self.dtype == torch.float32
        return form == "int4" and cpu_int4.packable(qtype, (rows, self.in_features))

    @property
    def kinds(self) -> list[str]:
        """Per part, how it is held: "float" (buffer part{i}), "blocks" (part{i}), "int4" (part{i}_{j}...) or "dot"
        (part{i}_codes, _scales, _offsets; the offsets buffer is None for the types of cpu_quant.OFFSET_FACTORS)."""
        return [self._kind(i) for i in range(len(self.qtypes))]

    def _kind(self, i: int) -> str:
        """Part i's entry of `kinds`: "int4" or "dot" if held so, else "float" for a float matrix, else "blocks"."""
        if i in self._int4_terms:
            return "int4"
        if i in self._dot:
            return "dot"
        return "float" if self.qtypes[i] is None else "blocks"

    def forward(self, x: torch.Tensor | Deferred) -> torch.Tensor:
        if self._only_dot is not None and type(x) is torch.Tensor and x.dim() == 2:
            # The CPU's usual case, taken first: a CPU decode step is ~120 of these calls
            y = cpu_quant_linear(x if x.stride(1) == 1 else x.contiguous(), self._only_dot)
            return y if self.bias is None else y + self.bias
        if self._only_int4 is not None and type(x) is torch.Tensor and x.dim() == 2:
            # The CPU's usual case, taken first: a CPU decode step is ~120 of these calls, each ~100 us
            y = cpu_int4.linear(x, self._only_int4, self.decoded_rows)
            return y if self.bias is None else y + self.bias
        if isinstance(x, Deferred):  # the norm / activation before this projection, not computed yet
            x = x.int8_rows() if self._takes_int8(x.x) else x.value()
        elif len(self.qtypes) > 1 and self._takes_int8(x):
            from braid_kernels.quant import quantize_rows

            x = quantize_rows(x)  # once for every part
        if len(self.qtypes) > 1 and self._writes_in_place(x):
            y = self._parts_in_place(x)
        else:
            outs = [self._part(i, x) for i in range(len(self.qtypes))]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias

    def _writes_in_place(self, x) -> bool:
        """Whether every part can write its columns straight into one output instead of being concatenated (a torch
        op between the kernels, which would also keep a replayed CPU layer eager, braidinfer/cpu_graphs.py): every
        part in the "dot" form (e.g. Q4_K q/k beside a Q6_K v; any rows of x), or one row of x (its parts' columns of
        a one-row output are contiguous) and every part GGUF blocks."""
        if len(x.shape) != 2:
            return False
        if len(self._dot) == len(self.qtypes):
            return True
        return x.shape[0] == 1 and not self._int4_terms and not self._dot and None not in self.qtypes

    def _parts_in_place(self, x) -> torch.Tensor:
        """[rows, out_features]: each part's kernel writing into its own columns (no concatenation)."""
        y = torch.empty((x.shape[0], self.out_features), dtype=x.dtype, device=x.device)
        if len(self.qtypes) == 2 and not self._dot:  # one launch for both, where both would stream their rows
            from braid_kernels.quant import quant_linear_pair

            if quant_linear_pair(x, self.part0, self.qtypes[0], self.part1, self.qtypes[1], y):
                return y
        if self._dot and x.stride(1) != 1:
            x = x.contiguous()
        start = 0
        for i, qtype in enumerate(self.qtypes):
            if i in self._dot:
                rows = self._dot[i].shape[0]
                cpu_quant_linear(x, self._dot[i], out=y[:, start:start + rows])
                start += rows
                continue
            weight = getattr(self, f"part{i}")
            columns = y[:, start:start + weight.shape[0]]
            if weight.is_cuda:
                from braid_kernels.quant import quant_linear

                quant_linear(x, weight, qtype, out=columns)
            else:  # the CPU's per-call decode (_part) has no output argument
                columns.copy_(self._part(i, x))
            start += weight.shape[0]
        return y

    @property
    def takes_int8_rows(self) -> bool:
        """Whether every part is held as GGUF blocks over whole runs of 32 inputs: on CUDA such a projection takes
        its input as int8 rows (braid_kernels' Int8Rows) wherever quant_linear's "dot" path serves the row count."""
        return (bool(self.qtypes) and not self._int4_terms and not self._dot and None not in self.qtypes
                and self.in_features % 32 == 0)

    def _takes_int8(self, x: torch.Tensor) -> bool:
        """Whether every part would round x to int8 rows (quant_linear's "dot" path), so that it can be done once."""
        return x.dim() == 2 and self.takes_int8_rows and int8_input_rows(x.shape[0], x.dtype, x.device)

    def _part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        qtype, kind = self.qtypes[i], self._kind(i)
        if kind == "dot":
            rows = x.reshape(-1, self.in_features)
            rows = rows if rows.stride(1) == 1 else rows.contiguous()
            return cpu_quant_linear(rows, self._dot[i]).view(*x.shape[:-1], -1)
        if kind == "int4":
            if x.dim() == 2:
                return cpu_int4.linear(x, self._int4_terms[i], self.decoded_rows)
            return cpu_int4.linear(x.reshape(-1, self.in_features), self._int4_terms[i],
                                   self.decoded_rows).reshape(*x.shape[:-1], -1)
        weight = getattr(self, f"part{i}")
        if kind == "float":
            return F.linear(x, weight)
        if weight.is_cuda:
            from braid_kernels.quant import quant_linear

            return quant_linear(x, weight, qtype)
        from braid_kernels.quant_formats import dequantize_torch
        from braid_kernels.quant_planes import from_planes

        return F.linear(x, dequantize_torch(from_planes(weight, qtype), qtype, x.dtype))

    def kernel_path(self) -> str:
        kinds = "+".join(q or "float" for q in self.qtypes)
        if "dot" in self.kinds:
            return (f"quant linear {kinds}: braid_kernels/cpu_quant.c integer-dot product (AVX-512 VNNI, x as two "
                    f"int8 terms per 32-value block) for the packed forms")
        if "int4" in self.kinds:
            return f"quant linear {kinds}: torch CPU int4 weight-only matmul (bfloat16 x) for the 4-bit forms"
        device = getattr(self, "part0").device.type if self.qtypes else "cpu"
        if device == "cuda":
            return (f"quant linear {kinds}: triton quant_linear (GEMV <= 4 rows, fused GEMM <= 64 rows on large "
                    f"matrices (Q4_K, Q6_K: <= 128 rows, any size), else dequantise + matmul; on the GEMV plan, at "
                    f"one row of 16-bit x, a norm or SiLU-and-mul before it writes x as int8; two streamed parts in "
                    f"one launch)")
        if kinds == "float":
            return "quant linear (decoded at load): torch F.linear"
        return f"quant linear {kinds}: torch dequantize per call + F.linear"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={self.qtypes}"
