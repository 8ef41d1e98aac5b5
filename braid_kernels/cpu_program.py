"""A recorded sequence of calls into Braid's CPU kernels, made in one call: cpu_program.c through cpu_library.py.

`Program(calls)` holds the calls as cpu_program.c reads them (each kernel's arguments as 64-bit words, and which of
them to replace at each run); `program.run(bound)` makes them in order, after putting `bound[slot] + offset` into
the patched arguments (a caller's per-run pointers and thread count). One ctypes call instead of one a kernel: a
decoder layer's decode step is 8 kernel calls, and a ctypes call with 8-24 arguments costs microseconds.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence

from .cpu_library import SIGNATURES, library, unavailable_reason

KERNELS = ("braid_cpu_quant_linear", "braid_cpu_rms_norm", "braid_cpu_add_rms_norm", "braid_cpu_silu_mul",
           "braid_cpu_attention")
"""The kernels a program may call, in cpu_program.c's order (its enum)."""
MAX_PATCHES, MAX_ARGS = 12, 24  # as cpu_program.c


class _Op(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_int32), ("num_patches", ctypes.c_int32),
                ("patch_arg", ctypes.c_int32 * MAX_PATCHES), ("patch_slot", ctypes.c_int32 * MAX_PATCHES),
                ("patch_offset", ctypes.c_int64 * MAX_PATCHES), ("a", ctypes.c_int64 * MAX_ARGS)]


def _word(value, kind) -> int:
    """An argument as cpu_program.c holds it: pointers and integers as themselves, floats as their bits."""
    if isinstance(value, ctypes._SimpleCData):  # c_void_p (a weight's descriptor), c_float, c_long, ...
        value = value.value
    if kind is ctypes.c_float:
        return struct.unpack("<I", struct.pack("<f", value))[0]
    return 0 if value is None else int(value)


class Program:
    """calls: (kernel name from KERNELS, its arguments as its ctypes function takes them, patches: (argument index,
    slot, byte offset) each, the argument becoming bound[slot] + offset at every run). A run writes the patched
    arguments into the program: one thread at a time."""

    def __init__(self, calls: Sequence[tuple[str, Sequence, Sequence[tuple[int, int, int]]]]):
        if library() is None:
            raise RuntimeError(f"Braid's CPU kernels are unavailable: {unavailable_reason()}")
        self._ops = (_Op * len(calls))()
        self._slots = 0  # the bound array's length the patches need
        self._keep = [values for _, values, _ in calls]  # ctypes objects among them (a weight's descriptor)
        for op, (name, values, patches) in zip(self._ops, calls):
            if name not in KERNELS:
                raise ValueError(f"a program cannot call {name}")
            kinds = SIGNATURES[name][0]
            if len(values) != len(kinds) or len(patches) > MAX_PATCHES:
                raise ValueError(f"{name}: {len(values)} arguments for {len(kinds)}, {len(patches)} patches "
                                 f"(at most {MAX_PATCHES})")
            op.kernel, op.num_patches = KERNELS.index(name), len(patches)
            for i, (value, kind) in enumerate(zip(values, kinds)):
                op.a[i] = _word(value, kind)
            for j, (arg, slot, offset) in enumerate(patches):
                if not 0 <= arg < len(kinds) or slot < 0:
                    raise ValueError(f"{name}: a patch of argument {arg} from slot {slot}")
                op.patch_arg[j], op.patch_slot[j], op.patch_offset[j] = arg, slot, offset
                self._slots = max(self._slots, slot + 1)
        self._run = library().braid_cpu_run

    def run(self, bound: ctypes.Array) -> int:
        """Makes the calls; `bound` a ctypes int64 array holding every slot the patches name. Returns 0, or the first
        failing kernel's status (-1 arguments out of range, -2 no scratch memory; the calls after it not made)."""
        if len(bound) < self._slots or not isinstance(bound, ctypes.Array) or bound._type_ is not ctypes.c_int64:
            raise ValueError(f"bound must be a ctypes int64 array of at least {self._slots} slots")
        return self._run(self._ops, len(self._ops), bound)
