"""PrefixSharedAttention against ReferenceAttention, the lse merge, and the auto path selection."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

try:
    import batchllm  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from batchllm.attention.metadata import AttentionMetadata, build_metadata  # noqa: E402
from batchllm.attention.prefix_shared import (  # noqa: E402
    AutoAttention,
    PrefixSharedAttention,
    kv_bytes_read,
    merge_attention,
    saved_tokens,
    select_backend,
    should_share,
)
from batchllm.attention.reference import (  # noqa: E402
    ReferenceAttention, attend, attend_causal, attend_queries, flash_min_rows)
from batchllm.kernels.cpu import load_cpu_kernels  # noqa: E402

CPU = torch.device("cpu")
KERNELS = load_cpu_kernels()  # None without a C compiler: then only the PyTorch paths are checked


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


def compare(meta: AttentionMetadata, heads: int, kvh: int, d: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k, v = random_pool(meta, kvh, d, dtype, gen)
    q = torch.randn(meta.num_tokens, heads, d, generator=gen).to(dtype)
    scale = d ** -0.5
    ref = ReferenceAttention()  # all PyTorch: what every other path is checked against
    want = ref.forward(q, k, v, ref.prepare(meta), scale)
    others = [PrefixSharedAttention()]
    if KERNELS is not None:
        others += [PrefixSharedAttention(KERNELS), PrefixSharedAttention(KERNELS, share_prefill=False),
                   PrefixSharedAttention(KERNELS, prefill_in_c=False), ReferenceAttention(KERNELS),
                   ReferenceAttention(KERNELS, prefill_in_c=False)]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for be in others:
        got = be.forward(q, k, v, be.prepare(meta), scale)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kvh", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("d", [16, 64])  # 64: the kernels' vectorized paths
def test_mixed_step_matches_reference(dtype: torch.dtype, heads: int, kvh: int, d: int) -> None:
    rng = random.Random(0)
    groups = [
        (5, [(3, 1), (9, 1), (17, 1), (6, 4), (12, 12)]),  # decodes, a mid-own chunk, a whole-own chunk
        (2, [(1, 1), (4, 1)]),
        (1, [(7, 3)]),  # a single member in the step
        (8, [(2, 1)] * 3 + [(30, 1), (40, 20)]),
    ]
    singles = [(13, 1), (9, 9), (21, 5), (1, 1)]
    compare(make_step(rng, groups, singles, bs=4), heads, kvh, d, dtype, seed=1)


@pytest.mark.parametrize("seed", range(30))
def test_random_configurations(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8, 16])
    groups = []
    for _ in range(rng.randint(0, 5)):
        members = []
        for _ in range(rng.randint(1, 6)):
            own = rng.randint(1, 40)
            members.append((own, 1 if rng.random() < 0.6 else rng.randint(1, own)))
        groups.append((rng.randint(1, 64 // bs + 1), members))
    singles = []
    for _ in range(rng.randint(0 if groups else 1, 3)):
        ctx = rng.randint(1, 60)
        singles.append((ctx, 1 if rng.random() < 0.5 else rng.randint(1, ctx)))
    kvh, g = rng.choice([1, 2]), rng.choice([1, 4, 8])
    dtype = torch.float32 if seed % 2 == 0 else torch.bfloat16
    compare(make_step(rng, groups, singles, bs), kvh * g, kvh, rng.choice([8, 32]), dtype, seed)


def test_decode_only_many_groups_one_bucket() -> None:
    rng = random.Random(3)
    groups = [(4, [(rng.randint(1, 20), 1) for _ in range(6)]) for _ in range(7)]
    meta = make_step(rng, groups, [], bs=8)
    assert len(PrefixSharedAttention().prepare(meta).buckets) == 1
    compare(meta, 8, 2, 16, torch.float32, seed=3)


def test_merge_with_empty_part_is_noop() -> None:
    gen = torch.Generator().manual_seed(0)
    o = torch.randn(5, 3, 8, generator=gen)
    lse = torch.randn(5, 3, generator=gen)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    torch.testing.assert_close(merge_attention(empty_o, empty_lse, o, lse), o, atol=0, rtol=0)
    torch.testing.assert_close(merge_attention(o, lse, empty_o, empty_lse), o, atol=0, rtol=0)
    both = merge_attention(empty_o, empty_lse, empty_o, empty_lse)
    assert not both.isnan().any() and (both == 0).all()


def test_merge_equals_attention_over_union() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(3))
    k, v = torch.randn(1, 2, 10, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    want, _ = attend(q, k, v, None, 0.3)
    o1, l1 = attend(q, k[:, :, :4], v[:, :, :4], None, 0.3)
    o2, l2 = attend(q, k[:, :, 4:], v[:, :, 4:], None, 0.3)
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2), want, atol=1e-6, rtol=1e-6)


def test_auto_selection() -> None:
    rng = random.Random(0)
    small = make_step(rng, [(2, [(5, 1), (9, 1)])], [(30, 1)], bs=16)  # 2 members, 32-token prefix
    big = make_step(rng, [(1008 // 16, [(100, 1)] * 16)], [], bs=16)  # 16 members, 1008-token prefix
    assert saved_tokens(small) == 32 and saved_tokens(big) == 15 * 1008
    assert select_backend(small) == "reference" and not should_share(small)
    assert select_backend(big) == "prefix-shared" and should_share(big)
    auto = AutoAttention("auto")
    assert auto.prepare(small).path == "reference" and auto.last_path == "reference"
    assert auto.prepare(big).path == "prefix-shared" and auto.last_path == "prefix-shared"
    mid = make_step(rng, [(512 // 16, [(20, 1)] * 4)], [], bs=16)  # 4 members, 512-token prefix
    assert saved_tokens(mid) == 3 * 512
    assert not should_share(mid) and should_share(mid, kernels=True)  # the C path pays off sooner
    if KERNELS is not None:
        assert AutoAttention("auto", KERNELS).prepare(mid).path == "prefix-shared"
        assert AutoAttention("auto", KERNELS).prepare(small).path == "reference"
    # members' prefill chunks: shared on the PyTorch path; with kernels only decode queries count
    pre = make_step(rng, [(1008 // 16, [(100, 50)] * 16)], [], bs=16)
    assert saved_tokens(pre) == 14 * 1008 and saved_tokens(pre, decode_only=True) == 0
    assert should_share(pre) and should_share(pre, kernels=True) and not should_share(pre, kernels=True, prefill=False)
    if KERNELS is not None:
        assert not AutoAttention("auto", KERNELS).backends["prefix-shared"].share_prefill
        assert AutoAttention("auto", KERNELS).prepare(pre).path == "reference"
        assert AutoAttention("prefix-shared", KERNELS).backends["prefix-shared"].share_prefill
        slow = AutoAttention("auto", KERNELS, prefill_in_c=False)  # no fast C prefill: PyTorch, shared
        assert slow.backends["prefix-shared"].share_prefill and slow.prepare(pre).path == "prefix-shared"
    assert AutoAttention("auto").backends["prefix-shared"].share_prefill
    assert AutoAttention("reference").prepare(big).path == "reference"
    assert AutoAttention("prefix-shared").prepare(small).path == "prefix-shared"
    with pytest.raises(ValueError):
        AutoAttention("fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["auto", "prefix-shared", "reference"])
def test_auto_forward_matches_reference(mode: str) -> None:
    rng = random.Random(5)
    meta = make_step(rng, [(6, [(rng.randint(1, 9), 1) for _ in range(16)]), (1, [(3, 1)])], [(17, 4)], bs=4)
    gen = torch.Generator().manual_seed(5)
    k, v = random_pool(meta, 2, 16, torch.float32, gen)
    q = torch.randn(meta.num_tokens, 8, 16, generator=gen)
    ref = ReferenceAttention()
    want = ref.forward(q, k, v, ref.prepare(meta), 0.25)
    auto = AutoAttention(mode)  # type: ignore[arg-type]
    torch.testing.assert_close(auto.forward(q, k, v, auto.prepare(meta), 0.25), want, atol=1e-5, rtol=1e-5)


def test_kv_bytes_read_counts_prefix_once() -> None:
    rng = random.Random(0)
    meta = make_step(rng, [(10, [(3, 1)] * 4)], [(7, 1)], bs=4)  # prefix 40 tokens, 4 members
    ref = kv_bytes_read(meta, "reference", num_layers=2, bytes_per_token_per_layer=10)
    shared = kv_bytes_read(meta, "prefix-shared", num_layers=2, bytes_per_token_per_layer=10)
    assert ref == (4 * 43 + 7) * 20
    assert shared == (40 + 4 * 3 + 7) * 20
    with pytest.raises(ValueError):
        kv_bytes_read(meta, "other", 1, 1)


def test_row_pieces_and_identity_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchllm.attention.prefix_shared as ps

    monkeypatch.setattr(ps, "MAX_ROWS", 3)  # cut groups' stacked rows and prefill chunks into pieces
    rng = random.Random(7)
    meta = make_step(rng, [(3, [(9, 7), (5, 1), (4, 4)]), (2, [(2, 1)] * 5)], [(11, 8), (6, 1)], bs=4)
    compare(meta, 8, 2, 16, torch.float32, seed=7)
    assert kv_bytes_read(meta, "prefix-shared", 1, 1) == sum(meta.context_lens) - (3 - 4) * 12 - (5 - 2) * 8
    monkeypatch.setattr(ps, "MAX_ROWS", 512)
    # Decode-only step, one group in row order: no row gather/scatter at all.
    meta = build_metadata([1] * 6, [8 + i for i in range(6)], [[1, 2] + [3 + i, 9 + i] for i in range(6)], 4, CPU,
                          shared_lens=[8] * 6, group_ids=[0] * 6)
    meta.num_blocks = 16
    prep = PrefixSharedAttention().prepare(meta)
    assert prep.decode_rows is None and prep.buckets[0].dst is None and prep.buckets[0].src is None
    compare(meta, 8, 2, 16, torch.float32, seed=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_paths_agree(dtype: torch.dtype) -> None:
    """`attend`'s two paths give the same out and lse: PyTorch matmul + softmax (few rows) and the
    flash kernel (from `flash_min_rows(dtype)` rows). Rows with a key limit of 0 give out 0 and lse
    -inf on both."""
    gen = torch.Generator().manual_seed(2)
    rows = flash_min_rows(dtype) + 3
    q = torch.randn(3, 2, rows, 16, generator=gen).to(dtype)
    k, v = (torch.randn(3, 2, 40, 16, generator=gen).to(dtype) for _ in range(2))
    limits = torch.randint(0, 45, (3, 1, rows), generator=gen)  # some beyond the 40 keys
    limits[1, :, 5] = 0  # one row with nothing to attend to
    parts = [attend(q[..., i:i + 1, :], k, v, limits[..., i:i + 1], 0.25) for i in range(rows)]
    ref_o, ref_lse = torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)
    paths = {"flash": attend(q, k, v, limits, 0.25)}
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, (o, lse) in paths.items():
        torch.testing.assert_close(o.float(), ref_o.float(), **tol, msg=name)
        torch.testing.assert_close(lse, ref_lse, **tol, msg=name)
        assert lse[1, :, 5].eq(float("-inf")).all() and o[1, :, 5].eq(0).all(), name




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_flag_matches_causal_limits(dtype: torch.dtype) -> None:
    """`attend_causal` (the flash kernel's causal flag, no mask) equals `attend_queries` with each
    query seeing keys up to its own position, as `attend_bucket` relies on for fresh chunks."""
    gen = torch.Generator().manual_seed(3)
    n = 70
    q = torch.randn(3, n, 8, 16, generator=gen).to(dtype)
    k, v = (torch.randn(3, 2, n, 16, generator=gen).to(dtype) for _ in range(2))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    o, lse = attend_causal(q, k, v, 0.25)
    want_o, want_lse = attend_queries(q, k, v, torch.arange(1, n + 1), 0.25)
    torch.testing.assert_close(o.float(), want_o.float(), **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
