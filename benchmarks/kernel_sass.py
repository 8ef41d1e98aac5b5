"""The decode attention (braid_kernels/decode_attention.py) compiled offline for a GPU architecture as a CUDA-graph
decode launches it: registers, spills, shared memory, SASS instructions and barriers, and the layout conversions of
its Triton GPU IR by source line (each a round trip through shared memory between barriers). No GPU needed: Triton
compiles with its own ptxas. Run it with the Triton of the GPU machines (3.6) first on the import path, e.g.
`pip install --target /tmp/t36 --no-deps triton==3.6.0`, then

    PYTHONPATH=/tmp/t36 python benchmarks/kernel_sass.py [--layout 32,8,128] [--rows 1] [--splits 32] [--warps 4]
        [--stages 2] [--no-int8] [--arch 90]

--layout is q heads, KV heads, head_dim (default: the Llama-3.1-8B / Qwen3-8B layout); --splits the slices of the
graph's workspace (default_num_splits for a graph of --rows rows on 132 SMs); the launch is the graph decode's:
page tables read before the PDL wait, the first KV block prefetched, int8 output rows for o_proj without mul+add
contraction (--no-int8: the plain output, with it). Integer arguments are compiled as divisible by 16 and pointers
as 16-byte aligned, as Triton specializes a launch whose strides and buffers are (without that, the KV loads are not
vectorised and the counts mean little). Helpers here also serve benchmarks/stream_registers.py.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # braid_kernels reads it at import: compile for the GPU, not the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

attention = importlib.import_module("braid_kernels.decode_attention")  # the package's name is also a function's

ATTENTION_POINTERS = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "kv_indptr_ptr": "*i32", "kv_indices_ptr": "*i32",
                      "kv_last_page_len_ptr": "*i32", "out_ptr": "*bf16", "partial_out_ptr": "*fp32",
                      "partial_lse_ptr": "*fp32", "arrivals_ptr": "*i32", "q8_ptr": "*i8", "dx_ptr": "*fp32",
                      "sx_ptr": "*fp32"}
ATTENTION_INTS = ("min_split_tokens", "q_row_stride", "q_head_stride", "out_row_stride", "out_head_stride",
                  "cache_page_stride", "cache_kv_stride", "cache_head_stride", "cache_slot_stride")


def compile_offline(fn, pointers: dict, ints: tuple, floats: tuple, consts: dict, warps: int, stages: int | None,
                    arch: int, fp_fusion: bool = True):
    """The @triton.jit kernel fn compiled for sm_<arch>: pointers {name: Triton type} 16-byte aligned, ints as i32
    divisible by 16, floats as fp32, consts as constexprs; fp_fusion False as a launch with numerics.launch_options
    (no mul+add contraction)."""
    types = {**pointers, **dict.fromkeys(ints, "i32"), **dict.fromkeys(floats, "fp32"),
             **dict.fromkeys(consts, "constexpr")}
    missing = set(fn.arg_names) - set(types)
    if missing:
        raise SystemExit(f"{fn.__name__}: no type given for {sorted(missing)}")
    signature = {name: types[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in (*pointers, *ints)}
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    options = {"num_warps": warps, "enable_fp_fusion": fp_fusion}
    if stages is not None:
        options["num_stages"] = stages
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump(compiled, *flags: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> dict:
    """Registers a thread and stack bytes of the compiled kernel, read from its cubin."""
    usage = _cuobjdump(compiled, "-res-usage")
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    if regs is None:
        raise SystemExit(f"no register count in cuobjdump's output:\n{usage}")
    return {"registers": int(regs.group(1)), "stack": int(stack.group(1)) if stack else 0}


def registers(compiled) -> int:
    """Registers a thread of the compiled kernel."""
    return resource_usage(compiled)["registers"]


def sass_counts(compiled) -> dict:
    """Instructions of the compiled kernel's SASS, and how many are barriers (BAR) and local-memory spills (LDL,
    STL)."""
    sass = [line for line in _cuobjdump(compiled, "-sass").splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return {"instructions": len(sass), "barriers": sum(" BAR" in line for line in sass),
            "spills": sum(re.search(r"\b(LDL|STL)\b", line) is not None for line in sass)}


def conversions_by_line(compiled) -> collections.Counter:
    """The layout conversions (ttg.convert_layout) of the kernel's Triton GPU IR, counted by the source line they
    come from ("file:line"; the innermost location of a call chain)."""
    ttgir = compiled.asm["ttgir"]
    locs = dict(re.findall(r"^(#loc\d*) = (.*)$", ttgir, flags=re.M))

    def source(loc: str) -> str:
        for _ in range(64):  # a chain of callsites and names ends at a file location
            text = locs.get(loc, "")
            found = re.match(r'loc\("([^"]+)":(\d+)', text)
            if found:
                return f"{os.path.basename(found.group(1))}:{found.group(2)}"
            inner = re.findall(r"#loc\d*", text)
            if not inner:
                return "?"
            loc = inner[0]
        return "?"

    return collections.Counter(source(loc) for loc in re.findall(r"ttg\.convert_layout.*loc\((#loc\d*)\)", ttgir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="32,8,128", help="q heads, KV heads, head_dim")
    ap.add_argument("--rows", type=int, default=1, help="rows of the graph decode (sets the default --splits)")
    ap.add_argument("--splits", type=int, default=None, help="slices per (row, KV head); default as the graph's")
    ap.add_argument("--warps", type=int, default=None, help="default: decode_attention.default_num_warps")
    ap.add_argument("--stages", type=int, default=attention.NUM_STAGES)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-int8", action="store_true", help="the plain output (bf16 models), not int8 rows")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    args = ap.parse_args()
    qo, kv, head_dim = (int(v) for v in args.layout.split(","))
    splits = args.splits or attention.default_num_splits(args.rows, kv, head_dim, 132)
    warps = args.warps or attention.default_num_warps(splits, head_dim)
    group = qo // kv
    consts = dict(NUM_QO_HEADS=qo, NUM_KV_HEADS=kv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
                  HEAD_DIM=head_dim, PAGE_SIZE=args.page_size, BLOCK_N=attention.default_block_n(head_dim),
                  NUM_SPLITS=splits, GROUP_P2=triton.next_power_of_2(group),
                  MERGE_STEP=attention.merge_step(group, head_dim, splits), INT8=not args.no_int8, TABLES_FIRST=True,
                  KV_LINES=head_dim * 2 // 128 if attention.KV_PREFETCH else 0, PDL=True)
    compiled = compile_offline(attention._decode_kernel, ATTENTION_POINTERS, ATTENTION_INTS, ("qk_scale",), consts,
                               warps, args.stages, args.arch, fp_fusion=args.no_int8)  # as decode_attention launches
    counts, usage = sass_counts(compiled), resource_usage(compiled)
    print(f"Triton {triton.__version__}, sm_{args.arch}: _decode_kernel, {qo} q / {kv} KV heads of {head_dim}, "
          f"{splits} slices, {warps} warps, {args.stages} stages, {'plain' if args.no_int8 else 'int8'} output")
    print(f"registers {usage['registers']}, stack {usage['stack']} B, spill instructions {counts['spills']}, "
          f"shared {compiled.metadata.shared} B")
    print(f"SASS instructions {counts['instructions']}, barriers {counts['barriers']}")
    conversions = conversions_by_line(compiled)
    print(f"layout conversions {sum(conversions.values())}, by source line:")
    for where, n in conversions.most_common():
        print(f"  {n:>4}  {where}")


if __name__ == "__main__":
    main()
