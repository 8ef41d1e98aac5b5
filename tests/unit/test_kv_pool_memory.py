"""The CPU KV pool is zeroed memory that becomes resident only where it is written: a 1 GiB pool (the default
cpu_kv_cache_bytes) of which a chat writes a few MiB no longer takes 1 GiB of RAM from the start."""
import sys

import pytest
import torch

from braidinfer.runner import _zeroed_pool

MIB = 1 << 20


def _resident_bytes(t: torch.Tensor) -> int:
    """Resident bytes of the mapping that holds `t` (its entry in /proc/self/smaps): the pool's own, whatever else
    the process allocates or frees meanwhile."""
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: "start-end perms offset dev inode ..."
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "Rss:":
                return int(fields[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_pool_is_zero_and_resident_only_where_written(dtype):
    layers = 256 * MIB // (1024 * 2 * 2 * 16 * 64 * dtype.itemsize)  # a 256 MiB pool
    pool = _zeroed_pool((layers, 1024, 2, 2, 16, 64), dtype, torch.device("cpu"))
    assert pool.shape == (layers, 1024, 2, 2, 16, 64) and pool.dtype == dtype and pool.is_contiguous()
    assert not pool.any()  # zero, as torch.zeros; reading it commits nothing
    slack = 8 * MIB  # transparent huge pages round a written range out to 2 MiB pages
    assert _resident_bytes(pool) < slack  # torch.zeros: the whole 256 MiB
    pool[1].fill_(1)  # one layer's slab: 1/layers of the pool
    slab = 256 * MIB // layers
    assert slab <= _resident_bytes(pool) < slab + slack
    assert pool[1].eq(1).all() and not pool[0].any() and not pool[2:].any()
    pool.fill_(2)
    assert _resident_bytes(pool) >= 256 * MIB  # the measurement sees a written pool
