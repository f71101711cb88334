"""The PyTorch executor: runs any attention plan with PyTorch ops alone, on any device and dtype.

It is the reference every other executor is tested against (and whose greedy float32 outputs
the engine tests compare with transformers'), so it calls no C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchllm.attention.executor import ExecutorKind
from batchllm.attention.metadata import pad_rows
from batchllm.attention.plan import AttentionPlan
from batchllm.attention.select import GROUP_BUCKET_SLACK, GROUP_MAX_BUCKETS, MAX_ROWS, PREFILL_BUCKET_SLACK
from batchllm.attention.torch_buckets import (GroupBucket, PrefillBucket, attend_bucket, attend_group_bucket,
                                              bucketize, group_buckets, prefill_bucket)
from batchllm.attention.torch_ops import attend_decode, merge_attention


@dataclass(frozen=True)
class DecodeBatch:
    """Decode queries attended in one padded batch: flat `rows` [B] (None: exactly the step's rows
    0..num_tokens-1), block tables `blocks` [B, nb] and key counts `lens` [B] of their own keys."""

    rows: torch.Tensor | None
    blocks: torch.Tensor
    lens: torch.Tensor


def decode_batch(plan: AttentionPlan, indices: list[int], dev: torch.device) -> DecodeBatch:
    """The decode queries `indices` (into `plan.decodes`, in flat-row order) as one batch."""
    d = plan.decodes
    every = len(indices) == plan.num_tokens  # rows in order and all of them
    return DecodeBatch(None if every else torch.tensor([d.rows[i] for i in indices], dtype=torch.long, device=dev),
                       pad_rows([d.tables[i] for i in indices], dev),
                       torch.tensor([d.key_lens[i] for i in indices], dtype=torch.long, device=dev))


@dataclass(frozen=True)
class TorchPrepared:
    """One step's index tensors for `TorchExecutor.run`.

    `decodes`: the decode queries (None: none here), with their lse where `decode_lse` (some are
    group members); `prefills`: prefill chunks attended without lse (an unshared plan's);
    `prefills_lse`: prefill chunks attended with their lse (a sharing plan's), cut into pieces of
    at most `max_rows`; `groups`: the group prefix passes, merged into their members' rows.
    `need_lse`: the step keeps an lse per row. `window`: the plan's sliding window (None: none).
    """

    decodes: DecodeBatch | None
    decode_lse: bool
    prefills: list[PrefillBucket]
    prefills_lse: list[PrefillBucket]
    groups: list[GroupBucket]
    need_lse: bool
    block_size: int
    window: int | None = None


class TorchExecutor:
    """Runs plans in PyTorch: decode queries in one padded gather + `attend`; prefill chunks in
    padded buckets under SDPA (on a sharing plan with their lse, by `attend_queries` /
    `attend_causal`); each group's prefix gathered once for all its members' stacked query rows,
    groups padded into buckets, then log-sum-exp merged with the members' own parts.

    `max_rows` bounds the query rows of one pass where scores or masks are materialised (a group's
    stacked rows, a prefill piece attended with its lse): see `select.MAX_ROWS`. `softcap`: the
    model's attention-logit soft-capping (None: none), applied in every pass. A windowed plan's
    rows get their lower key bounds in every pass too (group prefix passes need none: see
    attention/plan.py).
    """

    kind = ExecutorKind.TORCH

    def __init__(self, device: torch.device, max_rows: int = MAX_ROWS, softcap: float | None = None) -> None:
        self.device = device
        self.max_rows = max_rows
        self.softcap = softcap

    def prepare(self, plan: AttentionPlan) -> TorchPrepared:
        return self.prepare_parts(plan, decodes=True)

    def prepare_parts(self, plan: AttentionPlan, decodes: bool) -> TorchPrepared:
        """The plan's prefill chunks and group prefix passes, with its decode queries if `decodes`
        (otherwise another executor runs those, and group prefixes cover prefill members only)."""
        dev, bs, pre = self.device, plan.block_size, plan.prefills
        batch = decode_batch(plan, list(range(len(plan.decodes))), dev) if decodes and len(plan.decodes) else None
        # A sharing plan attends all its prefill chunks with their lse, in one set of buckets
        # (fewer, fuller buckets than keeping the merged chunks apart); rows that are not merged
        # leave their lse unread. An unshared plan needs no lse: SDPA.
        with_lse = range(len(pre)) if plan.prefix_shared else range(0)
        chunks = [] if plan.prefix_shared else [(pre.num_rows[i], pre.key_lens[i], pre.rows[i], pre.tables[i])
                                               for i in range(len(pre))]
        pieces = []  # (q_len, key_len, first flat row, blocks) of the pieces attended with their lse
        for i in with_lse:
            n, t, row, table = pre.num_rows[i], pre.key_lens[i], pre.rows[i], pre.tables[i]
            if t == n:  # fresh: one causal piece, never cut (the flash kernel needs no mask for it)
                pieces.append((n, n, row, table))
                continue
            for c in range(0, n, self.max_rows):
                # Piece c .. c+nc of the chunk: its queries sit at own positions t-(n-c) .. and
                # the last one sees own keys 0 .. t-n+c+nc-1, so it needs no more keys than that.
                nc = min(self.max_rows, n - c)
                pieces.append((nc, t - n + c + nc, row + c, table))
        prefixes = []  # (prefix blocks, prefix keys, member rows in flat order) per group
        for g in plan.groups:
            rows = [r for i in g.prefills for r in range(pre.rows[i], pre.rows[i] + pre.num_rows[i])]
            if decodes and g.decodes:
                drows = [plan.decodes.rows[i] for i in g.decodes]
                rows = sorted(drows + rows) if rows else drows
            if rows:
                prefixes.append((g.blocks, g.num_keys, rows))
        decode_lse = decodes and plan.merges_decodes
        return TorchPrepared(
            batch, decode_lse, self._buckets(chunks, bs, plan.window), self._buckets(pieces, bs, plan.window),
            group_buckets(prefixes, plan.num_tokens, self.max_rows, GROUP_BUCKET_SLACK, GROUP_MAX_BUCKETS, dev),
            bool(prefixes or pieces), bs, plan.window)

    def _buckets(self, chunks: list[tuple[int, int, int, list[int]]], block_size: int,
                 window: int | None) -> list[PrefillBucket]:
        """Prefill chunks (q_len, key_len, first row, blocks) in buckets; fresh chunks (q_len ==
        key_len, which may run under the causal flag) and continuing ones kept apart."""
        shapes = [(c[0], c[1]) for c in chunks]
        kinds = [c[0] != c[1] for c in chunks]
        return [prefill_bucket([chunks[j] for j in b], block_size, self.device, window)
                for b in bucketize(shapes, PREFILL_BUCKET_SLACK, kinds=kinds)] if chunks else []

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: TorchPrepared,
            scale: float) -> torch.Tensor:
        """Same contract as `Executor.run`."""
        return self.run_parts(q, k_cache, v_cache, prepared, scale)

    def run_parts(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: TorchPrepared,
                  scale: float, out: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
        """Run `p`'s parts into the rows of `out` (and their lse into `lse`), allocating what is
        None; returns the tensor holding the result (a merged whole-step bucket is a new one)."""
        bs, d, w, cap = p.block_size, p.decodes, p.window, self.softcap
        if d is not None and d.rows is None:  # every row is a decode query: no gather/scatter of rows
            out, lse = attend_decode(q, k_cache, v_cache, d.blocks, d.lens, bs, scale, p.decode_lse, w, cap)
        else:
            if out is None:
                out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            if lse is None and p.need_lse:
                lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
            if d is not None:
                o, dl = attend_decode(q[d.rows], k_cache, v_cache, d.blocks, d.lens, bs, scale, p.decode_lse, w, cap)
                out[d.rows] = o
                if dl is not None:
                    lse[d.rows] = dl  # type: ignore[index]
        for bucket in p.prefills:
            out[bucket.real_rows], _ = attend_bucket(q, k_cache, v_cache, bucket, bs, scale, need_lse=False,
                                                     softcap=cap)
        for bucket in p.prefills_lse:
            out[bucket.real_rows], lse[bucket.real_rows] = attend_bucket(  # type: ignore[index]
                q, k_cache, v_cache, bucket, bs, scale, need_lse=True, softcap=cap)
        for bk in p.groups:
            o, pl = attend_group_bucket(q, k_cache, v_cache, bk, bs, scale, cap)
            assert lse is not None
            if bk.dst is None:
                return merge_attention(o, pl, out, lse).to(q.dtype)
            out[bk.dst] = merge_attention(o, pl, out[bk.dst], lse[bk.dst]).to(q.dtype)
        return out
