"""C kernels for the CPU path: compiled on first use with the system C compiler, loaded with ctypes.

No build step at install time and no torch headers: the sources are plain C with OpenMP, built
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

from .signatures import declare, mismatches

HERE = Path(__file__).parent
SOURCES = [HERE / "decode.c", HERE / "prefill.c", HERE / "norm.c", HERE / "argmax.c", HERE / "bitmask.c"]  # built into one library
HEADERS = [HERE / "common.h", HERE / "pool.h", HERE / "pool_avx512.h"]
# NOTE: -march=native: the library is built on the machine that runs it (the CPU's flags are in
# the cache key). -fopenmp links libgomp.so.1, the soname torch's own OpenMP runtime has, so the
# kernels share torch's thread pool instead of starting a second one that competes for cores.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write
_PREFILL_ERRORS = {1: "chunk_offsets must run from 0 to the number of chunks, in order",
                   2: "a chunk has a negative length or rows outside q",
                   3: "a key count is negative or beyond its block table", 4: "out of memory"}


@dataclass(frozen=True)
class CpuKernels:
    """The loaded kernel library (`path`)."""

    lib: ctypes.CDLL
    path: Path

    @property
    def avx512_decode(self) -> bool:
        """Whether `paged_decode` runs its AVX-512 path for head sizes 64 and 128."""
        return bool(self.lib.avx512_decode())

    def fast_prefill(self, head_dim: int) -> bool:
        """Whether `paged_prefill` has a fast (AVX-512) path for `head_dim`; elsewhere it runs one
        query row at a time and PyTorch's matmul / flash attention is several times faster."""
        return self.avx512_decode and head_dim in (64, 128)

    @staticmethod
    def handles(x: torch.Tensor) -> bool:
        """True for the tensors the kernels take: float32 or bfloat16 on the CPU."""
        return x.device.type == "cpu" and x.dtype in DTYPES

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of the rows of x [rows, n] as transformers computes it (float32 statistics,
        rounded to x's dtype, times `weight` in that dtype). With `residual`, x += residual first,
        in place (x must then be contiguous): the residual stream of a decoder layer."""
        if x.dtype not in DTYPES or weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
            raise ValueError(f"rms_norm needs float32/bfloat16 tensors of one dtype, got {x.dtype}, {weight.dtype}")
        if residual is not None and not x.is_contiguous():
            raise ValueError("rms_norm adds the residual in place: x must be contiguous")
        x = x.contiguous()
        res = None if residual is None else residual.contiguous()
        out = torch.empty_like(x)
        n = x.shape[-1]
        self.lib.rms_norm(x.data_ptr(), None if res is None else res.data_ptr(), weight.contiguous().data_ptr(),
                          out.data_ptr(), x.numel() // max(n, 1), n, eps, int(x.dtype == torch.bfloat16),
                          torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of gate_up [rows, 2m] (gate first), each op rounded to the dtype as in
        PyTorch -> [rows, m]."""
        if gate_up.dtype not in DTYPES:
            raise ValueError(f"silu_mul needs float32/bfloat16, got {gate_up.dtype}")
        x = gate_up.contiguous()
        m = x.shape[-1] // 2
        out = torch.empty(*x.shape[:-1], m, dtype=x.dtype)
        self.lib.silu_mul(x.data_ptr(), out.data_ptr(), x.numel() // max(2 * m, 1), m, int(x.dtype == torch.bfloat16),
                          torch.get_num_threads())
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Index of each row's maximum, as `logits.argmax(-1)` (first maximum; first NaN if any):
        logits [rows, vocab] float32 or bfloat16 -> [rows] int64."""
        if logits.dim() != 2 or logits.dtype not in DTYPES:
            raise ValueError(f"argmax needs [rows, vocab] float32/bfloat16 logits, got {logits.dtype} "
                             f"{tuple(logits.shape)}")
        x = logits.contiguous()
        rows, n = x.shape
        out = torch.empty(rows, dtype=torch.int64)
        threads = torch.get_num_threads()
        work = torch.empty(threads, n if x.dtype == torch.bfloat16 else 0, dtype=torch.float32)
        if rows:
            self.lib.argmax_rows(x.data_ptr(), rows, n, int(x.dtype == torch.bfloat16), out.data_ptr(),
                                 work.data_ptr(), threads)
        return out

    def apply_token_bitmask(self, logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor,
                            threads: int = 1) -> None:
        """logits[rows[j], t] = -inf wherever bit t of bitmask row j is clear, in place.

        logits [R, vocab] float32 or bfloat16, contiguous; rows [n] int64 (distinct); bitmask
        [n, ceil(vocab / 32)] int32, llguidance's layout (bit t % 32 of word t // 32 = allowed).
        NOTE: one thread by default: the work is mostly storing -inf (1.0-1.5 ms for 256 x 32,000
        bf16 rows on the 2-core dev CPU), and beside a busy process two threads took 7.5-8 ms of CPU
        (a region waits for its descheduled thread)."""
        if logits.dim() != 2 or logits.dtype not in DTYPES or not logits.is_contiguous():
            raise ValueError(f"apply_token_bitmask needs contiguous [rows, vocab] float32/bfloat16 logits, got "
                             f"{logits.dtype} {tuple(logits.shape)}")
        n = logits.shape[1]
        if (bitmask.dtype != torch.int32 or not bitmask.is_contiguous() or bitmask.dim() != 2
                or bitmask.shape != (rows.numel(), (n + 31) // 32) or rows.dtype != torch.int64):
            raise ValueError(f"apply_token_bitmask needs an int32 bitmask [{rows.numel()}, {(n + 31) // 32}] and "
                             f"int64 rows, got {bitmask.dtype} {tuple(bitmask.shape)} and {rows.dtype}")
        if rows.numel() and not bool(((rows >= 0) & (rows < logits.shape[0])).all()):
            raise ValueError("apply_token_bitmask: a row index is outside the logits")
        rows = rows.contiguous()
        self.lib.apply_token_bitmask(logits.data_ptr(), n, int(logits.dtype == torch.bfloat16), rows.data_ptr(),
                                     rows.numel(), bitmask.data_ptr(), bitmask.shape[1], threads)

    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lens: torch.Tensor, block_size: int, scale: float,
                     need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode attention of one query per sequence straight from the paged pool.

        q: [B, H, d]; k_cache/v_cache: one layer's pool [kvh, slots, d]; block_tables: [B, nb]
        (padded); lens: [B] keys of each sequence, read from its blocks in order. q and the pool
        share one dtype (float32 or bfloat16). Returns (out [B, H, d] in q's dtype, lse [B, H]
        float32 or None); a sequence with 0 keys gets out 0 and lse -inf.
        """
        self._check_pool(q, k_cache, v_cache)
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

    def shared_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, offsets: torch.Tensor,
                      prefix_tables: torch.Tensor, prefix_lens: torch.Tensor, own_tables: torch.Tensor,
                      own_lens: torch.Tensor, block_size: int, scale: float, members_per_task: int) -> torch.Tensor:
        """Decode attention of prefix-sharing group members: each group's prefix read once for all
        its members' queries, each member's own part, merged by log-sum-exp.

        q: [N, H, d], group j's members in rows offsets[j] .. offsets[j+1]-1 (offsets [G+1]);
        prefix_tables [G, pnb] / prefix_lens [G]: each group's prefix keys; own_tables [N, onb] /
        own_lens [N]: each member's own keys (its blocks after the prefix). Pool and dtypes as
        `paged_decode`. Returns out [N, H, d] in q's dtype. `members_per_task` members share one
        pass over their group's prefix.
        """
        self._check_pool(q, k_cache, v_cache)
        n, heads, d = q.shape
        kvh, slots, _ = k_cache.shape
        q = q.contiguous()
        off, pbt, plen, obt, olen = (t.to(torch.int64).contiguous()
                                     for t in (offsets, prefix_tables, prefix_lens, own_tables, own_lens))
        out = torch.empty_like(q)
        if n == 0:
            return out
        threads = torch.get_num_threads()
        pmax, omax = pbt.shape[1] * block_size, max(obt.shape[1], 1) * block_size
        wsize = self.lib.shared_decode_work(heads, kvh, d, members_per_task, pmax, omax)
        work = torch.empty(threads, wsize, dtype=torch.float32)
        self.lib.shared_decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots, off.numel() - 1,
                               off.data_ptr(), pbt.data_ptr(), pbt.shape[1], plen.data_ptr(), obt.data_ptr(),
                               obt.shape[1], olen.data_ptr(), heads, kvh, d, block_size, scale,
                               int(q.dtype == torch.bfloat16), members_per_task, out.data_ptr(), work.data_ptr(),
                               wsize, threads)
        return out

    def paged_prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_tables: torch.Tensor,
                      key_lens: torch.Tensor, chunk_offsets: torch.Tensor, chunk_rows: torch.Tensor,
                      chunk_lens: torch.Tensor, chunk_limits: torch.Tensor, block_size: int, scale: float,
                      out: torch.Tensor, lse: torch.Tensor | None = None) -> None:
        """Attention of query chunks over key sets straight from the paged pool, into `out`/`lse`.

        Key set s: keys 0 .. key_lens[s]-1 of block table key_tables[s] ([S, nb], padded); its
        chunks are chunk_offsets[s] .. chunk_offsets[s+1]-1 ([S+1]). Chunk c: chunk_lens[c]
        queries (0: none) at flat rows chunk_rows[c] .. of q [N, H, d]; its query j sees keys 0 ..
        min(key_lens[s], chunk_limits[c] + j) - 1, none if that is below 1 (causal at positions
        p..: limit p + 1; all keys: key_lens[s]). Writes those rows of out [N, H, d] (q's dtype,
        contiguous) and of lse [N, H] float32 if given; a query that sees no key gets 0 and -inf.
        Pool and dtypes as `paged_decode`. Raises ValueError, writing nothing, when the offsets
        do not run 0 .. C in order, a chunk's rows fall outside q, or a key count is negative or
        more than its block table holds.
        """
        self._check_pool(q, k_cache, v_cache)
        n, heads, d = q.shape
        kvh, slots, _ = k_cache.shape
        if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
            raise ValueError("paged_prefill writes into a contiguous out of q's shape and dtype")
        if lse is not None and (lse.shape != (n, heads) or lse.dtype != torch.float32 or not lse.is_contiguous()):
            raise ValueError("paged_prefill writes lse into a contiguous float32 [N, H] tensor")
        q = q.contiguous()
        kbt, klen, off, rows, qlen, lim = (t.to(torch.int64).contiguous() for t in (
            key_tables, key_lens, chunk_offsets, chunk_rows, chunk_lens, chunk_limits))
        s = klen.numel()
        if s == 0 or rows.numel() == 0:
            return
        if off.numel() != s + 1 or qlen.numel() != rows.numel() or lim.numel() != rows.numel() or kbt.shape[0] != s:
            raise ValueError("paged_prefill: key_tables [S, nb], key_lens [S], chunk_offsets [S+1] and chunk_rows, "
                             "chunk_lens, chunk_limits [C] disagree in size")
        threads = torch.get_num_threads()
        is_bf16 = int(q.dtype == torch.bfloat16)
        wsize = self.lib.prefill_work(heads, kvh, kbt.shape[1] * block_size)
        work = torch.empty(threads, wsize, dtype=torch.float32)
        kpack = torch.empty(max(1, self.lib.prefill_pack(klen.data_ptr(), s, kvh, d, is_bf16)), dtype=torch.int32)
        err = self.lib.paged_prefill(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots, s, kbt.data_ptr(),
                                     kbt.shape[1], klen.data_ptr(), off.data_ptr(), rows.numel(), rows.data_ptr(),
                                     qlen.data_ptr(), lim.data_ptr(), n, heads, kvh, d, block_size, scale, is_bf16,
                                     out.data_ptr(), None if lse is None else lse.data_ptr(), kpack.data_ptr(),
                                     work.data_ptr(), wsize, threads)
        if err:
            raise (MemoryError if err == 4 else ValueError)("paged_prefill: " + _PREFILL_ERRORS[err])

    @staticmethod
    def _check_pool(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise ValueError(f"attention kernels need float32/bfloat16 q and pool of one dtype, got {q.dtype}, "
                             f"{k_cache.dtype}, {v_cache.dtype}")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("attention kernels need contiguous KV caches")


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
    texts = {f.name: f.read_bytes() for f in SOURCES + HEADERS}
    # A ctypes signature out of step with its C prototype would corrupt memory on the first call:
    # refuse to load instead (tests/test_kernel_signatures.py runs the same check).
    problems = mismatches({name: text.decode() for name, text in texts.items()})
    if problems:
        raise RuntimeError("batchllm: the ctypes signatures (kernels/signatures.py) disagree with the C kernels: "
                           + "; ".join(problems))
    src = b"".join(texts.values())
    key = hashlib.sha256(src + " ".join([cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    out = (directory or cache_dir() / "kernels") / f"attention-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=300)
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
    declare(lib)
    return CpuKernels(lib, out)
