"""`attend_tiles`: attention over a flat work list of (query tile, KV range) items on a paged pool.

Item w attends query entries `off[w] .. off[w] + n[w] - 1` over keys `lo[w] .. hi[w]-1` of
block table row `table[w]`. Query entry e is flat row `q_row[e]`, sees keys 0 .. `q_limit[e]`-1
of that table (a causal limit, or the whole prefix) and writes its result to row
`q_dst[e] + shift[w]` of `out` (and `lse` when `WRITE_LSE`): the KV segments of one query tile
share its entries and write consecutive rows. One program per (item, KV head): its rows are the entries'
query heads of that KV head (GQA packing: row m is entry m // G, head kv_head * G + m % G), so
each KV tile is loaded once for all of them. This one kernel serves the whole plan: a prefill
chunk's query tile over its own keys, a decode query over one KV segment, a group prefix read
once for up to BLOCK_M // G member queries.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tiles(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
                 item_off, item_n, item_table, item_lo, item_hi, item_shift,
                 q_row, q_limit, q_dst, tables,
                 stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                 stride_ot, stride_oh, stride_lt, stride_tab,
                 head_dim, scale_log2,
                 G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    off = tl.load(item_off + w)
    n = tl.load(item_n + w)
    lo = tl.load(item_lo + w)
    hi = tl.load(item_hi + w)
    tab = tables + tl.load(item_table + w).to(tl.int64) * stride_tab

    m = tl.arange(0, BLOCK_M)
    entry = m // G
    head = kvh * G + m % G
    row_ok = entry < n
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    rows = tl.load(q_row + off + entry, mask=row_ok, other=0).to(tl.int64)
    limit = tl.load(q_limit + off + entry, mask=row_ok, other=0)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # no row of this tile sees a key at or past its largest limit
    end = tl.minimum(hi, tl.max(tl.where(row_ok, limit, 0), 0))
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh
    for start in range(lo, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < end
        block = tl.load(tab + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(pos[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0  # a row with no key: out 0, lse -inf (what the merge treats as empty)
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    dst = tl.load(q_dst + off + entry, mask=row_ok, other=0).to(tl.int64) + tl.load(item_shift + w)
    tl.store(out_ptr + dst[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:  # natural-log lse, like the PyTorch executor's
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + dst * stride_lt + head, lse, mask=row_ok)
