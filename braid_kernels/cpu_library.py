"""Braid's C kernels for x86 CPUs (cpu_quant.c: quantised products; cpu_norm.c: RMSNorm, SiLU-and-mul;
cpu_attention.c: QK-norm, RoPE, the KV write and attention over the paged pool; cpu_program.c: a recorded sequence
of their calls made in one call), built into one shared library on first use and loaded through ctypes.

The library is compiled with the system's C compiler (`cc`, or $CC) into Braid's cache ($BRAID_CACHE, else
$XDG_CACHE_HOME/braid, else ~/.cache/braid, folder "kernels") under a name that carries the sources' and flags'
hash: about a second, once per machine and version. It needs Linux on x86-64 with AVX-512 (F, BW, VL, VNNI), F16C
and FMA; `available()` is False elsewhere, where there is no compiler, or where the build fails, and
`unavailable_reason()` says which. OpenMP comes from the runtime torch has loaded (the same libgomp.so.1), so a
caller's threads are the team torch's own ops use.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile

SOURCES = ("cpu_quant.c", "cpu_norm.c", "cpu_attention.c", "cpu_program.c")
HEADERS = ("cpu_simd.h",)
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c",
         "-mfma")

_p, _i, _n, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
SIGNATURES = {
    "braid_cpu_quant_linear": ((_p, _p, _n, _n, _p, _n, _i, _i), True, 7),
    "braid_cpu_rms_norm": ((_p, _p, _f, _p, _n, _n), False, None),
    "braid_cpu_add_rms_norm": ((_p, _p, _p, _f, _p, _p, _n, _n), False, None),
    "braid_cpu_silu_mul": ((_p, _p, _n, _n), False, None),
    "braid_cpu_attention": ((_p, _n, _n, _n, _n, _n, _p, _p, _n, _p, _p, _f, _p, _i, _n, _p, _p, _p, _p, _n, _f, _p,
                             _n, _i), True, 23),
    "braid_cpu_run": ((_p, _n, _p), True, None),
}
"""The library's entry points: (argument types, whether it returns a status (0: success, -2: out of memory), the
index of its OpenMP thread-count argument or None)."""

_reason: str | None = None  # why the library is unavailable, once tried
log = logging.getLogger(__name__)


def available() -> bool:
    """Whether the library runs here (see the module docstring)."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    library()
    return _reason


def build_dir() -> str:
    """Where the library is built: $BRAID_CACHE, else $XDG_CACHE_HOME/braid, else ~/.cache/braid; then "kernels"."""
    base = os.environ.get("BRAID_CACHE") or os.path.join(
        os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache"), "braid")
    return os.path.join(base, "kernels")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library with its functions' argument types, or None (the reason in unavailable_reason())."""
    global _reason
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        _reason = f"needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
        return None
    import torch  # noqa: F401  (loaded first, so that the library's libgomp.so.1 is torch's)

    try:
        lib = ctypes.CDLL(_build())
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        _reason = f"could not build or load Braid's CPU kernels: {error}"
        return None
    if not lib.braid_cpu_quant_supported():
        _reason = "this CPU lacks AVX-512 VNNI (or F16C/FMA)"
        return None
    for name, (args, status, _) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int if status else None
    return lib


def _build() -> str:
    """The library's path, compiled first if these sources and flags have not been built in build_dir()."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.join(here, name) for name in SOURCES]
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) found")
    digest = hashlib.sha256(" ".join((compiler,) + FLAGS).encode())
    for path in paths + [os.path.join(here, name) for name in HEADERS]:
        with open(path, "rb") as f:
            digest.update(f.read())
    target = os.path.join(build_dir(), f"braid_cpu-{digest.hexdigest()[:16]}.so")
    if os.path.exists(target):
        return target
    os.makedirs(build_dir(), exist_ok=True)
    log.info("compiling Braid's CPU kernels with %s into %s (once per machine and version)", compiler, target)
    with tempfile.TemporaryDirectory(dir=build_dir()) as tmp:  # built aside, then renamed: processes may race
        built = os.path.join(tmp, "braid_cpu.so")
        result = subprocess.run([compiler, *FLAGS, "-o", built, *paths], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target
