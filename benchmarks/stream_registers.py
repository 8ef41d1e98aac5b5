"""Registers and shared memory of the streaming GEMV (braid_kernels/quant_stream.py) as compiled for a GPU
architecture, and whether its default launch fits an SM: no GPU needed (Triton compiles offline with its own ptxas,
and its bundled cuobjdump reads the result).

    python benchmarks/stream_registers.py [--qtypes Q4_K,Q6_K] [--shapes 4096x4096,4096x12288,...] [--arch 90]

For each matrix (N rows of K weights) the kernel is compiled at the launch's warps (stream_warps) with the
specialisation a real launch gets (pointers and sizes divisible by 16), and the table gives its registers a thread,
its shared memory, the programs per SM the default launch asks for (stream_programs) and how many an SM holds at
once (quant_stream.programs_that_fit at sm_90's limits: 64K registers in four partitions, allocated per warp in
units of 256; 228 KB of shared memory; 64 warps; 32 programs). Programs beyond those would run as a second wave (at
K = 12288 that cost Q4_K 15%, benchmarks/RESULTS.md); the launch reads the compiled kernel's registers and asks for
no more than fit (quant_stream.resident_programs), so the rows marked "bounded" are where that bound applies.
The registers depend on the Triton version: the GPU machines run the one the numbers in RESULTS.md name.
"""
from __future__ import annotations

import argparse

from kernel_sass import compile_offline, registers  # first: it sets up the import of braid_kernels for the GPU

import triton  # noqa: E402
from braid_kernels import quant_stream  # noqa: E402

# The two 8B shapes' streamed matrices (rows x columns): q/k, qkv, v, o, gate_up, down, lm_head
SHAPES = "5120x4096,6144x4096,1024x4096,4096x4096,28672x4096,24576x4096,4096x14336,4096x12288,128256x4096,151936x4096"
POINTERS = {"q_ptr": "*i8", "dx_ptr": "*fp32", "sx_ptr": "*fp32", "blocks_ptr": "*u8", "out_ptr": "*bf16"}
SIZES = ("N", "K", "row_bytes")


def compile_stream(qtype: str, k: int, warps: int, arch: int):
    """_stream_kernel compiled for sm_<arch> at rows of k weights of qtype on `warps` warps, with PDL."""
    consts = {**quant_stream._stream_consts(qtype, k), "PDL": True}
    return compile_offline(quant_stream._stream_kernel, POINTERS, SIZES, (), consts, warps, None, arch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtypes", default=",".join(quant_stream.STREAM_TYPES))
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated NxK (rows x weights a row)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch}")
    print(f"{'type':<6}{'N x K':>14}{'warps':>7}{'registers':>11}{'shared B':>10}{'asked/SM':>10}{'fit/SM':>8}")
    sms = 1  # stream_programs per SM: the count for one SM of a matrix with rows enough for every program
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for qtype in args.qtypes.split(","):
            if qtype not in quant_stream.STREAM_TYPES:
                raise SystemExit(f"{qtype} is not streamed (the streamed types: {quant_stream.STREAM_TYPES})")
            warps = quant_stream.stream_warps(qtype, n, k)
            compiled = compile_stream(qtype, k, warps, args.arch)
            regs, shared = registers(compiled), compiled.metadata.shared
            asked = quant_stream.stream_programs(1 << 30, k, sms)  # before the bound by `fit`
            fit = quant_stream.programs_that_fit(regs, shared, warps)  # sm_90's limits
            print(f"{qtype:<6}{f'{n}x{k}':>14}{warps:>7}{regs:>11}{shared:>10}{asked:>10}{fit:>8}"
                  f"{f'  bounded to {fit}' if asked > fit else ''}", flush=True)


if __name__ == "__main__":
    main()
