"""One layer's attention over the paged KV pool, from the packed qkv projection to the heads' outputs."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from braidinfer.layers.deferred import Deferred, triton_kernels
from braidinfer.layers.norm import RMSNorm
from braidinfer.layers.plan import KernelPlan
from braidinfer.layers.quant_linear import int8_input_rows
from braidinfer.layers.rotary import apply_rotary

if TYPE_CHECKING:
    from braidinfer.models.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    """QK-norm (optional, per head) + RoPE + write of the new K/V into the pool + attention, for layer `layer_idx`.

    forward(qkv, batch): qkv [T, (num_heads + 2 * num_kv_heads) * head_dim], q then k then v (the packed qkv_proj's
    output) -> [T, num_heads * head_dim]. The step's rotation is batch.rope, its KV layout batch.meta, and the
    backend (torch, FlashInfer) batch.attention. PyTorch plan: the norms and the rotation in PyTorch, then the backend
    writes K/V and attends. Triton plan: one kernel (braid_kernels/qk_norm_rope.py) does the norms, the rotation and the
    write, then the backend only attends.

    int8_output (set by select_kernels where the output goes only into QuantLinears that take int8 rows): in steps
    whose projection takes int8 rows (quant_linear's "dot" path, up to 4 rows) and whose backend writes them (the
    Triton decode of CUDA-graph decodes, `writes_int8`), the output comes back as an `AttentionOutput` holding both
    the tensor and those rows, so the projection needs no rounding launch of its own.

    q_norm, k_norm: Qwen3-style RMSNorms over head_dim, owned (and named in the checkpoint) by the caller; both or none.
    rotary: False for models without rotary embeddings (GPT-2's learned positions): q and k go to the backend as
    they are. rotary_dim: how many leading dims of each head rotate (partial rotary, e.g. Phi-4-mini; the rest pass
    through); None for all of head_dim. rotate_in_float32: rotate q and k in float32 and round once after (the
    checkpoints whose reference implementation does so, e.g. ERNIE-4.5). The fused kernel runs only with a full,
    model-dtype rotation and plain RMSNorm QK-norms (the rounding it reproduces).

    cache_head_dim: the head width of the KV pool (set by `pad_heads`; head_dim unless the backend has no kernels
    for head_dim). When wider, q, k and v go to the backend zero-padded and the output is cut back to head_dim; the
    fused kernel, which writes head_dim-wide rows, is then not used.
    """

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, rotary: bool = True,
                 rotary_dim: int | None = None, rotate_in_float32: bool = False):
        super().__init__()
        if (q_norm is None) != (k_norm is None):
            raise ValueError("PagedAttention takes both q_norm and k_norm, or neither")
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qk_norms = (q_norm, k_norm) if q_norm is not None else None  # a tuple: not registered twice
        self.rotary = rotary
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not 0 < self.rotary_dim <= head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.rotate_in_float32 = rotate_in_float32
        plain_rotation = rotary and self.rotary_dim == head_dim and not rotate_in_float32
        self.fusable = plain_rotation and (q_norm is None or type(q_norm) is RMSNorm and type(k_norm) is RMSNorm)
        self.cache_head_dim = head_dim
        self.plan = KernelPlan()
        self.int8_output = False  # set by select_kernels when the output goes only into int8-input QuantLinears

    @property
    def _runs_fused(self) -> bool:
        return self.plan.triton and self.fusable and self.cache_head_dim == self.head_dim

    def forward(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self._runs_fused:
            return self._fused(qkv, batch)
        if self.plan.cpu and self._runs_cpu(qkv, batch):
            return self._cpu(qkv, batch)
        return self._unfused(qkv, batch)

    def _unfused(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The PyTorch plan: the norms and the rotation in PyTorch, then the backend writes K/V and attends."""
        T = qkv.shape[0]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim)  # (T, qh + kvh, hd): q's heads, then k's
        v = v.view(T, self.num_kv_heads, self.head_dim)  # (T, kvh, hd)
        if self.qk_norms is None and self.rotary:
            qk = self._rotate(qk, batch)  # q and k in one pass (fewer, larger ops)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # (T, qh, hd), (T, kvh, hd)
        if self.qk_norms is not None:
            q, k = self.qk_norms[0](q), self.qk_norms[1](k)  # normalised over head_dim
            if self.rotary:
                q, k = self._rotate(q, batch), self._rotate(k, batch)
        if self.cache_head_dim != self.head_dim:
            pad = (0, self.cache_head_dim - self.head_dim)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)  # (T, heads, cache_head_dim)
        o = batch.attention(self.layer_idx, q, k, v, batch.meta)[..., : self.head_dim]  # (T, qh, hd)
        return o.reshape(T, self.q_size)

    def _rotate(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x: [T, heads, hd] -> its first rotary_dim dims of each head rotated by position, the rest as they are."""
        dtype = torch.float32 if self.rotate_in_float32 else x.dtype
        cos, sin = batch.rope.cos_sin(dtype)  # (T, 1, rotary_dim) each
        if self.rotary_dim == self.head_dim:
            return apply_rotary(x.to(dtype), cos, sin).to(x.dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]  # (T, h, rd), (T, h, hd - rd)
        return torch.cat((apply_rotary(rot.to(dtype), cos, sin).to(x.dtype), rest), dim=-1)

    def _runs_cpu(self, qkv: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether the C kernel (braid_kernels/cpu_attention.c) computes this layer: the torch backend's pool (float32
        or bfloat16), float32 rows, a full rotation or none, plain RMSNorm QK-norms or none, no soft-cap, no padded
        heads. Fixed for a model and engine, so every step of a request takes the same path."""
        backend = batch.attention
        return (hasattr(backend, "decode_rows") and qkv.dtype == torch.float32 and qkv.dim() == 2
                and qkv.stride(1) == 1 and self.cache_head_dim == self.head_dim and self.head_dim % 16 == 0
                and self.head_dim <= 256 and self.rotary_dim == self.head_dim
                and (self.qk_norms is None or all(type(n) is RMSNorm and n.weight.dtype == torch.float32
                                                  and n.eps == self.qk_norms[0].eps for n in self.qk_norms))
                and backend.kv_cache.dtype in (torch.float32, torch.bfloat16)
                and backend.specs[self.layer_idx].logits_soft_cap is None)

    def _cpu(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The rows of decoding sequences (generated tokens, SeqSpan.generated) through the C kernel: QK-norm, RoPE,
        the K/V write and attention in one call, each row alone; prompt rows through the PyTorch plan (SDPA per
        sequence, faster for many rows), on their own in a step that has both. Which path a row takes depends only on
        whether its token is a prompt token, so a request's answer depends neither on the other sequences of its steps
        nor on the prefix cache."""
        from braid_kernels.cpu_attention import attention  # on use: braid_kernels reads TRITON_INTERPRET at import

        backend = batch.attention
        index, rows = backend.decode_rows(batch.meta)
        if rows is None:  # no decoding sequence
            return self._unfused(qkv, batch)
        out = None if index is None else self._prompt_rows(qkv, batch)  # index None: every row decodes
        cos = sin = None
        if self.rotary:
            cos, sin = (t.view(t.shape[0], -1) for t in batch.rope.cos_sin(torch.float32))
            if index is not None:
                cos, sin = cos[index], sin[index]
        norms = (None, None, 1e-6) if self.qk_norms is None else (
            self.qk_norms[0].weight, self.qk_norms[1].weight, self.qk_norms[0].eps)
        spec = backend.specs[self.layer_idx]
        decoded = attention(qkv if index is None else qkv[index], self.num_heads, self.num_kv_heads, self.head_dim,
                            backend.kv_cache[self.layer_idx], rows, spec.scale, cos, sin, *norms,
                            window=spec.sliding_window)  # rewrites those rows' K/V as the kernel rotates them
        if out is None:
            return decoded
        out[index] = decoded
        return out

    def _prompt_rows(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """[T, q_size] with the step's prompt rows computed by the PyTorch plan on their own (the decoding rows,
        left for the C kernel, are not computed twice)."""
        from braidinfer.models.forward_batch import ForwardBatch

        index, meta = batch.attention.prompt_part(batch.meta)
        positions = batch.positions[index]
        rope = None if batch.rope is None else batch.rope.rotary.at(positions)
        out = qkv.new_empty((qkv.shape[0], self.q_size))
        out[index] = self._unfused(qkv[index], ForwardBatch(positions, meta, batch.attention, rope))
        return out

    def _fused(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        norm_weights = (None, None, 1e-6)
        if self.qk_norms is not None:
            q_norm, k_norm = self.qk_norms
            norm_weights = (q_norm.weight, k_norm.weight, q_norm.eps)
        q = triton_kernels().qk_norm_rope_write_kv(qkv, batch.positions, *batch.rope.tables,
                                                   batch.attention.kv_cache[self.layer_idx], batch.meta.slot_mapping,
                                                   *norm_weights, static_weights=True,
                                                   positions_ready=batch.host_inputs)  # (T, qh, hd)
        rows = qkv.shape[0]
        writes_int8 = self.int8_output and getattr(batch.attention, "writes_int8", False)
        if writes_int8 and int8_input_rows(rows, q.dtype, q.device):
            # the int8 launch runs without mul+add contraction (its rounding reproduces quantize_rows'), so its
            # attention output may differ from the plain launch's in the last bit
            int8 = triton_kernels().empty_int8_rows(rows, self.q_size, q.dtype, q.device)
            o = batch.attention.attend(self.layer_idx, q, batch.meta, int8=int8)  # (T, qh, hd), and as int8 runs
            return AttentionOutput(o.reshape(rows, self.q_size), int8)
        o = batch.attention.attend(self.layer_idx, q, batch.meta)  # (T, qh, hd)
        return o.reshape(rows, self.q_size)

    def kernel_path(self) -> str:
        norm = "qk-norm + " if self.qk_norms is not None else ""
        rope = "rope" if self.rotary else "no rope"
        if self._runs_fused:
            int8 = ("; in CUDA-graph decodes of up to 4 rows the Triton decode also writes the output as the "
                    "projection's int8 rows" if self.int8_output else "")
            return (f"attention: {norm}rope + kv write in triton qk_norm_rope_write_kv, then the backend's "
                    f"attend{int8}")
        if self.plan.cpu:
            return (f"attention: decoding rows: {norm}{rope}, kv write and attention in braid_kernels/cpu_attention.c "
                    f"(float32 rows, the torch backend's pool); prompt rows: {norm}{rope} in torch, then the backend")
        padded = (f" (heads zero-padded from {self.head_dim} to {self.cache_head_dim})"
                  if self.cache_head_dim != self.head_dim else "")
        return f"attention: {norm}{rope} in torch, then the backend's kv write and attend{padded}"


class AttentionOutput(Deferred):
    """The attention's output x [T, q_size], already written by the attention kernel both as a tensor and as the int8
    rows (braid_kernels' Int8Rows) that the next projection's integer-dot GEMV reads: that QuantLinear takes the rows
    and needs no rounding launch of its own. Nothing is left to compute."""

    def __init__(self, x: torch.Tensor, int8):
        self.x = x
        self._int8 = int8

    def project(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(self.x, weight, bias)

    def value(self) -> torch.Tensor:
        return self.x

    def int8_rows(self):
        return self._int8


def cpu_step_inputs(batch: ForwardBatch) -> dict[str, torch.Tensor] | None:
    """The step-wide tensors PagedAttention's C path reads in a step where every row decodes: the rows of its
    StepRows ("slots", "positions", "table_start", "tables"; checked against the pool here) and the float32 rotary
    rows ("cos", "sin" [T, 1, head_dim], when the model rotates). None in any other step (a prefill, a step mixing
    prompt and decoding rows, another attention backend). Replayed layers (braidinfer.cpu_graphs) re-point their
    recorded calls at these each step."""
    backend = batch.attention
    if not hasattr(backend, "decode_rows"):
        return None
    index, rows = backend.decode_rows(batch.meta)
    if rows is None or index is not None:
        return None
    rows.check(backend.kv_cache.shape[1], backend.kv_cache.shape[4])
    inputs = {name: getattr(rows, name) for name in ("slots", "positions", "table_start", "tables")}
    if batch.rope is not None:
        inputs["cos"], inputs["sin"] = batch.rope.cos_sin(torch.float32)
    return inputs


def pad_heads(model: nn.Module, cache_head_dim: int) -> None:
    """Sets the KV pool's head width on every PagedAttention of `model` (see PagedAttention: cache_head_dim). Call
    before any CUDA graph is captured."""
    for module in model.modules():
        if isinstance(module, PagedAttention):
            if cache_head_dim < module.head_dim:
                raise ValueError(f"a KV pool of head width {cache_head_dim} cannot hold heads of {module.head_dim}")
            module.cache_head_dim = cache_head_dim
