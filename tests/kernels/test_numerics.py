"""The device functions every kernel rounds with, and that the interpreter is on exactly when there is no GPU."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
import triton
import triton.language as tl

import braid_kernels
import braid_kernels.numerics as kernel_numerics
from braid_kernels.numerics import LAUNCH_OPTIONS, round_to_dtype, wait_for_inputs


def test_interpreted_exactly_when_there_is_no_cuda():
    assert kernel_numerics.INTERPRETED == (not torch.cuda.is_available())


def _launches(source: str) -> dict[str, str]:
    """Each `name[grid](...)` launch of a Triton kernel in `source`: kernel name -> the argument text."""
    out = {}
    for m in re.finditer(r"(_\w+_kernel)\[", source):
        start = source.index("(", source.index("]", m.end()))
        depth, i = 0, start
        while True:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            if depth == 0:
                break
            i += 1
        out.setdefault(m.group(1), "")
        out[m.group(1)] += source[start:i + 1]
    return out


def test_every_kernel_launched_with_pdl_waits_for_its_inputs():
    """A kernel launched with programmatic dependent launch (PDL_OPTIONS, or LAUNCH_OPTIONS, which holds them) may
    start before the kernel ahead of it ends: it must call wait_for_inputs first, or it could read stale inputs and
    break the stream order for the kernels after it. Checked in the source of every module of the package."""
    checked = 0
    for path in sorted(pathlib.Path(braid_kernels.__file__).parent.glob("*.py")):
        source = path.read_text()
        for name, args in _launches(source).items():
            if "PDL_OPTIONS" not in args and "LAUNCH_OPTIONS" not in args:
                continue
            body = source[source.index(f"def {name}("):]
            body = body[:body.find("\n@triton.jit") if "\n@triton.jit" in body else len(body)]
            assert "    wait_for_inputs()" in body, f"{path.name}: {name} is launched with PDL but never waits"
            checked += 1
    assert checked >= 10  # the decode path's kernels: norms, activation, GEMVs, attention, quantised kernels


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    wait_for_inputs()  # launched with LAUNCH_OPTIONS, hence with programmatic dependent launch on Hopper
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
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), DTYPE=tl_dtype, BLOCK=1024, **LAUNCH_OPTIONS)
    expected = x.to(dtype).float()
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))

    nan = torch.full((4,), float("nan"), device=device)
    _round_kernel[(1,)](nan, out, 4, DTYPE=tl_dtype, BLOCK=1024, **LAUNCH_OPTIONS)
    assert out[:4].isnan().all()
