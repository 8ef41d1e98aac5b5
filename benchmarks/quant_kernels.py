"""quant_linear (braid_kernels/quant.py) on GGML blocks against bf16 torch.matmul of the same shape, per GGML type, weight
shape and number of rows; and sweeps of the GEMVs' and the fused GEMM's launch configurations to choose
quant_dot.dot_launch_config, quant_gemv.launch_config and quant_gemm.launch_config from.

    python benchmarks/quant_kernels.py [--qtypes Q4_K,Q8_0] [--rows 1,2,4,8,16,128,512] [--sweep [--sweep-path gemv]]
    python benchmarks/quant_kernels.py --gemm [--gemm-sweep] --rows 2,4,8,16,32,64,128,256,512,1024,2048
    python benchmarks/quant_kernels.py --columns [--columns-sweep] [--qtypes Q4_K,Q6_K,Q8_0] [--rows 1,2,4,8,16,128]
    python benchmarks/quant_kernels.py --int4pack [--rows 1,2,4,8,16,32,64,128]
    python benchmarks/quant_kernels.py --dequant [--qtypes Q4_K,Q6_K] [--rows 192,256]
    python benchmarks/quant_kernels.py --stream [--qtypes Q4_K,Q6_K] [--shapes 4096x4096,28672x4096,4096x14336]

Without options, quant_linear's default path at each M. --sweep times SWEEP's configurations (rows of W per program,
K per step, warps) on the integer-dot GEMV or, with --sweep-path gemv, the float one, M <= 8.
--gemm times, at each M, the paths of quant_linear side by side: the integer-dot and float GEMVs (M <= 8), the
fused GEMM at its launch_config and dequantise + cuBLAS, each against bf16; --gemm-sweep adds gemm_sweep's neighbours of
the launch_config and prints the best four. --columns times the column layout (braid_kernels/quant_columns.py) beside the row
layout's default path: its GEMV at launch_config (M <= 8; --columns-sweep adds COLUMNS_SWEEP's configurations,
slow: each compiles), its dequantise + cuBLAS above. --int4pack times torch's int4 weight-only matmul
(`torch.ops.aten._weight_int4pack_mm`, groups of 32 weights, each inner-K tiling) beside bf16 and the Q4_K default
path: a Q4_K / Q4_0 / Q4_1 block maps exactly onto 4-bit codes with a scale and offset per 32 weights.
--stream times, at one row of x, the streaming GEMV (braid_kernels/quant_stream.py) at STREAM_SWEEP's launches
(programs per SM, warps) beside quant_dot's one-row launch, each with its GB/s of quant bytes and the largest
difference from quant_dot's product relative to its largest magnitude (the two sum in different orders).
--dequant times the dequantising kernel alone at DEQUANT_SWEEP's launch configurations (GB/s of blocks read and bf16
written, beside a bf16 copy of the same size), then at each M the dequantise + cuBLAS path against bf16.

Each time is the median over replays of one launch's share of a CUDA graph of back-to-back launches (like the decode
graph's layers), each launch reading a different copy of the weight, and more copies than L2 holds, so weights come
from HBM as in a model. GB/s counts the weight bytes only. The blocks are random bytes with valid fp16 scales:
the kernels' speed does not depend on the values. --check first compares each kernel with the reference once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from braid_kernels.quant import BLOCK_SIZE, MAX_ROWS, TYPE_SIZE, QuantGemmConfig, linear_path, quant_linear  # noqa: E402
from braid_kernels.quant import to_planes  # noqa: E402
from braid_kernels.quant_dequant import DequantConfig, launch_dequantize  # noqa: E402
from braid_kernels.quant_dequant import launch_config as dequant_launch_config  # noqa: E402
from braid_kernels.quant_dot import dot_launch_config  # noqa: E402
from braid_kernels.quant_gemm import X_FIRST_TYPES  # noqa: E402
from braid_kernels.quant_gemm import launch_config as gemm_launch_config  # noqa: E402
from braid_kernels.quant_columns import MAX_ROWS as COLUMNS_MAX_ROWS  # noqa: E402
from braid_kernels.quant_columns import ColumnsConfig, columns_linear, pack_columns  # noqa: E402
from braid_kernels.quant_columns import launch_config as columns_launch_config  # noqa: E402
from braid_kernels.quant_gemv import QuantGemvConfig  # noqa: E402
from braid_kernels.quant_stream import STREAM_TYPES, default_stream_launch, launch_stream_gemv  # noqa: E402

# (N, K) of a weight: Llama-3.1-8B / Qwen3-8B's o_proj, gate_up-like, down-like, a Qwen-sized lm_head, k/v_proj.
SHAPES = [(4096, 4096), (12288, 4096), (4096, 12288), (151936, 4096), (1024, 4096)]
L2_BYTES_TO_DEFEAT = 240e6  # 4x the H200's 60 MB L2
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
               "Q6_K": (208,)}
SWEEP = [QuantGemvConfig(n, k, w) for n in (1, 2, 4) for k in (1024, 2048, 4096) for w in (4, 8)]


DEQUANT_SWEEP = [DequantConfig(r, g, w) for r in (1, 2, 4, 8) for g in (8, 16, 32) for w in (2, 4, 8)]
COLUMNS_SWEEP = [ColumnsConfig(1, s) for s in (8, 16, 32)] + [ColumnsConfig(2, s, 8) for s in (8, 16)]


def gemm_sweep(qtype: str, m: int, n: int, k: int) -> list[QuantGemmConfig]:
    """launch_config's neighbours: 64 or 128 rows of W, BLOCK_M of 16 to 256 up to twice M, 4 or 8 warps, 3 stages,
    K unsplit or split as launch_config splits it (those over the registers or shared memory fail to compile and
    are skipped); for Q4_K also x as the first operand on tiles of at least 64 rows of x, 3 or 4 stages."""
    default = gemm_launch_config(qtype, m, n, k=k)
    block_ms = [bm for bm in (16, 32, 64, 128, 256) if bm <= 2 * max(m, 16)]
    sweep = [QuantGemmConfig(bn, bm, w, 3, split) for bn in (64, 128) for bm in block_ms for w in (4, 8)
             for split in sorted({1, default.split_k})]
    if qtype in X_FIRST_TYPES:  # x as the tensor-core product's first operand: tiles of 64 rows of x and more
        sweep += [QuantGemmConfig(64, bm, 4, stages, split, x_first=True) for bm in block_ms if bm >= 64
                  for stages in (3, 4) for split in sorted({1, default.split_k})]
    return [default] + [config for config in sweep if config != default]


def random_blocks(qtype: str, n: int, k: int, device="cuda") -> torch.Tensor:
    """uint8 [n, k / BLOCK_SIZE * TYPE_SIZE] random quants with every fp16 scale 0.01."""
    blocks = torch.randint(0, 256, (n * k // BLOCK_SIZE[qtype], TYPE_SIZE[qtype]), dtype=torch.uint8, device=device)
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8).to(device)
    for offset in FP16_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = scale
    return blocks.reshape(n, -1)


def random_planes(qtype: str, n: int, k: int, device="cuda") -> torch.Tensor:
    """random_blocks in the planes layout quant_linear reads."""
    return to_planes(random_blocks(qtype, n, k, device), qtype)


def time_rotating(fn, weights: list, replays: int = 20) -> float:
    """Median microseconds of one fn(w) within a CUDA graph that calls it on each of `weights` in turn."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights:
            fn(w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for w in weights:
                fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    del graph
    return statistics.median(times)


def copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(2, int(L2_BYTES_TO_DEFEAT // nbytes) + 1))]


def bench_shape(qtype: str, n: int, k: int, rows: list[int], configs=None, path: str = "dot") -> None:
    """Per M: quant_linear's default path against bf16, or with `configs` the best of them on the GEMV `path`
    ("dot": the integer-dot GEMV, "gemv": the float one)."""
    qbytes = n * k // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype]
    dense = copies(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 2 * n * k)
    quant = copies(lambda: random_planes(qtype, n, k), qbytes)
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        t_bf16 = time_rotating(lambda w: torch.matmul(x, w.t()), dense)
        if configs is None or m > MAX_ROWS:
            t_q = time_rotating(lambda w: quant_linear(x, w, qtype), quant)
            num_sms = torch.cuda.get_device_properties(0).multi_processor_count
            label = linear_path(m, x.dtype, n * k, qtype)
            if label == "dot":
                label += " " + str(tuple(dot_launch_config(qtype, m, n, num_sms, k)))
            print(f"{qtype:5} {n:>6}x{k:<6} M={m:<4} bf16 {t_bf16:8.1f} us {2 * n * k / t_bf16 / 1e3:6.0f} GB/s | "
                  f"{qtype} {t_q:8.1f} us {qbytes / t_q / 1e3:6.0f} GB/s | speedup {t_bf16 / t_q:5.2f}x  {label}",
                  flush=True)
            continue
        results = []
        for config in configs:
            try:
                results.append((time_rotating(lambda w: quant_linear(x, w, qtype, config=config, path=path), quant),
                                config))
            except Exception as error:  # a configuration out of registers or shared memory: skip it
                print(f"  {tuple(config)} failed: {type(error).__name__}: {str(error)[:80]}")
        results.sort()
        best = ", ".join(f"{tuple(c)} {t:.1f}" for t, c in results[:4])
        print(f"{qtype:5} {n:>6}x{k:<6} M={m:<4} bf16 {t_bf16:8.1f} us | {path} best {best} | "
              f"speedup {t_bf16 / results[0][0]:5.2f}x", flush=True)
    del dense, quant
    torch.cuda.empty_cache()


def bench_gemm(qtype: str, n: int, k: int, rows: list[int], sweep: bool) -> None:
    """Per M: bf16 matmul, then each path of quant_linear (int8-dot and float GEMVs up to MAX_ROWS, fused GEMM,
    dequantise + cuBLAS)
    and, with `sweep`, the best GEMM configurations."""
    qbytes = n * k // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype]
    dense = copies(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 2 * n * k)
    quant = copies(lambda: random_planes(qtype, n, k), qbytes)
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        t_bf16 = time_rotating(lambda w: torch.matmul(x, w.t()), dense)
        times = {path: time_rotating(lambda w: quant_linear(x, w, qtype, path=path), quant)
                 for path in (("dot", "gemv") if m <= MAX_ROWS else ()) + ("gemm", "dequantize")}
        paths = " | ".join(f"{path} {t:7.1f} us {t_bf16 / t:5.2f}x" for path, t in times.items())
        print(f"{qtype:5} {n:>6}x{k:<6} M={m:<5} bf16 {t_bf16:7.1f} us {2 * m * n * k / t_bf16 / 1e6:5.0f} TFLOP/s "
              f"| {paths} | gemm {tuple(gemm_launch_config(qtype, m, n, k=k))}", flush=True)
        if not sweep:
            continue
        results = []
        for config in gemm_sweep(qtype, m, n, k):
            try:
                results.append((time_rotating(lambda w: quant_linear(x, w, qtype, config=config, path="gemm"),
                                              quant, replays=10), config))
            except Exception as error:  # out of registers or shared memory: skip it
                print(f"  {tuple(config)} failed: {type(error).__name__}: {str(error)[:80]}")
        results.sort()
        print("  best " + ", ".join(f"{tuple(c)} {t:.1f} us {t_bf16 / t:.2f}x" for t, c in results[:4]), flush=True)
    del dense, quant
    torch.cuda.empty_cache()


def bench_dequant(qtype: str, n: int, k: int, rows: list[int]) -> None:
    """The dequantising kernel at DEQUANT_SWEEP's configurations, then per M dequantise + cuBLAS against bf16."""
    qbytes = n * k // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype]
    quant = copies(lambda: random_planes(qtype, n, k), qbytes)
    out = torch.empty((n, k), dtype=torch.bfloat16, device="cuda")
    dense = copies(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda"), 2 * n * k)
    t_copy = time_rotating(lambda w: out.copy_(w), dense)
    results = []
    for config in DEQUANT_SWEEP:
        try:
            results.append((time_rotating(lambda w: launch_dequantize(w, qtype, out, config=config), quant), config))
        except Exception as error:  # out of registers: skip it
            print(f"  {tuple(config)} failed: {type(error).__name__}: {str(error)[:80]}")
    default = dequant_launch_config(qtype)
    t_default = next(t for t, c in results if c == default)
    results.sort()
    best = ", ".join(f"{tuple(c)} {t:.1f} us {(qbytes + 2 * n * k) / t / 1e3:.0f} GB/s" for t, c in results[:3])
    print(f"{qtype:5} {n:>6}x{k:<6} bf16 copy {t_copy:7.1f} us {4 * n * k / t_copy / 1e3:5.0f} GB/s | dequantise "
          f"{tuple(default)} {t_default:7.1f} us {(qbytes + 2 * n * k) / t_default / 1e3:5.0f} GB/s | best "
          f"{best}", flush=True)
    del dense
    dense = copies(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 2 * n * k)
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        t_bf16 = time_rotating(lambda w: torch.matmul(x, w.t()), dense)
        t_deq = time_rotating(lambda w: quant_linear(x, w, qtype, path="dequantize"), quant)
        print(f"{qtype:5} {n:>6}x{k:<6} M={m:<5} bf16 {t_bf16:7.1f} us | dequantise + cuBLAS {t_deq:7.1f} us "
              f"{t_bf16 / t_deq:5.2f}x", flush=True)
    del dense, quant
    torch.cuda.empty_cache()


def bench_columns(qtype: str, n: int, k: int, rows: list[int], sweep: bool) -> None:
    """Per M: bf16 matmul, the row layout's default path and the column layout's (GEMV at launch_config for M <= 8,
    with `sweep` also the best of COLUMNS_SWEEP; dequantise + cuBLAS above)."""
    qbytes = n * k // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype]
    dense = copies(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 2 * n * k)
    gguf_blocks = copies(lambda: random_blocks(qtype, n, k), qbytes)
    columns = [pack_columns(b, qtype) for b in gguf_blocks]
    quant = [to_planes(b, qtype) for b in gguf_blocks]
    del gguf_blocks
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        t_bf16 = time_rotating(lambda w: torch.matmul(x, w.t()), dense)
        t_rows = time_rotating(lambda w: quant_linear(x, w, qtype), quant)
        t_cols = time_rotating(lambda w: columns_linear(x, w, qtype), columns)
        line = (f"{qtype:5} {n:>6}x{k:<6} M={m:<4} bf16 {t_bf16:7.1f} us | rows {t_rows:7.1f} us "
                f"{t_bf16 / t_rows:5.2f}x | columns {t_cols:7.1f} us {t_bf16 / t_cols:5.2f}x "
                f"{qbytes / t_cols / 1e3:5.0f} GB/s")
        if m <= COLUMNS_MAX_ROWS:
            line += f" {tuple(columns_launch_config(m, n, k, num_sms))}"
        if m <= COLUMNS_MAX_ROWS and sweep:
            results = []
            for config in COLUMNS_SWEEP:
                try:
                    results.append((time_rotating(lambda w: columns_linear(x, w, qtype, config=config), columns,
                                                  replays=10), config))
                except Exception as error:  # out of registers: skip it
                    print(f"  {tuple(config)} failed: {type(error).__name__}: {str(error)[:80]}")
            results.sort()
            line += " | best " + ", ".join(f"{tuple(c)} {t:.1f} us {qbytes / t / 1e3:.0f} GB/s"
                                           for t, c in results[:3])
        print(line, flush=True)
    del dense, quant, columns
    torch.cuda.empty_cache()


def int4pack_weight(n: int, k: int, inner_k_tiles: int, codes: torch.Tensor | None = None):
    """(packed codes, bf16 scales_and_zeros [K / 32, N, 2]) for _weight_int4pack_mm: random codes unless `codes`
    (int [N, K] in 0..15) is given; two codes per byte, the even column in the high nibble."""
    if codes is None:
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    byte = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(byte.contiguous(), inner_k_tiles)
    scales_zeros = torch.stack([torch.rand(k // 32, n, device="cuda") * 0.01,
                                torch.randn(k // 32, n, device="cuda") * 0.01], -1).to(torch.bfloat16)
    return packed, scales_zeros


def check_int4pack() -> None:
    """Which weight _weight_int4pack_mm computes from code c, scale s and zero z: (c - 8) s + z expected."""
    n, k = 256, 1024
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
    packed, sz = int4pack_weight(n, k, 8, codes)
    s, z = (sz[..., i].float().t().repeat_interleave(32, 1) for i in (0, 1))
    x = torch.randn(3, k, dtype=torch.bfloat16, device="cuda")
    y = torch.ops.aten._weight_int4pack_mm(x, packed, 32, sz).float()
    for name, w in (("(c - 8) s + z", (codes - 8) * s + z), ("c s + z", codes * s + z)):
        want = x.float() @ w.t()
        print(f"check int4pack {name}: max error {(y - want).abs().max().item():.3g} of {want.abs().max().item():.3g}")


def bench_int4pack(n: int, k: int, rows: list[int]) -> None:
    """Per M: bf16 matmul, quant_linear's Q4_K default path, _weight_int4pack_mm at inner-K tiles 2, 4 and 8."""
    qbytes = n * k // BLOCK_SIZE["Q4_K"] * TYPE_SIZE["Q4_K"]
    dense = copies(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 2 * n * k)
    quant = copies(lambda: random_planes("Q4_K", n, k), qbytes)
    packs = {t: copies(lambda: int4pack_weight(n, k, t), n * k * 5 // 8) for t in (2, 4, 8)}
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        t_bf16 = time_rotating(lambda w: torch.matmul(x, w.t()), dense)
        t_q = time_rotating(lambda w: quant_linear(x, w, "Q4_K"), quant)
        path = linear_path(m, x.dtype, n * k, "Q4_K")
        line = (f"int4 {n:>6}x{k:<6} M={m:<4} bf16 {t_bf16:7.1f} us | Q4_K {path} {t_q:7.1f} us "
                f"{t_bf16 / t_q:5.2f}x")
        for tiles, weights in packs.items():
            t = time_rotating(lambda w: torch.ops.aten._weight_int4pack_mm(x, w[0], 32, w[1]), weights)
            line += f" | int4pack/{tiles} {t:7.1f} us {t_bf16 / t:5.2f}x {n * k * 5 / 8 / t / 1e3:5.0f} GB/s"
        print(line, flush=True)
    del dense, quant, packs
    torch.cuda.empty_cache()


STREAM_SWEEP = [(per_sm, warps) for per_sm in (4, 8, 12, 16, 20, 24, 32) for warps in (1, 2, 4, 8)]


def bench_stream(qtype: str, n: int, k: int) -> None:
    """One row of x: the streaming GEMV at its default launch and STREAM_SWEEP's, beside quant_dot's launch."""
    if qtype not in STREAM_TYPES:
        return
    from braid_kernels.int8_rows import quantize_rows

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    qbytes = n * k // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype]
    quant = copies(lambda: random_planes(qtype, n, k), qbytes)
    x = quantize_rows(torch.randn(1, k, dtype=torch.bfloat16, device="cuda"))
    out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    config = dot_launch_config(qtype, 1, n, num_sms, k)
    t_dot = time_rotating(lambda w: quant_linear(x, w, qtype, config=config, out=out), quant)
    want = out.float().clone()
    t_default = time_rotating(lambda w: launch_stream_gemv(x, w, qtype, out, num_sms), quant)
    default = "{} programs, {} warps".format(*default_stream_launch(x, quant[-1], qtype, out, num_sms))
    results = []
    for per_sm, warps in STREAM_SWEEP:
        try:
            launch_stream_gemv(x, quant[-1], qtype, out, num_sms, min(n, per_sm * num_sms), warps)
            error = ((out.float() - want).abs().max() / want.abs().max()).item()
            t = time_rotating(lambda w: launch_stream_gemv(x, w, qtype, out, num_sms, min(n, per_sm * num_sms),
                                                           warps), quant)
        except Exception as e:  # out of registers: skip it
            print(f"  ({per_sm}, {warps}) failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        results.append((t, per_sm, warps, error))
    results.sort()
    best = "; ".join(f"({p}, {w}) {t:.2f} us {qbytes / t / 1e3:.0f} GB/s" for t, p, w, _ in results[:3])
    print(f"{qtype:5} {n:>6}x{k:<6} dot launch {t_dot:7.2f} us {qbytes / t_dot / 1e3:5.0f} GB/s | stream default "
          f"({default}) {t_default:7.2f} us {qbytes / t_default / 1e3:5.0f} GB/s | best (programs/SM, warps) {best} | "
          f"max rel diff {max((r[3] for r in results), default=0.0):.1e}", flush=True)
    del quant
    torch.cuda.empty_cache()


def check(qtypes) -> None:
    """One comparison per type with the float32 dequantised matmul (the kernels' own tests are in tests/kernels)."""
    from braid_kernels.quant import dequantize, dequantize_torch
    for qtype in qtypes:
        gguf_blocks = random_blocks(qtype, 1024, 2048)
        blocks = to_planes(gguf_blocks, qtype)
        w = dequantize(blocks, qtype, torch.float32)
        same = torch.equal(w.view(torch.int32), dequantize_torch(gguf_blocks, qtype).view(torch.int32))
        print(f"check {qtype} Triton dequantize is the torch decoder's bit for bit: {same}")
        for m in (1, 3, 8, 64, 300):
            x = torch.randn(m, 2048, dtype=torch.bfloat16, device="cuda")
            want = x.float() @ w.t()
            err = (quant_linear(x, blocks, qtype).float() - want).abs().max().item()
            print(f"check {qtype} M={m}: max error {err:.3g} (output scale {want.abs().mean().item():.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qtypes", default="Q4_K,Q8_0,Q6_K,Q5_K,Q4_0,Q4_1")
    parser.add_argument("--rows", default="1,2,4,8,16,128,512")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--sweep", action="store_true", help="time SWEEP's GEMV configurations instead")
    parser.add_argument("--sweep-path", default="dot", choices=("dot", "gemv"),
                        help="the GEMV --sweep times: integer-dot (default) or float")
    parser.add_argument("--gemm", action="store_true", help="time quant_linear's paths (GEMV, GEMM, dequantise)")
    parser.add_argument("--gemm-sweep", action="store_true", help="with --gemm, also time GEMM configurations")
    parser.add_argument("--columns", action="store_true", help="time the column layout beside the row layout")
    parser.add_argument("--columns-sweep", action="store_true", help="with --columns, also time COLUMNS_SWEEP")
    parser.add_argument("--int4pack", action="store_true", help="time torch's int4 weight-only matmul beside Q4_K")
    parser.add_argument("--dequant", action="store_true",
                        help="time the dequantising kernel's configurations and dequantise + cuBLAS")
    parser.add_argument("--stream", action="store_true", help="time the streaming one-row GEMV's launches")
    parser.add_argument("--check", action="store_true", help="compare with the reference first")
    args = parser.parse_args()
    qtypes = args.qtypes.split(",")
    rows = [int(r) for r in args.rows.split(",")]
    if args.check:
        check(qtypes)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.int4pack:
        check_int4pack()
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        if args.int4pack:
            bench_int4pack(n, k, rows)
            continue
        for qtype in qtypes:
            if args.stream:
                bench_stream(qtype, n, k)
            elif args.dequant:
                bench_dequant(qtype, n, k, rows)
            elif args.columns:
                bench_columns(qtype, n, k, rows, args.columns_sweep)
            elif args.gemm:
                bench_gemm(qtype, n, k, rows, args.gemm_sweep)
            else:
                bench_shape(qtype, n, k, rows, SWEEP if args.sweep else None, args.sweep_path)


if __name__ == "__main__":
    main()
