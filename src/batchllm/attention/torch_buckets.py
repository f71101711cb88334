"""Padded batches for the PyTorch executor: chunks or group prefixes of similar shape attended together."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchllm.attention.metadata import pad_rows
from batchllm.attention.torch_ops import additive_mask, attend, attend_causal, attend_queries, gather_kv, key_mask


def bucketize(shapes: list[tuple[int, int]], slack: float, max_buckets: int | None = None,
              kinds: list[bool] | None = None) -> list[list[int]]:
    """Greedy buckets (lists of indices into `shapes`) of (rows, keys) items, to be padded to their
    bucket's most rows and most keys.

    Items go in order of most keys, then most rows (ties in input order); each joins the last
    bucket while that bucket's padded area (items x most rows x most keys) stays within `slack` x
    its real area, or once `max_buckets` buckets are open (a bound on the ops per layer); items of
    different `kinds` never share a bucket.
    """
    kind = kinds if kinds is not None else [False] * len(shapes)
    order = sorted(range(len(shapes)), key=lambda i: (kind[i], -shapes[i][1], -shapes[i][0]))
    buckets: list[list[int]] = []
    rows = keys = area = 0  # of the last bucket
    for i in order:
        r, t = shapes[i]
        if buckets and kind[buckets[-1][0]] == kind[i]:
            rows2, keys2, area2 = max(rows, r), max(keys, t), area + r * t
            if (len(buckets[-1]) + 1) * rows2 * keys2 <= slack * area2 or len(buckets) == max_buckets:
                buckets[-1].append(i)
                rows, keys, area = rows2, keys2, area2
                continue
        buckets.append([i])
        rows, keys, area = r, t, r * t
    return buckets


@dataclass
class PrefillBucket:
    """Prefill chunks attended together: queries and keys padded to the bucket's longest.

    Query row j of chunk b attends keys 0 .. limits[b, j]-1 (its position + 1), with a sliding
    `window` only the last `window` of them. A bucket of fresh chunks (each chunk is its key set's
    whole length, and no row's window cuts anything) can also run under SDPA's causal flag: padded
    at the end, every real query row i sees keys 0..i, and the kernel skips the blocks above the
    diagonal.
    """

    rows: torch.Tensor  # [B, Qmax] flat row of each query (padding repeats a real row)
    valid_rows: torch.Tensor  # [B * Qmax] bool: the padded query slots that are real
    real_rows: torch.Tensor  # [R] flat rows of the real slots, in order (rows.flatten()[valid_rows])
    blocks: torch.Tensor  # [B, nb] padded block tables
    tmax: int  # keys per sequence after padding
    limits: torch.Tensor  # [B, Qmax] keys each query row attends
    fresh: bool  # every chunk is its key set's whole length, and no window cuts a row's keys
    window: int | None = None
    _bias: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`limits` as an additive [B, 1, Qmax, Tmax] mask of `dtype`, built once per step."""
        if dtype not in self._bias:
            self._bias[dtype] = additive_mask(key_mask(self.limits, self.tmax, self.window)[:, None], dtype)
        return self._bias[dtype]


def prefill_bucket(chunks: list[tuple[int, int, int, list[int]]], block_size: int,
                   dev: torch.device, window: int | None = None) -> PrefillBucket:
    """One bucket of prefill chunks (q_len, key_len, first flat row, block table): query j of a
    chunk sits at position key_len - q_len + j and attends keys 0 .. that position (the last
    `window` of them)."""
    q = torch.tensor([c[0] for c in chunks], device=dev)
    ctx = torch.tensor([c[1] for c in chunks], device=dev)
    starts = torch.tensor([c[2] for c in chunks], device=dev)
    qmax, tmax = int(q.max()), int(ctx.max())
    offs = torch.arange(qmax, device=dev)[None, :]
    valid_rows = offs < q[:, None]
    rows = starts[:, None] + torch.minimum(offs, q[:, None] - 1)
    qpos = ctx[:, None] - q[:, None] + torch.minimum(offs, q[:, None] - 1)  # [B, Qmax]
    tables = pad_rows([c[3] for c in chunks], dev, -(-tmax // block_size))
    valid_rows = valid_rows.flatten()
    fresh = bool((q == ctx).all()) and (window is None or tmax <= window)
    return PrefillBucket(rows, valid_rows, rows.flatten()[valid_rows], tables, tmax, qpos + 1, fresh, window)


def attend_bucket(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bucket: PrefillBucket,
                  block_size: int, scale: float, need_lse: bool,
                  softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a bucket's real query rows over their chunks' KV in the pool ->
    (out [R, H, d], lse [R, H] or None) for the R rows `bucket.real_rows`, in that order.
    With `softcap` every row goes through `attend_queries` (SDPA cannot soft-cap)."""
    b, qmax = bucket.rows.shape
    _, heads, d = q.shape
    g = heads // k_cache.shape[0]
    k = gather_kv(k_cache, bucket.blocks, block_size)[:, :, :bucket.tmax].transpose(0, 1)  # [B, kvh, T, d]
    v = gather_kv(v_cache, bucket.blocks, block_size)[:, :, :bucket.tmax].transpose(0, 1)
    qb = q[bucket.rows]  # [B, Qmax, H, d]
    lse = None
    if softcap is not None or (need_lse and not bucket.fresh):
        o, lse = attend_queries(qb, k, v, bucket.limits, scale, need_lse, bucket.window, softcap)
    elif need_lse:  # fresh chunks padded at the end: the causal flag is exact for the real rows
        o, lse = attend_causal(qb, k, v, scale)
    else:
        # NOTE: SDPA's blocked kernel for prefill chunks: several times faster on CPU than a
        # padded matmul + softmax, and it never materialises the [B, H, Qmax, T] scores.
        qt, k, v = qb.transpose(1, 2), k.contiguous(), v.contiguous()
        if bucket.fresh:
            o = F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
        else:
            o = F.scaled_dot_product_attention(qt, k, v, attn_mask=bucket.bias(q.dtype), scale=scale,
                                               enable_gqa=g > 1)
        o = o.transpose(1, 2)
    o = o.reshape(b * qmax, heads, d)[bucket.valid_rows]
    return o, None if lse is None else lse.reshape(b * qmax, heads)[bucket.valid_rows]


@dataclass(frozen=True)
class GroupBucket:
    """Group prefixes padded to a common shape: `rows` [G, R] flat query rows (padding: 0),
    `blocks` [G, P] prefix blocks (padding: null block 0), `limits` [1, G, 1] prefix keys per
    group (None: no padding), `src` the real entries of the flattened [G*R] rows (None: all),
    `dst` their flat rows (None: exactly 0..num_tokens-1, i.e. this bucket covers the whole step
    in order)."""

    rows: torch.Tensor
    blocks: torch.Tensor
    limits: torch.Tensor | None
    src: torch.Tensor | None
    dst: torch.Tensor | None


def group_buckets(prefixes: list[tuple[list[int], int, list[int]]], num_tokens: int, max_rows: int, slack: float,
                  max_buckets: int, dev: torch.device) -> list[GroupBucket]:
    """Buckets of group prefix passes from (prefix blocks, prefix keys, member query rows) per
    group: each group's rows cut into pieces of at most `max_rows`, the pieces `bucketize`d."""
    items = [(blocks, n, rows[c:c + max_rows]) for blocks, n, rows in prefixes for c in range(0, len(rows), max_rows)]
    # NOTE: identity index maps are stored as None so `attend_group_bucket` skips those gathers.
    everything = list(range(num_tokens))
    buckets = []
    for b in bucketize([(len(rows), n) for _, n, rows in items], slack, max_buckets):
        width = max(len(items[j][2]) for j in b)
        keys = max(items[j][1] for j in b)
        src = [i * width + r for i, j in enumerate(b) for r in range(len(items[j][2]))]
        dst = [r for j in b for r in items[j][2]]
        lens = [items[j][1] for j in b]
        buckets.append(GroupBucket(
            pad_rows([items[j][2] for j in b], dev), pad_rows([items[j][0] for j in b], dev),
            None if all(n == keys for n in lens) else torch.tensor(lens, dtype=torch.long, device=dev)[None, :, None],
            None if len(src) == len(b) * width else torch.tensor(src, device=dev),
            None if dst == everything else torch.tensor(dst, device=dev)))
    return buckets


def attend_group_bucket(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bucket: GroupBucket,
                        block_size: int, scale: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a bucket's member rows over their group prefix, each prefix's KV gathered
    once and all its members' rows stacked -> (out [R, H, d], lse [R, H]) for the R real rows, in
    the order of `bucket.dst`."""
    _, heads, d = q.shape
    kvh = k_cache.shape[0]
    g = heads // kvh
    gn, r = bucket.rows.shape
    qg = q[bucket.rows].view(gn, r, kvh, g, d).permute(2, 0, 1, 3, 4).reshape(kvh, gn, r * g, d)
    k = gather_kv(k_cache, bucket.blocks, block_size)  # [kvh, G, L, d]
    v = gather_kv(v_cache, bucket.blocks, block_size)
    # NOTE: no window here: a plan shares a prefix only with members whose rows all see all of it
    o, lse = attend(qg, k, v, bucket.limits, scale, softcap=softcap)  # [kvh, G, R*g, d], [kvh, G, R*g]
    assert lse is not None
    o = o.view(kvh, gn, r, g, d).permute(1, 2, 0, 3, 4).reshape(gn * r, heads, d)
    lse = lse.view(kvh, gn, r, g).permute(1, 2, 0, 3).reshape(gn * r, heads)
    if bucket.src is not None:
        o, lse = o[bucket.src], lse[bucket.src]
    return o, lse
