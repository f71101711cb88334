"""C kernels for the CPU path: compiled on first use with the system C compiler, loaded with ctypes.

No build step at install time and no torch headers: `attention.c` is plain C with OpenMP, built
once per source, compiler and CPU into `kernels/` of the cache folder (`config.cache_dir`).
Without a working C compiler `load_cpu_kernels` returns None and callers keep their PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from batchllm.config import cache_dir

SOURCE = Path(__file__).with_name("attention.c")
# NOTE: -march=native: the library is built on the machine that runs it (the CPU's flags are in
# the cache key). -fopenmp links libgomp.so.1, the soname torch's own OpenMP runtime has, so the
# kernels share torch's thread pool instead of starting a second one that competes for cores.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p]


@dataclass(frozen=True)
class CpuKernels:
    """The loaded kernel library (`path`)."""

    lib: ctypes.CDLL
    path: Path

    @property
    def avx512_decode(self) -> bool:
        """Whether `paged_decode` runs its AVX-512 path for head sizes 64 and 128."""
        return bool(self.lib.avx512_decode())

    @staticmethod
    def handles(x: torch.Tensor) -> bool:
        """True for the tensors the kernels take: float32 or bfloat16 on the CPU."""
        return x.device.type == "cpu" and x.dtype in DTYPES

    def softmax_lse_(self, scores: torch.Tensor, limits: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Softmax of `scale * scores` over the last dim, in place, keeping only the first
        `limits[...]` keys of each row (the rest become 0); returns the log-sum-exp [...] float32.

        scores: contiguous float32 or bfloat16 CPU tensor [..., T]. limits: integer tensor
        broadcastable to scores.shape[:-1] (None: every key). A row with limit 0 becomes 0 with lse
        -inf, so it merges as an empty part.
        """
        if not scores.is_contiguous() or scores.dtype not in DTYPES:
            raise ValueError(f"softmax_lse_ needs a contiguous float32/bfloat16 tensor, got {scores.dtype}")
        cols = scores.shape[-1]
        rows = scores.numel() // max(cols, 1)
        if limits is None:
            lim = torch.full((rows,), cols, dtype=torch.int32)
        else:
            lim = limits.to(torch.int32).expand(scores.shape[:-1]).contiguous()
        lse = torch.empty(scores.shape[:-1], dtype=torch.float32)
        if rows == 0:
            return lse
        threads = torch.get_num_threads()
        args = [scores.data_ptr(), rows, cols, lim.data_ptr(), scale, lse.data_ptr()]
        if scores.dtype == torch.float32:
            self.lib.softmax_lse_f32(*args, threads)
        else:
            work = torch.empty(threads, cols, dtype=torch.float32)
            self.lib.softmax_lse_bf16(*args, work.data_ptr(), threads)
        return lse

    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lens: torch.Tensor, block_size: int, scale: float,
                     need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode attention of one query per sequence straight from the paged pool.

        q: [B, H, d]; k_cache/v_cache: one layer's pool [kvh, slots, d]; block_tables: [B, nb]
        (padded); lens: [B] keys of each sequence, read from its blocks in order. q and the pool
        share one dtype (float32 or bfloat16). Returns (out [B, H, d] in q's dtype, lse [B, H]
        float32 or None); a sequence with 0 keys gets out 0 and lse -inf.
        """
        if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise ValueError(f"paged_decode needs float32/bfloat16 q and pool of one dtype, got {q.dtype}, "
                             f"{k_cache.dtype}, {v_cache.dtype}")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("paged_decode needs contiguous KV caches")
        b, heads, d = q.shape
        kvh, slots, _ = k_cache.shape
        q = q.contiguous()
        bt = block_tables.to(torch.int64).contiguous()
        ln = lens.to(torch.int64).contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(b, heads, dtype=torch.float32) if need_lse else None
        if b == 0:
            return out, lse
        threads = torch.get_num_threads()
        work = torch.empty(threads, heads // kvh, max(bt.shape[1], 1) * block_size, dtype=torch.float32)
        self.lib.paged_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots, bt.data_ptr(), bt.shape[1],
                              ln.data_ptr(), b, heads, kvh, d, block_size, scale, int(q.dtype == torch.bfloat16),
                              out.data_ptr(), None if lse is None else lse.data_ptr(), work.data_ptr(), threads)
        return out, lse


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def load_cpu_kernels(directory: Path | None = None, portable: bool = False) -> CpuKernels | None:
    """Build (once) and load the CPU kernels; None, with a warning, where that is not possible.

    portable=True builds without the instruction-set-specific paths (the reference they are
    tested against).

    NOTE: cached per process: every engine in a process shares the one loaded library.
    """
    wanted = os.environ.get("CC") or "cc"
    cc = shutil.which(wanted) or (None if os.environ.get("CC") else shutil.which("gcc"))
    if cc is None:
        warnings.warn(f"batchllm: no C compiler found ({wanted}); CPU attention uses its PyTorch path", stacklevel=2)
        return None
    flags = [*FLAGS, "-DBATCHLLM_PORTABLE"] if portable else FLAGS
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    out = (directory or cache_dir() / "kernels") / f"attention-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
            error = proc.stderr[-2000:] if proc.returncode != 0 else None
        except (OSError, subprocess.TimeoutExpired) as e:
            error = str(e)
        if error is not None:
            os.unlink(tmp)
            warnings.warn(f"batchllm: compiling CPU kernels failed ({cc}); CPU attention uses its PyTorch "
                          f"path:\n{error}", stacklevel=2)
            return None
        os.replace(tmp, out)  # atomic: a concurrent process sees the old state or the whole library
    lib = ctypes.CDLL(str(out))
    lib.softmax_lse_f32.argtypes = [*_ARGS, ctypes.c_int]
    lib.softmax_lse_bf16.argtypes = [*_ARGS, ctypes.c_void_p, ctypes.c_int]
    lib.paged_decode.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                          ctypes.c_void_p] + [ctypes.c_int64] * 5 + [
        ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.softmax_lse_f32.restype = lib.softmax_lse_bf16.restype = lib.paged_decode.restype = None
    lib.avx512_decode.argtypes, lib.avx512_decode.restype = [], ctypes.c_int
    return CpuKernels(lib, out)
