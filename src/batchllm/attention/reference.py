"""Reference paged attention in plain PyTorch: the path every other backend is tested against."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchllm.attention.metadata import AttentionMetadata, pad_rows
from batchllm.kernels.cpu import CpuKernels


# NOTE: prefill chunks of several sequences share one padded batch while the padded work
# (B x Qmax x Tmax) stays within this factor of the real work (sum of q x ctx).
MAX_PADDING_WASTE = 1.5


@dataclass
class PrefillBucket:
    """Prefill chunks attended together: queries and keys padded to the bucket's longest.

    Query row j of chunk b attends keys 0 .. limits[b, j]-1 (its position + 1). A bucket of fresh
    chunks (each chunk is its sequence's whole context) can also run under SDPA's causal flag:
    padded at the end, every real query row i sees keys 0..i, and the kernel skips the blocks above
    the diagonal.
    """

    rows: torch.Tensor  # [B, Qmax] flat row of each query (padding repeats a real row)
    valid_rows: torch.Tensor  # [B * Qmax] bool: the padded query slots that are real
    real_rows: torch.Tensor  # [R] flat rows of the real slots, in order (rows.flatten()[valid_rows])
    blocks: torch.Tensor  # [B, nb] padded block tables
    tmax: int  # keys per sequence after padding
    limits: torch.Tensor  # [B, Qmax] keys each query row attends
    fresh: bool  # every chunk is its sequence's whole context
    _bias: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`limits` as an additive [B, 1, Qmax, Tmax] mask of `dtype`, built once per step."""
        if dtype not in self._bias:
            self._bias[dtype] = additive_mask(key_mask(self.limits, self.tmax)[:, None], dtype)
        return self._bias[dtype]


@dataclass
class PrefillChunks:
    """Query chunks over key sets for the C kernel (`CpuKernels.paged_prefill`, which documents the
    fields): key set s is keys 0 .. key_lens[s]-1 of block table key_tables[s] and owns chunks
    offsets[s] .. offsets[s+1]-1; chunk c is lens[c] queries from flat row rows[c], its query j
    seeing keys 0 .. limits[c]+j-1 (clamped to 0 .. key_lens[s])."""

    key_tables: torch.Tensor
    key_lens: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor
    lens: torch.Tensor
    limits: torch.Tensor

    @functools.cached_property
    def real_rows(self) -> torch.Tensor:
        """The flat rows the chunks cover, in order (built once, on first use)."""
        return torch.cat([torch.arange(r, r + n, device=self.rows.device)
                          for r, n in zip(self.rows.tolist(), self.lens.tolist())])


def prefill_chunks(key_sets: list[tuple[list[int], int, list[tuple[int, int, int]]]],
                   dev: torch.device) -> PrefillChunks:
    """`PrefillChunks` from key sets (block table, keys, chunks (first flat row, queries, first
    limit)); a causal chunk of q queries over ctx keys has first limit ctx - q + 1, a chunk that
    sees every key the key count."""
    chunks = [c for _, _, cs in key_sets for c in cs]
    offsets = [0]
    for _, _, cs in key_sets:
        offsets.append(offsets[-1] + len(cs))

    def longs(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=dev)

    return PrefillChunks(pad_rows([b for b, _, _ in key_sets], dev), longs([n for _, n, _ in key_sets]), longs(offsets),
                         longs([c[0] for c in chunks]), longs([c[1] for c in chunks]), longs([c[2] for c in chunks]))


def attend_chunks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks: PrefillChunks,
                  block_size: int, scale: float, kernels: CpuKernels, out: torch.Tensor,
                  lse: torch.Tensor | None = None) -> None:
    """Attention of the chunks' query rows of q [N, H, d] from the pool, written into those rows of
    out [N, H, d] (contiguous, q's dtype) and lse [N, H] float32 (if given)."""
    kernels.paged_prefill(q, k_cache, v_cache, chunks.key_tables, chunks.key_lens, chunks.offsets, chunks.rows,
                          chunks.lens, chunks.limits, block_size, scale, out, lse)


@dataclass
class ReferencePrepared:
    """Index tensors of one step: decode queries in one padded batch, prefill chunks in buckets."""

    decode_rows: torch.Tensor  # [Bd] flat row of each decode query
    decode_blocks: torch.Tensor  # [Bd, max_blocks] padded block table
    decode_lens: torch.Tensor  # [Bd] KV tokens of each decode sequence
    prefills: list[PrefillBucket]
    block_size: int
    chunks: PrefillChunks | None = None  # with kernels: every prefill chunk, in one C call
    path: str = "reference"


