"""The Triton executor's work list: an attention plan as (query tile, KV range) items for
`kernels.triton.attend.attend_tiles` (which documents the fields), built on the CPU without
importing triton.

Every decode query is an item of one query over its own keys; every prefill chunk is cut into
tiles of `rows // G` queries (GQA heads packed into the rows) with causal limits; each group's
prefix is tiled over its members' query rows (decode and prefill alike), all seeing the whole
prefix, so a prefix tile is read once for up to `rows // G` member queries. When the items fill
too little of the GPU, long ones are cut into KV segments. Items run longest first. A row with one
result is written in place (`direct`); otherwise every result is a partial, merged by lse.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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
    """One step's items for `attend_tiles`: per item `off`, `n`, `table`, `lo`, `hi`; per query
    entry `row`, `limit`, `dst`; `tables` [T, width] int32. `direct`: every flat row has exactly
    one entry, whose `dst` is the row itself; otherwise `dst` is a partial slot and row r's
    partials are slots `row_off[r] .. row_off[r+1]-1` (`num_partials` in all). `block_m`: the rows
    of one program."""

    off: torch.Tensor
    n: torch.Tensor
    table: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
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
    tables: list[list[int]] = []
    items: list[tuple[list[tuple[int, int]], int, int, int]] = []  # (entries (row, limit), table, lo, hi)

    def table_of(blocks: list[int]) -> int:
        tables.append(blocks)
        return len(tables) - 1

    for row, table, keys in zip(dec.rows, dec.tables, dec.key_lens):
        items.append(([(row, keys)], table_of(table), 0, keys))
    for row, n, table, first in zip(pre.rows, pre.num_rows, pre.tables, pre.first_limits()):
        t = table_of(table)
        for j in range(0, n, per):
            e = [(row + i, first + i) for i in range(j, min(n, j + per))]
            items.append((e, t, 0, e[-1][1]))
    for grp in plan.groups:
        rows = [dec.rows[i] for i in grp.decodes]
        rows += [r for i in grp.prefills for r in range(pre.rows[i], pre.rows[i] + pre.num_rows[i])]
        t = table_of(grp.blocks)
        for j in range(0, len(rows), per):
            items.append(([(r, grp.num_keys) for r in rows[j:j + per]], t, 0, grp.num_keys))

    # Too few programs for the GPU: cut long KV ranges into segments of about equal work (so a
    # 16-member group's one prefix tile does not leave the GPU waiting on a single program per KV
    # head), merged with the rest by lse.
    programs = len(items) * num_kv_heads
    if programs and programs < shape.target_programs:
        total = sum(hi - lo for _, _, lo, hi in items) * num_kv_heads
        seg = _round_up(max(shape.min_segment, -(-total // shape.target_programs)), shape.block_n)
        items = [(e, t, s, min(hi, s + seg)) for e, t, lo, hi in items for s in range(lo, hi, seg)]
    items.sort(key=lambda it: it[3] - it[2], reverse=True)  # longest first: the tail is short items

    counts = [0] * plan.num_tokens
    for e, _, _, _ in items:
        for r, _ in e:
            counts[r] += 1
    direct = all(c == 1 for c in counts)
    row_off = [0, *itertools.accumulate(counts)]
    nxt = row_off[:-1].copy()  # next free partial slot of each row
    rows, limits, dsts, off, n = [], [], [], [], []
    for e, _, _, _ in items:
        off.append(len(rows))
        n.append(len(e))
        for r, lim in e:
            rows.append(r)
            limits.append(lim)
            if direct:
                dsts.append(r)
            else:
                dsts.append(nxt[r])
                nxt[r] += 1
    width = max(1, max((len(t) for t in tables), default=0))
    flat_tables = [b for t in tables for b in t + [0] * (width - len(t))]
    parts = [off, n, [it[1] for it in items], [it[2] for it in items], [it[3] for it in items], rows, limits, dsts,
             flat_tables, [] if direct else row_off]
    # NOTE: one host-to-device copy for the whole step, then views.
    packed = torch.tensor([x for p in parts for x in p], dtype=torch.int32).to(device, non_blocking=True)
    views = list(torch.split(packed, [len(p) for p in parts]))
    return WorkList(*views[:8], views[8].view(len(tables), width), None if direct else views[9], len(items),
                    row_off[-1], block_m, direct)
