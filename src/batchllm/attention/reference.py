"""Reference paged attention in plain PyTorch: the path every other backend is tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchllm.attention.metadata import AttentionMetadata


# NOTE: prefill chunks of several sequences share one padded batch while the padded work
# (B x Qmax x Tmax) stays within this factor of the real work (sum of q x ctx).
MAX_PADDING_WASTE = 1.5


@dataclass
class PrefillBucket:
    """Prefill chunks attended together: queries and keys padded to the bucket's longest."""

    rows: torch.Tensor  # [B, Qmax] flat row of each query (padding repeats a real row)
    valid_rows: torch.Tensor  # [B * Qmax] bool: the padded query slots that are real
    blocks: torch.Tensor  # [B, nb] padded block tables
    mask: torch.Tensor  # [B, 1, Qmax, Tmax] causal + length mask
    causal_fresh: bool  # one sequence whose chunk is its whole context: SDPA's causal path


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
    """Read the KV of block tables `blocks` [..., nb] from `cache` [slots, kvh, d] -> [..., nb*bs, kvh, d]."""
    paged = cache.view(-1, block_size, *cache.shape[1:])[blocks]
    return paged.flatten(-4, -3)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention with query heads folded per KV head; returns (out, log-sum-exp).

    q: [B, kvh, M, d] (M = queries × heads per KV head), k/v: [B, kvh, T, d], mask: bool
    broadcastable to [B, kvh, M, T] (True = attend) or None. Scores and the softmax are in
    float32; the products run in the input dtype. Rows with nothing to attend to get out 0 and
    lse -inf, so they merge correctly. With `need_lse=False` the lse is skipped (None).
    NOTE: plain matmul + softmax on purpose: bf16 `scaled_dot_product_attention` for decode is
    3-13x slower on this CPU.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    if not need_lse:
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v), None
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0))
    out = torch.matmul(probs.to(v.dtype), v)
    return out, lse.squeeze(-1)


def bucket_prefills(items: list[tuple[int, int]]) -> list[list[int]]:
    """Split prefill chunks (q_len, ctx_len) into buckets of bounded padding waste (indices)."""
    order = sorted(range(len(items)), key=lambda i: (-items[i][1], -items[i][0]))
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
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
        mask = torch.arange(tmax, device=dev)[None, None, :] <= qpos[:, :, None]
        nb = -(-tmax // bs)
        fresh = len(seqs) == 1 and qmax == tmax
        return PrefillBucket(rows, valid_rows.flatten(), meta.padded_block_table(seqs, nb), mask[:, None], fresh)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prepared: ReferencePrepared, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        _, heads, d = q.shape
        kvh = k_cache.shape[1]
        g = heads // kvh
        p = prepared
        if p.decode_rows.numel():
            b = p.decode_rows.numel()
            qd = q[p.decode_rows].view(b, kvh, g, d)
            k = gather_kv(k_cache, p.decode_blocks, p.block_size).transpose(1, 2)  # [B, kvh, T, d]
            v = gather_kv(v_cache, p.decode_blocks, p.block_size).transpose(1, 2)
            o, _ = attend(qd, k, v, p.decode_valid[:, None, None, :], scale, need_lse=False)
            out[p.decode_rows] = o.reshape(b, heads, d)
        for bucket in p.prefills:
            b, qmax = bucket.rows.shape
            tmax = bucket.mask.shape[-1]
            k = gather_kv(k_cache, bucket.blocks, p.block_size)[:, :tmax].transpose(1, 2)  # [B, kvh, T, d]
            v = gather_kv(v_cache, bucket.blocks, p.block_size)[:, :tmax].transpose(1, 2)
            qb = q[bucket.rows].transpose(1, 2)  # [B, H, Qmax, d]
            # NOTE: SDPA's blocked kernel for prefill chunks: ~3x faster here than a padded
            # matmul + softmax, and it never materialises the [B, H, Qmax, T] float32 scores.
            if bucket.causal_fresh:
                o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
            else:
                o = F.scaled_dot_product_attention(qb, k, v, attn_mask=bucket.mask, scale=scale, enable_gqa=g > 1)
            o = o.transpose(1, 2)
            o = o.reshape(b * qmax, heads, d)
            out[bucket.rows.flatten()[bucket.valid_rows]] = o[bucket.valid_rows]
        return out
