"""The CPU KV pool is zeroed memory that becomes resident only where it is written: a 1 GiB pool (the default
cpu_kv_cache_bytes) of which a chat writes a few MiB no longer takes 1 GiB of RAM from the start."""
import os
import sys

import pytest
import torch

from braidinfer.runner import _zeroed_pool

MIB = 1 << 20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_pool_is_zero_and_resident_only_where_written(dtype):
    layers = 256 * MIB // (1024 * 2 * 2 * 16 * 64 * dtype.itemsize)  # a 256 MiB pool
    before = _resident_bytes()
    pool = _zeroed_pool((layers, 1024, 2, 2, 16, 64), dtype, torch.device("cpu"))
    assert pool.shape == (layers, 1024, 2, 2, 16, 64) and pool.dtype == dtype and pool.is_contiguous()
    assert not pool.any()  # zero, as torch.zeros; reading it commits nothing
    assert _resident_bytes() - before < 32 * MIB  # torch.zeros: the whole 256 MiB
    pool[0].fill_(1)  # one layer's slab: 1/layers of the pool
    grown = _resident_bytes() - before
    assert 256 * MIB // layers <= grown < 256 * MIB // layers + 32 * MIB
    assert pool[0].eq(1).all() and not pool[1:].any()
    pool.fill_(2)
    assert _resident_bytes() - before >= 240 * MIB  # the measurement sees a written pool
