"""Process-level settings that make XLA's CPU back end faster on this project's workloads.

Measured on the 2-core Xeon (jax 0.10.2), thesis U-Net train step at 64 px, batch 8, f32 — see models/conv.py for
the convolution formulations themselves:

- ``xla_flags``: Eigen rather than YNNPACK for CPU convolutions (0.84 -> 0.75 s per step). Applied when the
  package is imported, before JAX starts a backend.
- ``keep_freed_memory``: XLA's CPU runtime allocates and frees a ~290 MB temporary arena and several ~75 MB
  convolution buffers every step; glibc hands each back to the kernel, so every step pays ~70,000 page faults
  again (0.75 -> 0.71 s). Keeping freed memory in the heap removes them. Called by ``run.py`` only (it changes
  how the whole process allocates), never on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# XLA flag that sends CPU convolutions to Eigen instead of YNNPACK, and the jaxlib versions known to accept it
# (an unknown flag in XLA_FLAGS aborts the process, so it is only added for these).
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
CPU_CONV_FLAG_JAXLIB = ((0, 10), (0, 12))  # [from, to)
OPT_OUT = "MRIRECON_CPU_DEFAULTS"  # =0 leaves XLA_FLAGS and the allocator alone

KEEPING_FREED_MEMORY = False  # set by keep_freed_memory (recorded by the benchmark)
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def xla_flags(environ=os.environ) -> bool:
    """Add CPU_CONV_FLAG to XLA_FLAGS (before JAX starts its backends), unless the user set that flag themselves,
    opted out with MRIRECON_CPU_DEFAULTS=0, or this jaxlib is outside CPU_CONV_FLAG_JAXLIB.
    Returns whether the flag is in XLA_FLAGS afterwards."""
    import jaxlib

    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return CPU_CONV_FLAG in flags.split()
    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    if environ.get(OPT_OUT, "1") == "0" or not CPU_CONV_FLAG_JAXLIB[0] <= version < CPU_CONV_FLAG_JAXLIB[1]:
        return False
    environ["XLA_FLAGS"] = f"{flags} {CPU_CONV_FLAG}".strip()
    return True


def keep_freed_memory(environ=os.environ) -> bool:
    """Tell glibc's malloc to serve every allocation from one heap and never return freed memory to the kernel
    (no mmap for large blocks, no trimming). Returns False where that is not possible (not glibc) or opted out."""
    if environ.get(OPT_OUT, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global KEEPING_FREED_MEMORY
    KEEPING_FREED_MEMORY = all(mallopt(param, value) == 1 for param, value in
                               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    return KEEPING_FREED_MEMORY
