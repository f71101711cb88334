"""PyTorch attention primitives over the paged KV pool: gather, attend with log-sum-exp, merge.

Pure PyTorch on any device; the PyTorch executor is built from these, and the tests compare every
other executor with them.
"""

from __future__ import annotations

import torch

from batchllm.attention.select import FLASH_MIN_ROWS_FP32, FLASH_MIN_ROWS_HALF


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


def flash_min_rows(dtype: torch.dtype) -> int:
    """Query rows from which `attend` uses the flash kernel for `dtype` on CPU."""
    return FLASH_MIN_ROWS_FP32 if dtype == torch.float32 else FLASH_MIN_ROWS_HALF


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as an additive one: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def key_mask(limits: torch.Tensor, t: int, window: int | None = None) -> torch.Tensor:
    """[..., t] bool: key j is attended where j < limits[...] (and, with a sliding `window`,
    j >= limits[...] - window)."""
    keys = torch.arange(t, device=limits.device)
    mask = keys < limits[..., None]
    if window is not None:
        mask &= keys >= limits[..., None] - window
    return mask


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Attention-logit soft-capping, cap * tanh(scores / cap), in place (None: unchanged)."""
    if cap is None:
        return scores
    return scores.div_(cap).tanh_().mul_(cap)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, limits: torch.Tensor | None, scale: float,
           need_lse: bool = True, window: int | None = None,
           softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention with query heads folded per KV head; returns (out, log-sum-exp).

    q: [B, kvh, M, d] (M = queries × heads per KV head), k/v: [B, kvh, T, d]; query row r attends
    keys 0 .. limits[r]-1 (`limits`: integer tensor broadcastable to [B, kvh, M]; None: all T),
    with a sliding `window` only keys limits[r]-window .. limits[r]-1. `softcap`: the scaled
    scores are soft-capped before the softmax (Gemma 2), which the flash kernel cannot do.
    Softmax statistics are float32; out has q's dtype. Rows with nothing to attend to get out 0
    and lse -inf, so they merge correctly. With `need_lse=False` the lse may be skipped (None).
    NOTE: for few-row (decode) queries bf16 `scaled_dot_product_attention` is several times
    slower on CPU than matmul + softmax, so those never take the SDPA path.
    """
    t = k.shape[-2]
    mask = None if limits is None else key_mask(limits, t, window)
    if softcap is None and q.shape[-2] >= flash_min_rows(q.dtype) and q.device.type == "cpu":
        return _attend_flash(q, k, v, mask, scale)
    scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale), softcap)
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
                  lens: torch.Tensor, block_size: int, scale: float, need_lse: bool, window: int | None = None,
                  softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention of one query per sequence, q [B, H, d], over keys 0 .. lens[b]-1 of block
    table blocks[b] (the last `window` of them) in one layer's pool -> (out [B, H, d], lse [B, H]
    float32 or None): one padded gather, then `attend`."""
    b, heads, d = q.shape
    kvh = k_cache.shape[0]
    k = gather_kv(k_cache, blocks, block_size)  # [kvh, B, T, d]
    v = gather_kv(v_cache, blocks, block_size)
    o, lse = attend(q.view(b, kvh, heads // kvh, d).transpose(0, 1), k, v, lens[None, :, None], scale, need_lse,
                    window, softcap)
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
                   need_lse: bool = True, window: int | None = None,
                   softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attend` for query tokens: q [B, n, H, d] over k/v [B, kvh, T, d], query j of sequence b
    seeing keys 0 .. limits[b, j]-1 (the last `window` of them; `limits` broadcastable to
    [B, n]) -> (out [B, n, H, d], lse [B, n, H] or None).

    NOTE: the g query heads of a KV head are folded into rows (head in group, query), so each KV
    head is one matmul; the limits repeat per folded head and broadcast over the KV heads.
    """
    b, n, heads, d = q.shape
    kvh = k.shape[1]
    g = heads // kvh
    qf = q.reshape(b, n, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * n, d)
    lim = limits.expand(b, n)[:, None, None, :].expand(b, 1, g, n).reshape(b, 1, g * n)
    o, lse = attend(qf, k, v, lim, scale, need_lse, window, softcap)
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


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Merge two partial attentions (o [..., d], lse [...]) stably; an lse of -inf is an empty part.

    Returns float32; rows where both parts are empty get 0 (empty parts have o = 0).
    With m = max(lse1, lse2), the weight of part 1, e^{lse1-m} / (e^{lse1-m} + e^{lse2-m}), is
    exactly sigmoid(lse1 - lse2): the same stable formula in fewer ops. -inf - x gives weight 0,
    x - -inf weight 1 (exact no-op merges); -inf - -inf = NaN is mapped to 0.
    """
    w = torch.sigmoid((lse1 - lse2).nan_to_num(nan=0.0)).unsqueeze(-1)
    o2 = o2.float()
    return o2 + w * (o1.float() - o2)
