"""Reference paged attention in plain PyTorch: the path every other backend is tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchllm.attention.metadata import AttentionMetadata


@dataclass
class ReferencePrepared:
    """Index tensors of one step. Decodes (one query) are batched; prefill chunks run one by one."""

    decode_rows: torch.Tensor  # [Bd] flat row of each decode query
    decode_blocks: torch.Tensor  # [Bd, max_blocks] padded block table
    decode_valid: torch.Tensor  # [Bd, max_blocks * block_size] bool, True for real KV
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (row start, q len, ctx len, blocks)
    block_size: int


def gather_kv(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Read the KV of block tables `blocks` [..., nb] from `cache` [slots, kvh, d] -> [..., nb*bs, kvh, d]."""
    paged = cache.view(-1, block_size, *cache.shape[1:])[blocks]
    return paged.flatten(-4, -3)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with query heads folded per KV head; returns (out, log-sum-exp).

    q: [B, kvh, M, d] (M = queries × heads per KV head), k/v: [B, kvh, T, d], mask: bool
    broadcastable to [B, kvh, M, T] (True = attend) or None. Scores and the softmax are in
    float32; the products run in the input dtype. Rows with nothing to attend to get out 0 and
    lse -inf, so they merge correctly.
    NOTE: plain matmul + softmax on purpose: bf16 `scaled_dot_product_attention` for decode is
    3-13x slower on this CPU.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0))
    out = torch.matmul(probs.to(v.dtype), v)
    return out, lse.squeeze(-1)


class ReferenceAttention:
    """Decode queries batched in one padded gather + matmul; prefill chunks one sequence at a time."""

    name = "reference"

    def prepare(self, meta: AttentionMetadata) -> ReferencePrepared:
        decode = [i for i, q in enumerate(meta.query_lens) if q == 1]
        bs = meta.block_size
        blocks = meta.padded_block_table(decode)
        lens = torch.tensor([meta.context_lens[i] for i in decode], dtype=torch.long, device=meta.device)
        valid = torch.arange(blocks.shape[1] * bs, device=meta.device)[None, :] < lens[:, None]
        prefills = []
        for i, q in enumerate(meta.query_lens):
            if q > 1:
                nb = -(-meta.context_lens[i] // bs)
                bt = torch.tensor(meta.block_tables[i][:nb], dtype=torch.long, device=meta.device)
                prefills.append((meta.query_starts[i], q, meta.context_lens[i], bt))
        rows = torch.tensor([meta.query_starts[i] for i in decode], dtype=torch.long, device=meta.device)
        return ReferencePrepared(rows, blocks, valid, prefills, bs)

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
            o, _ = attend(qd, k, v, p.decode_valid[:, None, None, :], scale)
            out[p.decode_rows] = o.reshape(b, heads, d)
        for start, n, ctx, bt in p.prefills:
            qp = q[start:start + n].transpose(0, 1)  # [H, n, d]
            k = gather_kv(k_cache, bt, p.block_size)[:ctx].transpose(0, 1)  # [kvh, ctx, d]
            v = gather_kv(v_cache, bt, p.block_size)[:ctx].transpose(0, 1)
            k = k.repeat_interleave(g, dim=0)
            v = v.repeat_interleave(g, dim=0)
            if n == ctx:
                o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale)
            else:
                qpos = torch.arange(ctx - n, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale)
            out[start:start + n] = o.transpose(0, 1)
        return out
