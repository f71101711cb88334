"""Reference paged attention in plain PyTorch: the path every other backend is tested against."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchllm.attention.metadata import AttentionMetadata


# NOTE: prefill chunks of several sequences share one padded batch while the padded work
# (B x Qmax x Tmax) stays within this factor of the real work (sum of q x ctx).
MAX_PADDING_WASTE = 1.5


@dataclass
class PrefillBucket:
    """Prefill chunks attended together: queries and keys padded to the bucket's longest.

    A bucket of fresh chunks (each chunk is its sequence's whole context) needs no mask: padded
    at the end, every real query row i sees keys 0..i only under SDPA's causal flag, which also
    lets the kernel skip the blocks above the diagonal.
    """

    rows: torch.Tensor  # [B, Qmax] flat row of each query (padding repeats a real row)
    valid_rows: torch.Tensor  # [B * Qmax] bool: the padded query slots that are real
    blocks: torch.Tensor  # [B, nb] padded block tables
    tmax: int  # keys per sequence after padding
    mask: torch.Tensor | None  # [B, 1, Qmax, Tmax] causal + length mask; None: fresh, causal flag
    _bias: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as an additive mask of `dtype`, built once per step (not once per layer)."""
        assert self.mask is not None
        if dtype not in self._bias:
            self._bias[dtype] = additive_mask(self.mask, dtype)
        return self._bias[dtype]


@dataclass
class ReferencePrepared:
    """Index tensors of one step: decode queries in one padded batch, prefill chunks in buckets."""

    decode_rows: torch.Tensor  # [Bd] flat row of each decode query
    decode_blocks: torch.Tensor  # [Bd, max_blocks] padded block table
    decode_valid: torch.Tensor  # [Bd, max_blocks * block_size] bool, True for real KV
    prefills: list[PrefillBucket]
    block_size: int
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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           need_lse: bool = True, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention with query heads folded per KV head; returns (out, log-sum-exp).

    q: [B, kvh, M, d] (M = queries × heads per KV head), k/v: [B, kvh, T, d], mask: bool
    broadcastable to [B, kvh, M, T] (True = attend) or None. Softmax statistics are float32; out
    has q's dtype. Rows with nothing to attend to get out 0 and lse -inf, so they merge correctly.
    With `need_lse=False` the lse may be skipped (None). Instead of `mask`, `bias` may give an
    additive mask (`additive_mask`, q's dtype) built once for many layers; its rows must not be
    fully masked.
    NOTE: bf16 `scaled_dot_product_attention` for decode is 3-13x slower than matmul + softmax
    on this CPU, so few-row queries never take the SDPA path.
    """
    if q.shape[-2] >= flash_min_rows(q.dtype) and q.device.type == "cpu":
        return _attend_flash(q, k, v, mask, scale, bias)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    elif bias is not None:
        scores += bias
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


def _attend_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` through ATen's CPU flash kernel (a bool mask becomes an additive one)."""
    if mask is not None and bias is None:
        bias = additive_mask(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    if mask is not None:
        # NOTE: the kernel gives fully masked rows lse 0 (and out 0); the merge needs -inf there.
        lse = lse.masked_fill(~mask.any(-1).expand_as(lse), float("-inf"))
    return out, lse


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a fresh chunk over itself: q [B, H, n, d], k/v [B, kvh, n, d] ->
    (out [B, H, n, d], lse [B, H, n] float32). No mask is built; the flash kernel skips the
    blocks above the diagonal."""
    heads, kvh = q.shape[1], k.shape[1]
    if q.device.type == "cpu":
        k, v = k.repeat_interleave(heads // kvh, dim=1), v.repeat_interleave(heads // kvh, dim=1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=scale)
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    o, lse = attend(q.unflatten(1, (kvh, heads // kvh)), k[:, :, None], v[:, :, None], mask, scale)
    return o.flatten(1, 2), lse.flatten(1, 2)


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


class ReferenceAttention:
    """Decode queries batched in one padded gather + matmul; prefill chunks in padded buckets."""

    name = "reference"

    def prepare(self, meta: AttentionMetadata) -> ReferencePrepared:
        dev, bs = meta.device, meta.block_size
        decode = [i for i, q in enumerate(meta.query_lens) if q == 1]
        blocks = meta.padded_block_table(decode)
        lens = torch.tensor([meta.context_lens[i] for i in decode], dtype=torch.long, device=dev)
        valid = torch.arange(blocks.shape[1] * bs, device=dev)[None, :] < lens[:, None]
        rows = torch.tensor([meta.query_starts[i] for i in decode], dtype=torch.long, device=dev)
        pre = [i for i, q in enumerate(meta.query_lens) if q > 1]
        buckets = bucket_prefills([(meta.query_lens[i], meta.context_lens[i]) for i in pre])
        return ReferencePrepared(rows, blocks, valid, [self._bucket(meta, [pre[j] for j in b]) for b in buckets], bs)

    @staticmethod
    def _bucket(meta: AttentionMetadata, seqs: list[int]) -> PrefillBucket:
        dev, bs = meta.device, meta.block_size
        q = torch.tensor([meta.query_lens[i] for i in seqs], device=dev)
        ctx = torch.tensor([meta.context_lens[i] for i in seqs], device=dev)
        starts = torch.tensor([meta.query_starts[i] for i in seqs], device=dev)
        qmax, tmax = int(q.max()), int(ctx.max())
        offs = torch.arange(qmax, device=dev)[None, :]
        valid_rows = offs < q[:, None]
        rows = starts[:, None] + torch.minimum(offs, q[:, None] - 1)
        qpos = ctx[:, None] - q[:, None] + torch.minimum(offs, q[:, None] - 1)  # [B, Qmax]
        fresh = bool((q == ctx).all())
        mask = None if fresh else (torch.arange(tmax, device=dev)[None, None, :] <= qpos[:, :, None])[:, None]
        nb = -(-tmax // bs)
        return PrefillBucket(rows, valid_rows.flatten(), meta.padded_block_table(seqs, nb), tmax, mask)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prepared: ReferencePrepared, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        _, heads, d = q.shape
        kvh = k_cache.shape[0]
        g = heads // kvh
        p = prepared
        if p.decode_rows.numel():
            b = p.decode_rows.numel()
            qd = q[p.decode_rows].view(b, kvh, g, d).transpose(0, 1)  # [kvh, B, g, d]
            k = gather_kv(k_cache, p.decode_blocks, p.block_size)  # [kvh, B, T, d]
            v = gather_kv(v_cache, p.decode_blocks, p.block_size)
            o, _ = attend(qd, k, v, p.decode_valid[None, :, None, :], scale, need_lse=False)
            out[p.decode_rows] = o.transpose(0, 1).reshape(b, heads, d)
        for bucket in p.prefills:
            b, qmax = bucket.rows.shape
            tmax = bucket.tmax
            k = gather_kv(k_cache, bucket.blocks, p.block_size)[:, :, :tmax].transpose(0, 1).contiguous()
            v = gather_kv(v_cache, bucket.blocks, p.block_size)[:, :, :tmax].transpose(0, 1).contiguous()
            qb = q[bucket.rows].transpose(1, 2)  # [B, H, Qmax, d]
            # NOTE: SDPA's blocked kernel for prefill chunks: ~3x faster here than a padded
            # matmul + softmax, and it never materialises the [B, H, Qmax, T] float32 scores.
            if bucket.mask is None:
                o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
            else:
                o = F.scaled_dot_product_attention(qb, k, v, attn_mask=bucket.bias(q.dtype), scale=scale,
                                                   enable_gqa=g > 1)
            o = o.transpose(1, 2)
            o = o.reshape(b * qmax, heads, d)
            out[bucket.rows.flatten()[bucket.valid_rows]] = o[bucket.valid_rows]
        return out
