"""Process-level settings that make XLA's CPU back end faster on this project's workloads (measurements:
docs/cpu-performance.md).

- ``xla_flags``, applied when the package is imported, before JAX starts a backend: Eigen rather than YNNPACK for
  CPU convolutions, and copy insertion with region analysis (no copy of each parameter before Adam updates it).
- ``keep_freed_memory``: glibc keeps freed memory in the heap instead of returning it to the kernel, so the large
  buffers XLA's CPU runtime allocates and frees every step do not cost page faults again. Called by ``run.py``
  only (it changes how the whole process allocates), never on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# XLA flags for CPU runs, each with the jaxlib versions [from, to) known to accept it (an unknown flag in
# XLA_FLAGS aborts the process, so a flag is only added for these).
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"  # Eigen convolutions
CPU_FLAGS = {
    CPU_CONV_FLAG: ((0, 10), (0, 12)),
    "--xla_cpu_copy_insertion_use_region_analysis=true": ((0, 10), (0, 11)),
}
OPT_OUT = "MRIRECON_CPU_DEFAULTS"  # =0 leaves XLA_FLAGS and the allocator alone

KEEPING_FREED_MEMORY = False  # set by keep_freed_memory (recorded by the benchmark)
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def xla_flags(environ=os.environ) -> list[str]:
    """Add the CPU_FLAGS that this jaxlib accepts to XLA_FLAGS (before JAX starts its backends), leaving alone any
    flag the user set themselves, and all of them with MRIRECON_CPU_DEFAULTS=0. Returns the flags added."""
    import jaxlib

    if environ.get(OPT_OUT, "1") == "0":
        return []
    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
    present = environ.get("XLA_FLAGS", "")
    added = [flag for flag, (first, end) in CPU_FLAGS.items()
             if first <= version < end and flag.split("=")[0] not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join([present] + added).strip()
    return added


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
