"""The Triton executor: runs attention plans on CUDA through the Triton kernels (kernels/triton/).

Per step, `prepare` turns the plan into one work list (`triton_work.build_work`). Per layer, `run`
is one `attend_tiles` launch over every item of the step (prefill tiles, decode queries or their
KV segments, group prefix tiles, longest first), plus one `merge_partials` launch when some row
has more than one result (a group member, a split decode). GEMMs stay in torch. Imports triton:
only `select.make_executor` imports this module, and only for CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from batchllm.attention.executor import ExecutorKind
from batchllm.attention.plan import AttentionPlan
from batchllm.attention.select import (TRITON_BLOCK_N, TRITON_MIN_SEGMENT, TRITON_PROGRAMS_PER_SM,
                                       TRITON_TILE_ROWS)
from batchllm.attention.triton_work import WorkList, WorkShape, _pow2, build_work, row_choices
from batchllm.kernels.triton.attend import attend_tiles
from batchllm.kernels.triton.merge import merge_partials


# NOTE: `triton.jit` returns an interpreted function when TRITON_INTERPRET=1 was set at import.
INTERPRETED = not isinstance(attend_tiles, triton.runtime.JITFunction)


def _block_d(head_dim: int) -> int:
    """Head size padded: `tl.arange` takes powers of two, `tl.dot` needs K >= 16."""
    return max(16, _pow2(head_dim))


@dataclass(frozen=True)
class TritonPrepared:
    work: WorkList
    block_size: int


class TritonExecutor:
    """Runs plans with the Triton kernels: float32, bfloat16 or float16; any head size (padded to
    a power of two of at least 16); GQA with any heads-per-KV-head ratio."""

    kind = ExecutorKind.TRITON

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, num_sms: int | None = None) -> None:
        self.device = device
        self.g, self.kv_heads = num_heads // num_kv_heads, num_kv_heads
        if num_sms is None:  # the interpreter (CPU tensors) gets a small GPU's worth, so tests split KV too
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        self.shape = WorkShape(TRITON_TILE_ROWS, TRITON_BLOCK_N, TRITON_PROGRAMS_PER_SM * num_sms, TRITON_MIN_SEGMENT)
        self.upcast = INTERPRETED  # the interpreter's bf16/fp16 arithmetic is wrong: fp32 there

    def prepare(self, plan: AttentionPlan) -> TritonPrepared:
        return TritonPrepared(build_work(plan, self.g, self.kv_heads, self.shape, self.device), plan.block_size)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: TritonPrepared,
            scale: float) -> torch.Tensor:
        """Same contract as `Executor.run`."""
        w = prepared.work
        t, heads, d = q.shape
        kvh = k_cache.shape[0]
        assert heads == self.g * kvh == self.g * self.kv_heads, (heads, kvh)
        assert q.stride(2) == k_cache.stride(2) == v_cache.stride(2) == 1  # head_dim contiguous
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if w.num_items == 0:
            return out
        if w.direct:
            dst, lse = out, out  # WRITE_LSE off: the lse pointer is never read or written
        else:
            dst = torch.empty((w.num_partials, heads, d), dtype=torch.float32, device=q.device)
            lse = torch.empty((w.num_partials, heads), dtype=torch.float32, device=q.device)
        attend_tiles[(w.num_items, kvh)](
            q, k_cache, v_cache, dst, lse, w.off, w.n, w.table, w.lo, w.hi, w.shift, w.row, w.limit, w.dst, w.tables,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            dst.stride(0), dst.stride(1), lse.stride(0), w.tables.stride(0), d,
            scale * 1.4426950408889634,  # log2(e): the kernel's softmax is in base 2 (exp2)
            **attend_constants(q.dtype, d, self.g, w.block_m, self.shape.block_n, prepared.block_size, not w.direct,
                               self.upcast))
        if not w.direct:
            merge_partials[(t,)](dst, lse, out, w.row_off, dst.stride(0), dst.stride(1), lse.stride(0),
                                 out.stride(0), out.stride(1), heads, d, **merge_constants(heads, d))
        return out


def attend_constants(dtype: torch.dtype, head_dim: int, g: int, block_m: int, block_n: int, block_size: int,
                     write_lse: bool, upcast: bool = False) -> dict:
    """`attend_tiles`' compile-time arguments for one launch (one specialisation per distinct dict)."""
    return dict(G=g, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), BLOCK_SIZE=block_size,
                WRITE_LSE=write_lse, UPCAST=upcast and dtype != torch.float32,
                # fp32 engines compare with the PyTorch executor at 1e-5: no tf32 (ignored for bf16/fp16)
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def merge_constants(num_heads: int, head_dim: int) -> dict:
    """`merge_partials`' compile-time arguments."""
    return dict(BLOCK_H=_pow2(num_heads), BLOCK_D=_block_d(head_dim))


def specialisations(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                    tile_rows: int = TRITON_TILE_ROWS) -> list[tuple[str, dict]]:
    """Every (kernel name, compile-time arguments) an engine of this shape can launch: decode-only
    steps and tile steps, each with and without lse, and the merge. The tests compile each of them
    ahead of time for sm_90."""
    g = num_heads // num_kv_heads
    out = [("attend_tiles", attend_constants(dtype, head_dim, g, m, TRITON_BLOCK_N, block_size, lse))
           for m in sorted(set(row_choices(g, tile_rows))) for lse in (False, True)]
    return out + [("merge_partials", merge_constants(num_heads, head_dim))]
