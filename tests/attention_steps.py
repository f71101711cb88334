"""Test steps for the attention tests: metadata of groups and single sequences, and a KV pool."""

from __future__ import annotations

import random

import torch

from batchllm.attention.metadata import AttentionMetadata, build_metadata

CPU = torch.device("cpu")


def make_step(rng: random.Random, groups: list[tuple[int, list[tuple[int, int]]]],
              singles: list[tuple[int, int]], bs: int) -> AttentionMetadata:
    """Metadata for `groups` [(prefix blocks, [(own len, q len) per member])] and ungrouped
    `singles` [(context len, q len)], in shuffled flat order. Blocks are handed out from 1 on."""
    nxt = 1

    def alloc(n: int) -> list[int]:
        nonlocal nxt
        nxt += n
        return list(range(nxt - n, nxt))

    seqs = []  # (q len, ctx, blocks, shared len, group id)
    for gid, (pb, members) in enumerate(groups):
        prefix = alloc(pb)
        for own, ql in members:
            assert 1 <= ql <= own
            seqs.append((ql, pb * bs + own, prefix + alloc(-(-own // bs)), pb * bs, gid))
    for ctx, ql in singles:
        seqs.append((ql, ctx, alloc(-(-ctx // bs)), 0, -1))
    rng.shuffle(seqs)
    ql, ctx, bt, sl, gid = (list(x) for x in zip(*seqs))
    meta = build_metadata(ql, ctx, bt, bs, CPU, shared_lens=sl, group_ids=gid)
    meta.num_blocks = nxt  # test-only convenience: pool size
    return meta


def random_pool(meta: AttentionMetadata, kvh: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    slots = meta.num_blocks * meta.block_size
    k = torch.randn(kvh, slots, d, generator=gen).to(dtype)
    v = torch.randn(kvh, slots, d, generator=gen).to(dtype)
    k[:, : meta.block_size] = 0  # null block
    v[:, : meta.block_size] = 0
    return k, v