def gather_kv(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Read the KV of block tables `blocks` [..., nb] from one layer's `cache` [kvh, slots, d]
    -> [kvh, ..., nb*bs, d].

    NOTE: the pool is head-major, so the gathered KV is already laid out per KV head for the
    attention matmuls (a slot-major pool needed a transposing copy: 4x slower decode at 400
    sequences). The gather is one `index_select` along dim 0 of a [kvh * blocks, bs * d] view:
    3-7x faster than indexing dim 1 of [kvh, blocks, bs, d] once the result outgrows the cache.
    """
    kvh, slots, d = cache.shape
    n_blocks = slots // block_size
    heads = torch.arange(kvh, device=blocks.device)[:, None] * n_blocks
    rows = cache.view(kvh * n_blocks, block_size * d).index_select(0, (blocks.reshape(1, -1) + heads).flatten())
    return rows.view(kvh, *blocks.shape[:-1], blocks.shape[-1] * block_size, d)


# NOTE: with at least this many query rows per (batch, KV head), attention runs through ATen's
# blocked CPU flash kernel (which also returns the log-sum-exp) instead of matmul + softmax.
# Measured on the dev CPU (2 threads, allocator as the engine sets it, 992-4000 keys, 16-2048
# rows): in fp32 the two tie from 16 rows (0.8-1.3x either way); in bf16 matmul + softmax is
# 1.0-1.8x faster up to 512 rows and the flash kernel wins from ~1024 rows with a mask (1.15x).
# Decode rows (one query per KV head group) always take matmul + softmax.
FLASH_MIN_ROWS_FP32 = 16
FLASH_MIN_ROWS_HALF = 1024  # bf16 / fp16


def flash_min_rows(dtype: torch.dtype) -> int:
    """Query rows from which `attend` uses the flash kernel for `dtype` on CPU."""
    return FLASH_MIN_ROWS_FP32 if dtype == torch.float32 else FLASH_MIN_ROWS_HALF


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as an additive one: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def key_mask(limits: torch.Tensor, t: int) -> torch.Tensor:
    """[..., t] bool: key j is attended where j < limits[...]."""
    return torch.arange(t, device=limits.device) < limits[..., None]


def kernel_path(q: torch.Tensor, kernels: CpuKernels | None) -> bool:
    """True when attention of q may run in the C kernels (kernels loaded, CPU fp32/bf16)."""
    return kernels is not None and kernels.handles(q)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, limits: torch.Tensor | None, scale: float,
           need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention with query heads folded per KV head; returns (out, log-sum-exp).

    q: [B, kvh, M, d] (M = queries × heads per KV head), k/v: [B, kvh, T, d]; query row r attends
    keys 0 .. limits[r]-1 (`limits`: integer tensor broadcastable to [B, kvh, M]; None: all T).
    Softmax statistics are float32; out has q's dtype. Rows with nothing to attend to get out 0
    and lse -inf, so they merge correctly. With `need_lse=False` the lse may be skipped (None).
    NOTE: bf16 `scaled_dot_product_attention` for decode is 3-13x slower than matmul + softmax
    on this CPU, so few-row queries never take the SDPA path.
    """
    t = k.shape[-2]
    mask = None if limits is None else key_mask(limits, t)
    if q.shape[-2] >= flash_min_rows(q.dtype) and q.device.type == "cpu":
        return _attend_flash(q, k, v, mask, scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    empty = None if mask is None else ~mask.any(-1, keepdim=True)
    if empty is not None and bool(empty.any()):
        probs.masked_fill_(empty, 0.0)  # softmax of an all -inf row is NaN; such rows attend to nothing
    out = torch.matmul(probs.to(v.dtype), v)
    if not need_lse:
        return out, None
    # NOTE: the lse comes from the softmax already computed: its largest probability is
    # e^(max - lse), so lse = max - log(max p) (max p >= 1/T, no underflow). Two cheap row
    # reductions instead of logsumexp + exp passes over the scores: 1.15x on decode attention.
    lse = scores.amax(-1).sub_(probs.amax(-1).log_())
    if empty is not None:
        lse.masked_fill_(empty.squeeze(-1).expand_as(lse), float("-inf"))
    return out, lse


def attend_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                  lens: torch.Tensor, block_size: int, scale: float, kernels: CpuKernels | None,
                  need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention of one query per sequence, q [B, H, d], over keys 0 .. lens[b]-1 of block
    table blocks[b] in one layer's pool -> (out [B, H, d], lse [B, H] float32 or None). On the
    kernel path in C (`paged_decode`, no gathered copy); otherwise gather + `attend`."""
    if kernel_path(q, kernels):
        assert kernels is not None
        return kernels.paged_decode(q, k_cache, v_cache, blocks, lens, block_size, scale, need_lse=need_lse)
    b, heads, d = q.shape
    kvh = k_cache.shape[0]
    k = gather_kv(k_cache, blocks, block_size)  # [kvh, B, T, d]
    v = gather_kv(v_cache, blocks, block_size)
    o, lse = attend(q.view(b, kvh, heads // kvh, d).transpose(0, 1), k, v, lens[None, :, None], scale, need_lse)
    return o.transpose(0, 1).reshape(b, heads, d), None if lse is None else lse.transpose(0, 1).reshape(b, heads)


def _attend_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` through ATen's CPU flash kernel (a bool mask becomes an additive one)."""
    bias = None if mask is None else additive_mask(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    if mask is not None:
        # NOTE: the kernel gives fully masked rows lse 0 (and out 0); the merge needs -inf there.
        lse = lse.masked_fill(~mask.any(-1).expand_as(lse), float("-inf"))
    return out, lse


def attend_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, limits: torch.Tensor, scale: float,
                   need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attend` for query tokens: q [B, n, H, d] over k/v [B, kvh, T, d], query j of sequence b
    seeing keys 0 .. limits[b, j]-1 (`limits` broadcastable to [B, n]) -> (out [B, n, H, d],
    lse [B, n, H] or None).

    NOTE: the g query heads of a KV head are folded into rows (head in group, query), so each KV
    head is one matmul; the limits repeat per folded head and broadcast over the KV heads.
    """
    b, n, heads, d = q.shape
    kvh = k.shape[1]
    g = heads // kvh
    qf = q.reshape(b, n, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * n, d)
    lim = limits.expand(b, n)[:, None, None, :].expand(b, 1, g, n).reshape(b, 1, g * n)
    o, lse = attend(qf, k, v, lim, scale, need_lse)
    o = o.view(b, kvh, g, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, heads, d)
    if lse is not None:
        lse = lse.view(b, kvh, g, n).permute(0, 3, 1, 2).reshape(b, n, heads)
    return o, lse


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a fresh chunk over itself: q [B, n, H, d], k/v [B, kvh, n, d] ->
    (out [B, n, H, d], lse [B, n, H] float32). On CPU no mask is built: the flash kernel runs
    under its causal flag and skips the blocks above the diagonal."""
    b, n, heads, d = q.shape
    kvh = k.shape[1]
    if q.device.type == "cpu":
        k, v = k.repeat_interleave(heads // kvh, dim=1), v.repeat_interleave(heads // kvh, dim=1)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.transpose(1, 2), k, v, is_causal=True,
                                                                           scale=scale)
        return o.transpose(1, 2), lse.transpose(1, 2)
    o, lse = attend_queries(q, k, v, torch.arange(1, n + 1, device=q.device), scale)
    assert lse is not None
    return o, lse


def bucket_prefills(items: list[tuple[int, int]]) -> list[list[int]]:
    """Split prefill chunks (q_len, ctx_len) into buckets of bounded padding waste (indices);
    fresh chunks (q_len == ctx_len) and continuing ones never share a bucket."""
    order = sorted(range(len(items)), key=lambda i: (items[i][0] != items[i][1], -items[i][1], -items[i][0]))
    buckets: list[list[int]] = []
    for i in order:
        if buckets and (items[buckets[-1][0]][0] == items[buckets[-1][0]][1]) == (items[i][0] == items[i][1]):
            b = buckets[-1] + [i]
            qmax, tmax = max(items[j][0] for j in b), max(items[j][1] for j in b)
            if len(b) * qmax * tmax <= MAX_PADDING_WASTE * sum(items[j][0] * items[j][1] for j in b):
                buckets[-1] = b
                continue
        buckets.append([i])
    return buckets


def prefill_bucket(chunks: list[tuple[int, int, int, list[int]]], block_size: int,
                   dev: torch.device) -> PrefillBucket:
    """One bucket of prefill chunks (q_len, ctx_len, first flat row, block table): query j of a
    chunk sits at position ctx_len - q_len + j and attends keys 0 .. that position."""
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
    return PrefillBucket(rows, valid_rows, rows.flatten()[valid_rows], tables, tmax, qpos + 1, bool((q == ctx).all()))


def attend_bucket(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bucket: PrefillBucket,
                  block_size: int, scale: float, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a bucket's real query rows over their chunks' KV in the pool (PyTorch) ->
    (out [R, H, d], lse [R, H] or None) for the R rows `bucket.real_rows`, in that order."""
    b, qmax = bucket.rows.shape
    _, heads, d = q.shape
    g = heads // k_cache.shape[0]
    k = gather_kv(k_cache, bucket.blocks, block_size)[:, :, :bucket.tmax].transpose(0, 1)  # [B, kvh, T, d]
    v = gather_kv(v_cache, bucket.blocks, block_size)[:, :, :bucket.tmax].transpose(0, 1)
    qb = q[bucket.rows]  # [B, Qmax, H, d]
    lse = None
    if need_lse and not bucket.fresh:
        o, lse = attend_queries(qb, k, v, bucket.limits, scale, need_lse)
    elif need_lse:  # fresh chunks padded at the end: the causal flag is exact for the real rows
        o, lse = attend_causal(qb, k, v, scale)
    else:
        # NOTE: SDPA's blocked kernel for prefill chunks: ~3x faster here than a padded
        # PyTorch matmul + softmax, and it never materialises the [B, H, Qmax, T] scores.
        qt, k, v = qb.transpose(1, 2), k.contiguous(), v.contiguous()
        if bucket.fresh:
            o = F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
        else:
            o = F.scaled_dot_product_attention(qt, k, v, attn_mask=bucket.bias(q.dtype), scale=scale,
                                               enable_gqa=g > 1)
        o = o.transpose(1, 2)
    o = o.reshape(b * qmax, heads, d)[bucket.valid_rows]
    return o, None if lse is None else lse.reshape(b * qmax, heads)[bucket.valid_rows]


class ReferenceAttention:
    """Decode queries batched in one padded gather + matmul; prefill chunks in padded buckets.

    With `kernels` (CPU only) decode queries (`paged_decode`) and, with `prefill_in_c`, prefill
    chunks (`paged_prefill`) read the pool in C, with no gathered copy; the rest is PyTorch.
    """

    name = "reference"

    def __init__(self, kernels: CpuKernels | None = None, prefill_in_c: bool = True) -> None:
        self.kernels = kernels
        self.prefill_in_c = prefill_in_c

    def prepare(self, meta: AttentionMetadata) -> ReferencePrepared:
        dev, bs = meta.device, meta.block_size
        decode = [i for i, q in enumerate(meta.query_lens) if q == 1]
        blocks = meta.padded_block_table(decode)
        lens = torch.tensor([meta.context_lens[i] for i in decode], dtype=torch.long, device=dev)
        rows = torch.tensor([meta.query_starts[i] for i in decode], dtype=torch.long, device=dev)
        pre = [i for i, q in enumerate(meta.query_lens) if q > 1]
        if self.kernels is not None and self.prefill_in_c and dev.type == "cpu":
            sets = [(meta.block_tables[i], meta.context_lens[i],
                     [(meta.query_starts[i], meta.query_lens[i], meta.context_lens[i] - meta.query_lens[i] + 1)])
                    for i in pre]
            return ReferencePrepared(rows, blocks, lens, [], bs, prefill_chunks(sets, dev) if pre else None)
        buckets = bucket_prefills([(meta.query_lens[i], meta.context_lens[i]) for i in pre])
        chunks = [(meta.query_lens[i], meta.context_lens[i], meta.query_starts[i], meta.block_tables[i]) for i in pre]
        return ReferencePrepared(rows, blocks, lens, [prefill_bucket([chunks[j] for j in b], bs, dev) for b in buckets], bs)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prepared: ReferencePrepared, scale: float) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        p = prepared
        if p.chunks is not None:
            assert self.kernels is not None
            attend_chunks(q, k_cache, v_cache, p.chunks, p.block_size, scale, self.kernels, out)
        if p.decode_rows.numel():
            out[p.decode_rows], _ = attend_decode(q[p.decode_rows], k_cache, v_cache, p.decode_blocks, p.decode_lens,
                                                  p.block_size, scale, self.kernels, need_lse=False)
        for bucket in p.prefills:
            o, _ = attend_bucket(q, k_cache, v_cache, bucket, p.block_size, scale, need_lse=False)
            out[bucket.real_rows] = o
        return out
