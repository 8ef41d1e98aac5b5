"""braid_kernels/cpu_program: a recorded sequence of kernel calls made in one call computes what the same calls
made one by one through ctypes compute (bit for bit), with the patched arguments taken from the bound array at each
run; a kernel's failure status stops the run."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from braid_kernels import cpu_library, cpu_norm, cpu_quant
from tests.support.gguf_quant import quantize

pytestmark = pytest.mark.skipif(not cpu_library.available(), reason=f"{cpu_library.unavailable_reason()}")


def test_program_equals_the_calls_one_by_one():
    from braid_kernels.cpu_program import Program

    rng = np.random.default_rng(0)
    m, k, n = 3, 64, 96
    weight = cpu_quant.pack(torch.from_numpy(quantize(rng.standard_normal((n, k)).astype(np.float32), "Q4_1")),
                            "Q4_1")
    w = torch.from_numpy(rng.standard_normal(k).astype(np.float32))
    normed, out, act = torch.empty(m, k), torch.empty(m, n), torch.empty(m, n // 2)
    x_slot, threads_slot = 1, 0
    program = Program([
        ("braid_cpu_rms_norm", (0, w.data_ptr(), 1e-5, normed.data_ptr(), m, k), [(0, x_slot, 0)]),
        ("braid_cpu_quant_linear", (weight._struct, normed.data_ptr(), m, k, out.data_ptr(), n, 2, 1),
         [(7, threads_slot, 0)]),
        ("braid_cpu_silu_mul", (out.data_ptr(), act.data_ptr(), m, n // 2), []),
    ])
    bound = (ctypes.c_int64 * 2)()
    for seed in range(3):  # new x at each run, through the bound array
        x = torch.randn(m + 1, k, generator=torch.Generator().manual_seed(seed))
        bound[x_slot], bound[threads_slot] = x[1:].data_ptr(), 2  # x's rows from its second on
        assert program.run(bound) == 0
        expected = cpu_norm.silu_and_mul(cpu_quant.linear(cpu_norm.rms_norm(x[1:].contiguous(), w, 1e-5), weight))
        assert torch.equal(act, expected)


def test_a_failing_kernel_stops_the_run_and_bad_programs_are_refused():
    from braid_kernels.cpu_program import Program

    rng = np.random.default_rng(1)
    weight = cpu_quant.pack(torch.from_numpy(quantize(rng.standard_normal((32, 32)).astype(np.float32), "Q8_0")),
                            "Q8_0")
    x, out, after = torch.ones(1, 32), torch.zeros(1, 32), torch.zeros(1, 16)
    program = Program([
        ("braid_cpu_quant_linear", (weight._struct, x.data_ptr(), 1, 32, out.data_ptr(), 32, 3, 1), []),  # 3 terms
        ("braid_cpu_silu_mul", (x.data_ptr(), after.data_ptr(), 1, 16), []),
    ])
    assert program.run((ctypes.c_int64 * 1)()) == -1
    assert not after.any()  # the call after the failing one was not made
    with pytest.raises(ValueError, match="cannot call"):
        Program([("braid_cpu_run", (0, 0, 0), [])])
    with pytest.raises(ValueError, match="arguments"):
        Program([("braid_cpu_silu_mul", (0, 0, 1), [])])
    with pytest.raises(ValueError, match="patch of argument 4"):
        Program([("braid_cpu_silu_mul", (0, 0, 1, 1), [(4, 0, 0)])])
    with pytest.raises(ValueError, match="at least 3 slots"):  # a patch reads slot 2
        Program([("braid_cpu_silu_mul", (0, after.data_ptr(), 0, 16), [(0, 2, 0)])]).run((ctypes.c_int64 * 2)())
