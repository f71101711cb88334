"""The CPU-kernel executor: runs attention plans through the C kernels (kernels/), reading the pool
in place with no gathered copy; only the log-sum-exp merge of prefill rows stays in PyTorch."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from batchllm.attention.executor import ExecutorKind
from batchllm.attention.metadata import pad_rows
from batchllm.attention.plan import AttentionPlan
from batchllm.attention.select import SHARED_DECODE_MEMBERS
from batchllm.attention.torch_executor import DecodeBatch, TorchExecutor, TorchPrepared, decode_batch
from batchllm.attention.torch_ops import merge_attention
from batchllm.kernels.cpu import CpuKernels

CPU = torch.device("cpu")


@dataclass(frozen=True)
class PrefillChunks:
    """Query chunks over key sets for `CpuKernels.paged_prefill` (which documents the fields): key
    set s is keys 0 .. key_lens[s]-1 of block table key_tables[s] and owns chunks offsets[s] ..
    offsets[s+1]-1; chunk c is lens[c] queries from flat row rows[c], its query j seeing keys 0 ..
    limits[c]+j-1 (clamped to 0 .. key_lens[s])."""

    key_tables: torch.Tensor
    key_lens: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor
    lens: torch.Tensor
    limits: torch.Tensor

    @functools.cached_property
    def real_rows(self) -> torch.Tensor:
        """The flat rows the chunks cover, in order (built once, on first use)."""
        return torch.cat([torch.arange(r, r + n) for r, n in zip(self.rows.tolist(), self.lens.tolist())])


def prefill_chunks(key_sets: list[tuple[list[int], int, list[tuple[int, int, int]]]]) -> PrefillChunks:
    """`PrefillChunks` from key sets (block table, keys, chunks (first flat row, queries, first
    limit)); a causal chunk of q queries over t keys has first limit t - q + 1, a chunk that sees
    every key the key count."""
    chunks = [c for _, _, cs in key_sets for c in cs]
    offsets = [0, *itertools.accumulate(len(cs) for _, _, cs in key_sets)]

    def longs(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long)

    return PrefillChunks(pad_rows([b for b, _, _ in key_sets], CPU), longs([n for _, n, _ in key_sets]),
                         longs(offsets), longs([c[0] for c in chunks]), longs([c[1] for c in chunks]),
                         longs([c[2] for c in chunks]))


@dataclass(frozen=True)
class SharedDecodes:
    """Decode queries of group members for `CpuKernels.shared_decode` (prefix, own part and merge
    in one call): `rows` [N] flat rows, group by group (None: exactly 0..num_tokens-1), `offsets`
    [G+1], `prefix_blocks` [G, P] / `prefix_lens` [G], `own_blocks` [N, O] / `own_lens` [N]."""

    rows: torch.Tensor | None
    offsets: torch.Tensor
    prefix_blocks: torch.Tensor
    prefix_lens: torch.Tensor
    own_blocks: torch.Tensor
    own_lens: torch.Tensor


@dataclass(frozen=True)
class CpuPrepared:
    """One step's index tensors for `CpuExecutor.run`.

    `shared`: group members' decode queries (`shared_decode`); `decodes`: the other decode queries
    (`paged_decode`); with prefill in C, `own`: every prefill chunk over its own keys and
    `prefixes`: group members' prefill chunks over their prefix (one key set per group), one
    `paged_prefill` call each; otherwise `torch_prefills`, the prefill part for `TorchExecutor`.
    `need_lse`: some prefill rows are merged with a prefix pass.
    """

    shared: SharedDecodes | None
    decodes: DecodeBatch | None
    own: PrefillChunks | None
    prefixes: PrefillChunks | None
    torch_prefills: TorchPrepared | None
    need_lse: bool
    block_size: int


class CpuExecutor:
    """Runs plans through the C kernels on the CPU (float32 and bfloat16 only).

    Decode queries always run in C. Prefill chunks run in C (`paged_prefill`) when `prefill_in_c`;
    otherwise (no fast C path for the head size) in PyTorch, through `TorchExecutor`. The kernels
    have no lower key bounds and no soft-capping, so plans with a sliding window are refused
    (`select.make_executor` never picks this executor for models that have either).
    """

    def __init__(self, kernels: CpuKernels, prefill_in_c: bool = True) -> None:
        self.kernels = kernels
        self.prefill_in_c = prefill_in_c
        self.kind = ExecutorKind.CPU_KERNELS if prefill_in_c else ExecutorKind.CPU_DECODE_KERNELS
        self.torch = TorchExecutor(CPU)

    def prepare(self, plan: AttentionPlan) -> CpuPrepared:
        if plan.window is not None:
            raise ValueError("CpuExecutor runs no sliding-window plans (the C kernels have no lower key bound)")
        bs, dec, pre = plan.block_size, plan.decodes, plan.prefills
        shared = None
        members = [i for g in plan.groups for i in g.decodes]  # group by group
        if members:
            groups = [g for g in plan.groups if g.decodes]
            rows = [dec.rows[i] for i in members]
            shared = SharedDecodes(
                None if rows == list(range(plan.num_tokens)) else torch.tensor(rows, dtype=torch.long),
                torch.tensor([0, *itertools.accumulate(len(g.decodes) for g in groups)], dtype=torch.long),
                pad_rows([g.blocks for g in groups], CPU), torch.tensor([g.num_keys for g in groups], dtype=torch.long),
                pad_rows([dec.tables[i] for i in members], CPU),
                torch.tensor([dec.key_lens[i] for i in members], dtype=torch.long))
        in_group = set(members)
        others = [i for i in range(len(dec)) if i not in in_group] if in_group else list(range(len(dec)))
        decodes = decode_batch(plan, others, CPU) if others else None
        need_lse = plan.merges_prefills
        if not self.prefill_in_c:
            torch_part = self.torch.prepare_parts(plan, decodes=False) if len(pre) else None
            return CpuPrepared(shared, decodes, None, None, torch_part, need_lse, bs)
        own = prefill_chunks([(pre.tables[i], pre.key_lens[i], [(pre.rows[i], pre.num_rows[i], lim)])
                              for i, lim in enumerate(pre.first_limits())]) if len(pre) else None
        groups = [g for g in plan.groups if g.prefills]
        prefixes = prefill_chunks([(g.blocks, g.num_keys, [(pre.rows[i], pre.num_rows[i], g.num_keys)
                                                           for i in g.prefills]) for g in groups]) if groups else None
        return CpuPrepared(shared, decodes, own, prefixes, None, need_lse, bs)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: CpuPrepared,
            scale: float) -> torch.Tensor:
        """Same contract as `Executor.run`."""
        p, kern, bs = prepared, self.kernels, prepared.block_size
        sd, d = p.shared, p.decodes
        if sd is not None and sd.rows is None:  # every row is a group member's decode query
            return self._shared_decode(q, k_cache, v_cache, sd, bs, scale)
        if d is not None and d.rows is None:  # every row is an ungrouped decode query
            return kern.paged_decode(q, k_cache, v_cache, d.blocks, d.lens, bs, scale, need_lse=False)[0]
        out = torch.empty(q.shape, dtype=q.dtype)
        lse = torch.empty(q.shape[:2], dtype=torch.float32) if p.need_lse else None
        if d is not None:
            out[d.rows], _ = kern.paged_decode(q[d.rows], k_cache, v_cache, d.blocks, d.lens, bs, scale,
                                               need_lse=False)
        if p.own is not None:
            self._paged_prefill(q, k_cache, v_cache, p.own, bs, scale, out, lse)
        if p.prefixes is not None:
            assert lse is not None
            o_pre = torch.empty(q.shape, dtype=q.dtype)
            lse_pre = torch.empty(q.shape[:2], dtype=torch.float32)
            self._paged_prefill(q, k_cache, v_cache, p.prefixes, bs, scale, o_pre, lse_pre)
            rows = p.prefixes.real_rows
            out[rows] = merge_attention(o_pre[rows], lse_pre[rows], out[rows], lse[rows]).to(q.dtype)
        if p.torch_prefills is not None:
            out = self.torch.run_parts(q, k_cache, v_cache, p.torch_prefills, scale, out, lse)
        if sd is not None:
            out[sd.rows] = self._shared_decode(q[sd.rows], k_cache, v_cache, sd, bs, scale)
        return out

    def _shared_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sd: SharedDecodes,
                       bs: int, scale: float) -> torch.Tensor:
        return self.kernels.shared_decode(q, k_cache, v_cache, sd.offsets, sd.prefix_blocks, sd.prefix_lens,
                                          sd.own_blocks, sd.own_lens, bs, scale, SHARED_DECODE_MEMBERS)

    def _paged_prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, c: PrefillChunks,
                       bs: int, scale: float, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        self.kernels.paged_prefill(q, k_cache, v_cache, c.key_tables, c.key_lens, c.offsets, c.rows, c.lens,
                                   c.limits, bs, scale, out, lse)
