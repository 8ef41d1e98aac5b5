"""One layer's attention over the paged KV pool on x86 CPUs with AVX-512: cpu_attention.c (QK-norm, RoPE, the K/V
write and attention for every row of a step, each row alone) through cpu_library.py, beside `attention_ref`, the
same in plain PyTorch.

The step is described per row: `slots` (page * page_size + offset of the row's new K/V), `positions` (the row's
index p in its sequence's KV: it sees keys 0..p, or p - window + 1..p) and `table_start` (where its sequence's page
table starts in the flat `tables`). `step_rows` builds them from spans.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_library import library, unavailable_reason


@dataclass(frozen=True, eq=False)
class StepRows:
    """A step's rows as the kernel reads them (contiguous int64 CPU tensors): slots [T], positions [T], table_start
    [T], and the sequences' page tables one after another, `tables`."""

    slots: torch.Tensor
    positions: torch.Tensor
    table_start: torch.Tensor
    tables: torch.Tensor

    def __post_init__(self):
        rows = self.slots.shape[0] if self.slots.dim() == 1 else -1
        for name in ("slots", "positions", "table_start", "tables"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.dim() != 1 or not t.is_contiguous() or t.device.type != "cpu" or (
                    name != "tables" and t.shape[0] != rows):
                raise ValueError(f"StepRows.{name} must be a contiguous int64 CPU vector"
                                 + ("" if name == "tables" else f" of the rows' length ({rows})"))
        if rows and (int(self.slots.min()) < 0 or int(self.positions.min()) < 0 or int(self.table_start.min()) < 0):
            raise ValueError("StepRows: slots, positions and table starts must be >= 0")
        object.__setattr__(self, "_checked", {})

    def check(self, pages: int, page_size: int) -> None:
        """Raises ValueError unless every slot and every page the rows read lies in a pool of `pages` pages of
        `page_size` tokens (checked once per pool shape)."""
        if (pages, page_size) in self._checked:
            return
        if self.slots.numel():
            last = self.table_start + self.positions // page_size  # each row's last page in `tables`
            if int(self.slots.max()) >= pages * page_size or int(last.max()) >= self.tables.numel() or (
                    self.tables.numel() and (int(self.tables.min()) < 0 or int(self.tables.max()) >= pages)):
                raise ValueError(f"StepRows reach past a pool of {pages} pages of {page_size} tokens")
        self._checked[(pages, page_size)] = True


def step_rows(spans, slot_mapping: torch.Tensor) -> StepRows:
    """StepRows of the new tokens of `spans` (q_len, context_len, page_table each: the sequence's last q_len tokens of
    context_len), laid out span after span, and their slots `slot_mapping` [T] in that order."""
    rows = slot_mapping.shape[0]
    positions = torch.empty(rows, dtype=torch.int64, device="cpu")
    table_start = torch.empty(rows, dtype=torch.int64, device="cpu")
    tables, start, row = [], 0, 0
    for span in spans:
        first = span.context_len - span.q_len
        positions[row:row + span.q_len] = torch.arange(first, span.context_len)
        table_start[row:row + span.q_len] = start
        tables.append(span.page_table.to(torch.int64))
        start += span.page_table.numel()
        row += span.q_len
    flat = torch.cat(tables) if tables else torch.zeros(0, dtype=torch.int64)
    return StepRows(slot_mapping.to(torch.int64).contiguous(), positions, table_start, flat.contiguous())


def attention(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, pool: torch.Tensor, rows: StepRows,
              scale: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
              q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6,
              window: int | None = None, threads: int | None = None) -> torch.Tensor:
    """qkv [T, (heads + 2 kv_heads) head_dim] float32 (q, k, v heads; rows contiguous) -> [T, heads head_dim]; writes
    the rows' k and v into `pool`, one layer [pages, 2, kv_heads, page_size, head_dim] of float32 or bfloat16.
    cos, sin: [T, head_dim] float32 (None: no rotation); q_norm, k_norm: [head_dim] float32 RMSNorm weights per head
    (None: none). head_dim a multiple of 16, at most 256."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"Braid's CPU kernels are unavailable: {unavailable_reason()}")
    t = qkv.shape[0]
    width = (heads + 2 * kv_heads) * head_dim
    if qkv.dtype is not torch.float32 or qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1 \
            or not qkv.is_cpu:
        raise ValueError(f"qkv must be a float32 CPU tensor [rows, {width}] with contiguous rows, got {qkv.dtype} "
                         f"{tuple(qkv.shape)} on {qkv.device}")
    if pool.dtype not in (torch.float32, torch.bfloat16) or not pool.is_contiguous() or pool.dim() != 5 \
            or pool.shape[1:3] != (2, kv_heads) or pool.shape[4] != head_dim:
        raise ValueError(f"pool must be a contiguous float32 or bfloat16 tensor [pages, 2, {kv_heads}, page_size, "
                         f"{head_dim}], got {pool.dtype} {tuple(pool.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table is not None and (table.dtype is not torch.float32 or table.shape != (t, head_dim)
                                  or table.stride(1) != 1):
            raise ValueError(f"{name} must be float32 [{t}, {head_dim}] with contiguous rows")
    if (cos is None) != (sin is None) or (q_norm is None) != (k_norm is None):
        raise ValueError("cos and sin, and q_norm and k_norm, come both or neither")
    for name, weight in (("q_norm", q_norm), ("k_norm", k_norm)):
        if weight is not None and (weight.dtype is not torch.float32 or weight.shape != (head_dim,)
                                   or not weight.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor [{head_dim}]")
    if rows.slots.shape[0] != t:
        raise ValueError(f"step rows describe {rows.slots.shape[0]} rows, qkv has {t}")
    rows.check(pool.shape[0], pool.shape[3])
    out = qkv.new_empty((t, heads * head_dim))  # float32 on the CPU, as qkv (not torch's default dtype or device)
    ptr = (lambda x: None if x is None else x.data_ptr())
    rc = lib.braid_cpu_attention(
        qkv.data_ptr(), qkv.stride(0), t, heads, kv_heads, head_dim, ptr(cos), ptr(sin),
        0 if cos is None else cos.stride(0), ptr(q_norm), ptr(k_norm), norm_eps, pool.data_ptr(),
        int(pool.dtype == torch.bfloat16), pool.shape[3], rows.slots.data_ptr(), rows.positions.data_ptr(),
        rows.tables.data_ptr(), rows.table_start.data_ptr(), window or 0, scale, out.data_ptr(), out.stride(0),
        threads or torch.get_num_threads())
    if rc != 0:
        raise MemoryError("cpu_attention: no scratch memory") if rc == -2 else ValueError(
            f"cpu_attention rejected its arguments (heads={heads}, kv_heads={kv_heads}, head_dim={head_dim})")
    return out


def attention_ref(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, pool: torch.Tensor, rows: StepRows,
                  scale: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                  q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, norm_eps: float = 1e-6,
                  window: int | None = None) -> torch.Tensor:
    """`attention` in plain PyTorch, row by row (float32 arithmetic on the pool's values)."""
    t = qkv.shape[0]
    x = qkv.view(t, heads + 2 * kv_heads, head_dim).clone()
    q, k, v = x[:, :heads], x[:, heads:heads + kv_heads], x[:, heads + kv_heads:]
    if q_norm is not None:
        q = q_norm * (q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + norm_eps))
        k = k_norm * (k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + norm_eps))
    if cos is not None:
        def rotate(y):
            y1, y2 = y.chunk(2, dim=-1)
            return y * cos[:, None] + torch.cat((-y2, y1), dim=-1) * sin[:, None]
        q, k = rotate(q), rotate(k)
    page_size = pool.shape[3]
    flat = pool.view(pool.shape[0], 2, kv_heads, page_size, head_dim)
    for r in range(t):
        page, offset = divmod(int(rows.slots[r]), page_size)
        flat[page, 0, :, offset] = k[r].to(pool.dtype)
        flat[page, 1, :, offset] = v[r].to(pool.dtype)
    out = torch.empty(t, heads, head_dim, dtype=torch.float32)
    group = heads // kv_heads
    for r in range(t):
        p, start = int(rows.positions[r]), int(rows.table_start[r])
        first = max(0, p - window + 1) if window else 0
        keys = torch.arange(first, p + 1)
        pages = rows.tables[start + keys // page_size]
        kk = flat[pages, 0, :, keys % page_size].float()  # (n, kv_heads, hd)
        vv = flat[pages, 1, :, keys % page_size].float()
        for h in range(heads):
            g = h // group
            weights = torch.softmax((kk[:, g] @ q[r, h]) * scale, dim=0)
            out[r, h] = weights @ vv[:, g]
    return out.view(t, heads * head_dim)
