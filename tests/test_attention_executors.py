"""The attention executors on the same plans: against each other, a dense oracle and the lse merge."""

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

from batchllm.attention.cost import kv_tokens  # noqa: E402
from batchllm.attention.executor import Executor  # noqa: E402
from batchllm.attention.metadata import AttentionMetadata, build_metadata  # noqa: E402
from batchllm.attention.plan import Share, build_plan  # noqa: E402
from batchllm.attention.select import Attention  # noqa: E402
from batchllm.attention.cpu_executor import CpuExecutor  # noqa: E402
from batchllm.attention.torch_executor import TorchExecutor  # noqa: E402
from batchllm.attention.torch_ops import (  # noqa: E402
    attend, attend_causal, attend_queries, flash_min_rows, merge_attention)
from batchllm.kernels.cpu import load_cpu_kernels  # noqa: E402

from attention_steps import CPU, make_step, random_pool  # noqa: E402  (tests/)
from triton_interp import interpreted_executor_class  # noqa: E402  (tests/)

KERNELS = load_cpu_kernels()  # None without a C compiler: then only the PyTorch paths are checked
# The Triton executor under the interpreter (None without triton); 4 SMs, so long KV gets split.
TRITON = interpreted_executor_class()


def dense_attention(meta: AttentionMetadata, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The oracle: per sequence, its keys read slot by slot from the pool, causal softmax attention
    in float64, no paging tricks, no sharing; with a sliding `window` the query at position p sees
    keys p - window + 1 .. p; `softcap`: scores soft-capped before the softmax."""
    bs, kvh, (_, heads, _) = meta.block_size, k_cache.shape[0], q.shape
    out = torch.empty(q.shape, dtype=torch.float64)
    for start, n, ctx, table in zip(meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)])
        k, v = (c[:, slots].double().repeat_interleave(heads // kvh, 0) for c in (k_cache, v_cache))  # [H, T, d]
        scores = q[start:start + n].double().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, n, T]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        keys, pos = torch.arange(ctx)[None, :], torch.arange(ctx - n, ctx)[:, None]
        hidden = keys > pos
        if window is not None:
            hidden |= keys <= pos - window
        out[start:start + n] = (scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


def executors() -> dict[str, Executor]:
    """Every executor this machine can run: PyTorch, and with a C compiler the CPU-kernel one with
    prefill in C (at every head size: the portable loop where there is no fast path) and without."""
    out: dict[str, Executor] = {"torch": TorchExecutor(CPU)}
    if KERNELS is not None:
        out["cpu"] = CpuExecutor(KERNELS)
        out["cpu-torch-prefill"] = CpuExecutor(KERNELS, prefill_in_c=False)
    return out


def compare(meta: AttentionMetadata, heads: int, kvh: int, d: int, dtype: torch.dtype, seed: int,
            extra: dict[str, Executor] | None = None, triton: bool = True) -> None:
    """Every executor on every plan of the step (nothing, decodes, everything shared) against the
    PyTorch executor's unshared plan, which is checked against the dense oracle. `triton`: the
    Triton executor too (interpreted: about a second a step)."""
    if triton and TRITON is not None:
        extra = {**(extra or {}), "triton": TRITON(CPU, heads, kvh, num_sms=4)}
    gen = torch.Generator().manual_seed(seed)
    k, v = random_pool(meta, kvh, d, dtype, gen)
    q = torch.randn(meta.num_tokens, heads, d, generator=gen).to(dtype)
    scale = d ** -0.5
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    ref = TorchExecutor(CPU)
    want = ref.run(q, k, v, ref.prepare(build_plan(meta, Share.NONE)), scale)
    torch.testing.assert_close(want.double(), dense_attention(meta, q, k, v, scale), **tol)
    for share in Share:
        plan = build_plan(meta, share)
        for name, ex in {**executors(), **(extra or {})}.items():
            got = ex.run(q, k, v, ex.prepare(plan), scale)
            assert got.dtype == dtype and got.shape == q.shape
            torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{name} {share}: {m}")


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
    compare(make_step(rng, groups, singles, bs=4), heads, kvh, d, dtype, seed=1, triton=d == 16 and kvh < 4)


@pytest.mark.parametrize("seed", range(30))
def test_random_configurations(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8, 16])
    groups, singles = random_groups(rng, bs, max_groups=5, max_members=6)
    kvh, g = rng.choice([1, 2]), rng.choice([1, 4, 8])
    dtype = torch.float32 if seed % 2 == 0 else torch.bfloat16
    compare(make_step(rng, groups, singles, bs), kvh * g, kvh, rng.choice([8, 32]), dtype, seed, triton=seed < 4)


def random_groups(rng: random.Random, bs: int, max_groups: int = 4, max_members: int = 5) -> tuple[list, list]:
    """Random groups [(prefix blocks, [(own len, q len)])] and singles [(ctx, q len)] for `make_step`."""
    groups = []
    for _ in range(rng.randint(0, max_groups)):
        members = []
        for _ in range(rng.randint(1, max_members)):
            own = rng.randint(1, 40)
            members.append((own, 1 if rng.random() < 0.6 else rng.randint(1, own)))
        groups.append((rng.randint(1, 64 // bs + 1), members))
    singles = []
    for _ in range(rng.randint(0 if groups else 1, 3)):
        ctx = rng.randint(1, 60)
        singles.append((ctx, 1 if rng.random() < 0.5 else rng.randint(1, ctx)))
    return groups, singles


@pytest.mark.parametrize("seed", range(16))
def test_sliding_window_and_softcap_plans_match_the_dense_oracle(seed: int) -> None:
    """Windowed plans (every share mode; members past the window fall back to their own windowed
    context, members within it share) and soft-capping against the dense oracle, on the PyTorch
    executor with small row pieces (the pieces path) and without."""
    rng = random.Random(100 + seed)
    bs = rng.choice([2, 4, 8])
    meta = make_step(rng, *random_groups(rng, bs), bs)
    window = rng.choice([1, 3, 8, 17, 40, 200])
    softcap = rng.choice([None, 0.5, 5.0])
    kvh, g, d = rng.choice([1, 2]), rng.choice([1, 4]), rng.choice([8, 32])
    dtype = torch.float32
    gen = torch.Generator().manual_seed(seed)
    k, v = random_pool(meta, kvh, d, dtype, gen)
    q = torch.randn(meta.num_tokens, kvh * g, d, generator=gen).to(dtype)
    want = dense_attention(meta, q, k, v, 0.3, window, softcap)
    if window < max(meta.context_lens):  # the window bites
        assert not torch.allclose(want, dense_attention(meta, q, k, v, 0.3, None, softcap), atol=1e-4)
    for share in Share:
        plan = build_plan(meta, share, window)
        for ex in (TorchExecutor(CPU, softcap=softcap), TorchExecutor(CPU, max_rows=4, softcap=softcap)):
            got = ex.run(q, k, v, ex.prepare(plan), 0.3)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{share}: {m}")


def test_windowed_plan_reads_only_the_window_and_shares_only_within_it() -> None:
    """A sequence past the window reads from the block its first row's window starts in; a group
    member shares on a windowed plan only while its whole context fits the window."""
    rng = random.Random(0)
    meta = make_step(rng, [(4, [(4, 1), (30, 1)])], [(50, 1), (50, 10)], bs=4)  # prefix 16 keys
    plan = build_plan(meta, Share.ALL, window=20)
    assert [g.num_members for g in plan.groups] == [1]  # the 20-key member shares, the 46-key one not
    ctx = {(c, n) for c, n in zip(meta.context_lens, meta.query_lens)}
    assert ctx == {(20, 1), (46, 1), (50, 1), (50, 10)}
    # own keys read: 4 (shared member), 46 - 24, 50 - 28, 50 - 20 (first row at 40 sees from 21: block 5)
    assert sorted(plan.decodes.key_lens + plan.prefills.key_lens) == sorted([4, 22, 22, 30])
    assert kv_tokens(plan, 1) < kv_tokens(build_plan(meta, Share.ALL), 1)


def test_cpu_executor_refuses_windowed_plans() -> None:
    if KERNELS is None:
        pytest.skip("no C compiler")
    meta = make_step(random.Random(1), [], [(30, 1)], bs=4)
    with pytest.raises(ValueError):
        CpuExecutor(KERNELS).prepare(build_plan(meta, Share.NONE, window=8))


def test_decode_only_many_groups_one_bucket() -> None:
    rng = random.Random(3)
    groups = [(4, [(rng.randint(1, 20), 1) for _ in range(6)]) for _ in range(7)]
    meta = make_step(rng, groups, [], bs=8)
    assert len(TorchExecutor(CPU).prepare(build_plan(meta, Share.ALL)).groups) == 1
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


@pytest.mark.parametrize("mode", ["auto", "prefix-shared", "reference"])
def test_auto_forward_matches_reference(mode: str) -> None:
    rng = random.Random(5)
    meta = make_step(rng, [(6, [(rng.randint(1, 9), 1) for _ in range(16)]), (1, [(3, 1)])], [(17, 4)], bs=4)
    gen = torch.Generator().manual_seed(5)
    k, v = random_pool(meta, 2, 16, torch.float32, gen)
    q = torch.randn(meta.num_tokens, 8, 16, generator=gen)
    ref = TorchExecutor(CPU)
    want = ref.run(q, k, v, ref.prepare(build_plan(meta, Share.NONE)), 0.25)
    for ex in executors().values():
        attention = Attention(mode, ex)
        torch.testing.assert_close(attention.forward(q, k, v, attention.prepare(meta), 0.25), want, atol=1e-5,
                                   rtol=1e-5)


def test_row_pieces_and_identity_maps() -> None:
    rng = random.Random(7)
    meta = make_step(rng, [(3, [(9, 7), (5, 1), (4, 4)]), (2, [(2, 1)] * 5)], [(11, 8), (6, 1)], bs=4)
    # groups' stacked rows and merged prefill chunks cut into pieces of 3 rows
    compare(meta, 8, 2, 16, torch.float32, seed=7, extra={"torch-3-rows": TorchExecutor(CPU, max_rows=3)})
    assert kv_tokens(build_plan(meta, Share.ALL), rows_per_read=3) == sum(meta.context_lens) - (3 - 4) * 12 - (5 - 2) * 8
    # Decode-only step, one group in row order: no row gather/scatter at all.
    meta = build_metadata([1] * 6, [8 + i for i in range(6)], [[1, 2] + [3 + i, 9 + i] for i in range(6)], 4, CPU,
                          shared_lens=[8] * 6, group_ids=[0] * 6)
    meta.num_blocks = 16
    plan = build_plan(meta, Share.ALL)
    prep = TorchExecutor(CPU).prepare(plan)
    assert prep.decodes is not None and prep.decodes.rows is None
    assert prep.groups[0].dst is None and prep.groups[0].src is None
    if KERNELS is not None:
        cpu = CpuExecutor(KERNELS).prepare(plan)
        assert cpu.shared is not None and cpu.shared.rows is None and cpu.decodes is None
        unshared = CpuExecutor(KERNELS).prepare(build_plan(meta, Share.NONE))
        assert unshared.shared is None and unshared.decodes is not None and unshared.decodes.rows is None
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
