"""Process-level glibc malloc settings for CPU inference (`EngineConfig.keep_heap`)."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# NOTE: why. Every step allocates many tensors of megabytes (gathered KV, GEMM outputs, fp32
# softmax scores). glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh
# mmap and unmaps them on free, and trims the heap top on free: the next step's tensor then
# page-faults every 4 KiB page in again. Measured on the 2-core dev CPU, bf16, A/B in separate
# processes: the reference decode attention of 256 sequences x 1,100 tokens (72 MB gathered per
# layer) 60 -> 20 ms; `bench/bench_generate.py --policies fcfs` 5.1 -> 4.1 s. vLLM's CPU docs
# get the same effect by preloading tcmalloc. The price: freed memory stays in the process (the
# resident size keeps its peak), which suits a batch job.


def keep_heap() -> bool:
    """Serve every allocation from malloc's heap (no mmap) and never trim it back to the OS.

    Process-wide and irreversible; returns False (and changes nothing) where the C library is
    not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # not glibc (macOS, musl)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
