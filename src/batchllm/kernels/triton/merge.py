"""`merge_partials`: each output row's partial attention results merged by log-sum-exp.

Row r's partials are rows `off[r] .. off[r+1]-1` of `part` [P, H, D] (fp32) with their lse in
`part_lse` [P, H]; the merged row goes to `out[r]` in out's dtype. One program per row, all heads
at once. An empty partial (lse -inf) contributes nothing; a row with none at all gets zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_partials(part_ptr, part_lse_ptr, out_ptr, row_off,
                   stride_pt, stride_ph, stride_lt, stride_ot, stride_oh,
                   num_heads, head_dim,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    first = tl.load(row_off + r)
    last = tl.load(row_off + r + 1)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    mask = h_ok[:, None] & (d < head_dim)[None, :]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i in range(0, last - first):
        p = first.to(tl.int64) + i
        lse = tl.load(part_lse_ptr + p * stride_lt + h, mask=h_ok, other=float("-inf"))
        o = tl.load(part_ptr + p * stride_pt + h[:, None] * stride_ph + d[None, :], mask=mask,
                    other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(lse - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + o * w[:, None]
        m_i = m_new
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + r.to(tl.int64) * stride_ot + h[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)
