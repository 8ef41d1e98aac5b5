"""The device functions every kernel rounds with, and that the interpreter is on exactly when there is no GPU."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import triton
import triton.language as tl

import braid_kernels
import braid_kernels.numerics as kernel_numerics
from braid_kernels.numerics import launch_options, round_to_dtype, wait_for_inputs


def test_interpreted_exactly_when_there_is_no_cuda():
    assert kernel_numerics.INTERPRETED == (not torch.cuda.is_available())


def _kernels(tree: ast.Module):
    """The Triton kernels defined in a module: functions decorated with triton.jit (or triton.jit(...)) whose name
    ends in _kernel."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                ast.unparse(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in node.decorator_list):
            yield node


READ_BEFORE_WAIT = {"_stream_kernel": {"blocks_ptr"}, "_stream_pair_kernel": {"a_blocks_ptr", "b_blocks_ptr"},
                    "_decode_kernel": {"kv_indptr_ptr", "kv_indices_ptr", "kv_last_page_len_ptr"},
                    "_rms_norm_kernel": {"weight_ptr"},
                    "_qk_norm_rope_kernel": {"q_norm_ptr", "k_norm_ptr", "positions_ptr", "slot_mapping_ptr", "cos_ptr",
                                             "sin_ptr"}}
"""Kernels that load inputs no kernel of a decode step writes (weights, rotary tables; page tables, positions and
KV slots copied from the host) before waiting for the kernel ahead, and the pointers they may read then."""
PREFETCH_BEFORE_WAIT = {"_decode_kernel": {"cache_ptr"}}
"""Pointers that a kernel may only pass to a `_prefetch...` helper before its wait (L2 hints, which load nothing into
registers: the decode attention's first KV block, whose newest token the kernel ahead may still be writing)."""


def test_every_kernel_launched_with_pdl_waits_for_its_inputs():
    """A kernel launched with programmatic dependent launch (numerics.pdl_options / launch_options, which pass its
    PDL constexpr with Triton's launch_pdl) may start before the kernel ahead of it ends: its first statement must be
    wait_for_inputs(PDL), or it could read stale inputs and break the stream order for the kernels after it; only
    the kernels of READ_BEFORE_WAIT load their listed inputs (no other pointer, no store) first. A kernel that releases
    its dependents early does so right after its wait. Pointers of PREFETCH_BEFORE_WAIT go only to `_prefetch...`
    helpers before the wait. Checked on the syntax tree of every module of the package; a
    kernel without the PDL parameter cannot take those options (Triton rejects the unknown keyword)."""
    with_pdl = []
    for path in sorted(pathlib.Path(braid_kernels.__file__).parent.glob("*.py")):
        for kernel in _kernels(ast.parse(path.read_text())):
            if "PDL" not in [a.arg for a in kernel.args.args]:
                continue
            body = kernel.body[1:] if isinstance(kernel.body[0], ast.Expr) and isinstance(
                kernel.body[0].value, ast.Constant) else kernel.body  # after the docstring
            waits = [i for i, stmt in enumerate(body) if ast.unparse(stmt) == "wait_for_inputs(PDL)"]
            assert waits, f"{path.name}: {kernel.name} never waits"
            before = body[:waits[0]]
            if before:  # only kernels that read such inputs first, and nothing else that an earlier kernel may write
                pointers = {a.arg for a in kernel.args.args if a.arg.endswith("_ptr")}
                hinted = PREFETCH_BEFORE_WAIT.get(kernel.name, set())
                names = {n.id for stmt in before for n in ast.walk(stmt) if isinstance(n, ast.Name)} - hinted
                assert kernel.name in READ_BEFORE_WAIT, f"{path.name}: {kernel.name} does not wait first"
                assert names & pointers <= READ_BEFORE_WAIT[kernel.name], f"{kernel.name} reads inputs early"
                for call in (n for stmt in before for n in ast.walk(stmt) if isinstance(n, ast.Call)):
                    hints = {a.id for a in call.args if isinstance(a, ast.Name)} & hinted
                    assert not hints or ast.unparse(call.func).startswith("_prefetch"), (
                        f"{kernel.name} passes {hints} to {ast.unparse(call.func)} before waiting")
                hint_uses = sum(isinstance(n, ast.Name) and n.id in hinted for stmt in before for n in ast.walk(stmt))
                hint_args = sum(isinstance(a, ast.Name) and a.id in hinted for stmt in before for n in ast.walk(stmt)
                                if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("_prefetch")
                                for a in n.args)
                assert hint_uses == hint_args, f"{kernel.name} uses {hinted} before waiting other than to prefetch"
                assert "release_dependents" not in ast.unparse(before), f"{kernel.name} releases before waiting"
                assert "store" not in ast.unparse(before), f"{kernel.name} stores before waiting"
            # a release, alone or as the only statement of an `if` (the norms' `if INT8:`)
            released = [i for i, stmt in enumerate(body) if ast.unparse(stmt) == "release_dependents(PDL)"
                        or isinstance(stmt, ast.If) and [ast.unparse(s) for s in stmt.body] == [
                            "release_dependents(PDL)"] and not stmt.orelse]
            elsewhere = ast.unparse(ast.Module(body, [])).count("release_dependents(") - len(released)
            assert released in ([], [waits[0] + 1]) and not elsewhere, (
                f"{kernel.name} releases its dependents other than right after its wait")
            with_pdl.append(kernel.name)
    # the decode path's kernels: norms, activation, x rounding, GEMVs, attention, the quantised kernels
    assert {"_rms_norm_kernel", "_silu_and_mul_kernel", "_quantize_rows_kernel", "_gemv_kernel", "_dot_gemv_kernel",
            "_decode_kernel", "_qk_norm_rope_kernel", "_quant_gemm_kernel", "_dequantize_kernel",
            "_stream_kernel", "_stream_pair_kernel"} <= set(with_pdl)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)  # launched with launch_options: programmatic dependent launch on Hopper
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    tl.store(out_ptr + i, round_to_dtype(tl.load(x_ptr + i, mask=mask), DTYPE), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, casting 70000 to fp16
@pytest.mark.parametrize("dtype, tl_dtype", [(torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)])
def test_round_to_dtype_is_torchs_cast(device, dtype, tl_dtype):
    """Round to nearest, ties to even, overflow to inf, NaN kept: what x.to(dtype).float() gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=g) * torch.logspace(-6, 6, 2000)
    ties = torch.tensor([1.00390625, 1.01171875, -1.01171875, 1 + 3 * 2.0 ** -11, 255.5, 0.5 + 2.0 ** -9])
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.39e38, 1e-3, 70000.0, 65519.0])
    x = torch.cat([x, ties, edges]).to(device)
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), DTYPE=tl_dtype, BLOCK=1024, **launch_options(x))
    expected = x.to(dtype).float()
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))

    nan = torch.full((4,), float("nan"), device=device)
    _round_kernel[(1,)](nan, out, 4, DTYPE=tl_dtype, BLOCK=1024, **launch_options(nan))
    assert out[:4].isnan().all()


def test_pdl_options_per_device(device):
    """Programmatic dependent launch only for CUDA tensors on sm_90+ (decided at launch, not import); never on the
    CPU or under the interpreter, where the kernels take PDL=False and wait for nothing."""
    t = torch.zeros(1, device=device)
    options = kernel_numerics.pdl_options(t)
    hopper = t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
    assert options == ({"PDL": True, "launch_pdl": True} if hopper else {"PDL": False})
    assert kernel_numerics.launch_options(t) == {"enable_fp_fusion": False, **options}
