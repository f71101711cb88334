"""The Triton executor's work list: an attention plan as (query tile, KV range) items for
`kernels.triton.attend.attend_tiles` (which documents the fields), built on the CPU without
importing triton.

Every decode query is an item of one query over its own keys; every prefill chunk is cut into
tiles of `rows // G` queries (GQA heads packed into the rows) with causal limits; each group's
prefix is tiled over its members' query rows (decode and prefill alike), all seeing the whole
prefix, so a prefix tile is read once for up to `rows // G` member queries. When the items fill
too little of the GPU, long ones are cut into KV segments (which share their query entries).
Items run longest first. A row with one result is written in place (`direct`); otherwise every
result is a partial, merged by lse. Built with numpy: a step's Python work does not grow with its
prefill tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.attention.plan import AttentionPlan


@dataclass(frozen=True)
class WorkShape:
    """How a plan is cut into items (the tuned values live in `select`)."""

    tile_rows: int  # rows of a tile launch's program (queries x G), a power of two >= 16
    block_n: int  # keys per KV tile; segments are multiples of it
    target_programs: int  # split KV while items x KV heads fall short of this many programs
    min_segment: int  # keys: never cut an item into segments shorter than this


@dataclass(frozen=True)
class WorkList:
    """One step's items for `attend_tiles`: per item `off`, `n`, `table`, `lo`, `hi`, `shift`; per
    query entry `row`, `limit`, `dst`; `tables` [T, width] int32. Entry e of item w writes its
    result to row `dst[e] + shift[w]` of the output. `direct`: every flat row has exactly one
    result and `dst` is the row itself; otherwise results are partial slots, row r's being slots
    `row_off[r] .. row_off[r+1]-1` (`num_partials` in all; the segments of one item write
    consecutive slots, `shift` counting them). `block_m`: the rows of one program."""

    off: torch.Tensor
    n: torch.Tensor
    table: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    shift: torch.Tensor
    row: torch.Tensor
    limit: torch.Tensor
    dst: torch.Tensor
    tables: torch.Tensor
    row_off: torch.Tensor | None
    num_items: int
    num_partials: int
    block_m: int
    direct: bool


def _pow2(x: int) -> int:
    """The smallest power of two >= x."""
    return 1 << max(0, x - 1).bit_length()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def row_choices(g: int, tile_rows: int) -> tuple[int, int]:
    """Rows per program (decode step, tile step): a decode-only unshared step needs only one
    query's G heads (at least 16, what `tl.dot` takes); a step with prefill chunks or group
    prefixes stacks queries up to `tile_rows` rows."""
    small = max(16, _pow2(g))
    return small, max(tile_rows, small)


def block_rows(plan: AttentionPlan, g: int, tile_rows: int) -> int:
    """Rows per program of `plan`'s launch (`row_choices`)."""
    small, tile = row_choices(g, tile_rows)
    return small if not len(plan.prefills) and not plan.groups else tile


def build_work(plan: AttentionPlan, g: int, num_kv_heads: int, shape: WorkShape, device: torch.device) -> WorkList:
    """The work list of `plan` for heads in groups of `g` per KV head over `num_kv_heads`."""
    dec, pre = plan.decodes, plan.prefills
    block_m = block_rows(plan, g, shape.tile_rows)
    per = block_m // g  # queries per item
    tables = list(dec.tables)
    rows, limits = [np.asarray(dec.rows, np.int64)], [np.asarray(dec.key_lens, np.int64)]
    # items before any cut, in entry order: first entry, entries, table, last key + 1
    off, n, tab, hi = [np.arange(len(dec))], [np.ones(len(dec), np.int64)], [np.arange(len(dec))], [limits[0]]
    count = len(dec)  # entries so far

    def add(entry_rows: np.ndarray, entry_limits: np.ndarray, table: list[int]) -> None:
        nonlocal count
        starts = np.arange(0, len(entry_rows), per)
        ends = np.minimum(starts + per, len(entry_rows))
        rows.append(entry_rows)
        limits.append(entry_limits)
        off.append(count + starts)
        n.append(ends - starts)
        tab.append(np.full(len(starts), len(tables)))
        hi.append(np.maximum.reduceat(entry_limits, starts))
        tables.append(table)
        count += len(entry_rows)

    for row, num, table, first in zip(pre.rows, pre.num_rows, pre.tables, pre.first_limits()):
        add(np.arange(row, row + num), np.arange(first, first + num), table)
    for grp in plan.groups:
        member_rows = [dec.rows[i] for i in grp.decodes]
        member_rows += [r for i in grp.prefills for r in range(pre.rows[i], pre.rows[i] + pre.num_rows[i])]
        add(np.asarray(member_rows, np.int64), np.full(len(member_rows), grp.num_keys), grp.blocks)
    off, n, tab, hi = (np.concatenate(x).astype(np.int64) for x in (off, n, tab, hi))
    row, limit = np.concatenate(rows).astype(np.int64), np.concatenate(limits).astype(np.int64)

    # Too few programs for the GPU: cut long KV ranges into segments of about equal work (so a
    # 16-member group's one prefix tile does not leave the GPU waiting on a single program per KV
    # head), merged with the rest by lse.
    segs = np.ones(len(off), np.int64)
    seg = 0
    if 0 < len(off) * num_kv_heads < shape.target_programs:
        seg = _round_up(max(shape.min_segment, -(-int(hi.sum()) * num_kv_heads // shape.target_programs)),
                        shape.block_n)
        segs = np.maximum(1, -(-hi // seg))
    item = np.repeat(np.arange(len(off)), segs)  # the uncut item of every segment
    shift = np.arange(len(item)) - np.repeat(np.cumsum(segs) - segs, segs)  # segment index
    lo = shift * seg
    seg_hi = np.minimum(hi[item], lo + seg) if seg else hi[item]
    order = np.argsort(lo - seg_hi, kind="stable")  # longest first: the tail is short items

    entry_segs = np.repeat(segs, n)  # results each entry gives: one per segment of its item
    direct = len(row) == plan.num_tokens and bool((entry_segs == 1).all())
    if direct:  # every row exactly once (the plan covers each row once, a group adds more)
        dst, row_off, num_partials = row, np.zeros(0, np.int64), plan.num_tokens
    else:
        # Entry e's slots: row_off[row] + the results of the row's earlier entries (rows sorted
        # stably, the running sum of results is exactly that).
        by_row = np.argsort(row, kind="stable")
        dst = np.empty_like(row)
        dst[by_row] = np.cumsum(entry_segs[by_row]) - entry_segs[by_row]
        counts = np.bincount(row, weights=entry_segs, minlength=plan.num_tokens).astype(np.int64)
        row_off = np.concatenate([[0], np.cumsum(counts)])
        num_partials = int(row_off[-1])
    width = max(1, max((len(t) for t in tables), default=0))
    # NOTE: one array from padded lists (as `pad_rows`), not one assignment per table.
    flat_tables = np.array([t + [0] * (width - len(t)) for t in tables], np.int64).reshape(len(tables), width)
    parts = [off[item][order], n[item][order], tab[item][order], lo[order], seg_hi[order], shift[order], row, limit,
             dst, flat_tables.ravel(), row_off]
    # NOTE: one host-to-device copy for the whole step, then views.
    packed = torch.from_numpy(np.concatenate(parts).astype(np.int32)).to(device, non_blocking=True)
    views = list(torch.split(packed, [len(p) for p in parts]))
    return WorkList(*views[:9], views[9].view(len(tables), width), None if direct else views[10], len(item),
                    num_partials, block_m, direct)
