"""Attention plans: what they cover, what they share, what that saves, which one a step gets, and
which executor an engine gets."""

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

import batchllm.attention.select as select  # noqa: E402
from batchllm.attention.cost import kv_bytes_read, saved_tokens  # noqa: E402
from batchllm.attention.executor import ExecutorKind  # noqa: E402
from batchllm.attention.metadata import build_metadata  # noqa: E402
from batchllm.attention.plan import AttentionPlan, Share, build_plan  # noqa: E402
from batchllm.attention.select import (AUTO_SHARE, MAX_ROWS, SHARED_DECODE_MEMBERS, Attention, Mode,  # noqa: E402
                                       make_attention, make_executor, plan_step)
from batchllm.attention.torch_executor import TorchExecutor  # noqa: E402
from batchllm.kernels.cpu import load_cpu_kernels  # noqa: E402

from attention_steps import CPU, make_step  # noqa: E402  (tests/)

KERNELS = load_cpu_kernels()


def random_step(seed: int):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 16])
    groups = [(rng.randint(1, 4), [(own, 1 if rng.random() < 0.6 else rng.randint(1, own))
                                   for own in (rng.randint(1, 30) for _ in range(rng.randint(1, 5)))])
              for _ in range(rng.randint(0, 4))]
    singles = [(ctx, 1 if rng.random() < 0.5 else rng.randint(1, ctx))
               for ctx in (rng.randint(1, 40) for _ in range(rng.randint(1, 3)))]
    return make_step(rng, groups, singles, bs)


def shared_len(plan: AttentionPlan, kind: str, i: int) -> int:
    return next((g.num_keys for g in plan.groups if i in getattr(g, kind)), 0)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("share", list(Share))
def test_plan_covers_every_query_once_over_its_whole_context(seed: int, share: Share) -> None:
    meta = random_step(seed)
    plan = build_plan(meta, share)
    assert plan.share is share and plan.num_tokens == meta.num_tokens and plan.block_size == meta.block_size
    rows = [r for part in (plan.decodes, plan.prefills) for r0, n in zip(part.rows, part.num_rows)
            for r in range(r0, r0 + n)]
    assert sorted(rows) == list(range(meta.num_tokens))
    assert all(n == 1 for n in plan.decodes.num_rows) and all(n > 1 for n in plan.prefills.num_rows)
    ctx = dict(zip(meta.query_starts, meta.context_lens))
    bs = meta.block_size
    for kind, part in (("decodes", plan.decodes), ("prefills", plan.prefills)):
        for i, (row, table, keys) in enumerate(zip(part.rows, part.tables, part.key_lens)):
            # own keys plus the shared prefix are the whole context; the table holds just the own keys
            assert keys + shared_len(plan, kind, i) == ctx[row] and len(table) == -(-ctx[row] // bs) - (ctx[row] - keys) // bs
    for g in plan.groups:
        assert g.num_keys == len(g.blocks) * bs and g.num_members > 0
        assert share is Share.ALL or not g.prefills
    if share is Share.NONE:
        assert not plan.groups and not plan.prefix_shared
    assert plan.prefills.first_limits() == [t - n + 1 for t, n in zip(plan.prefills.key_lens, plan.prefills.num_rows)]


def test_groups_are_keyed_by_prefix_blocks() -> None:
    """Two members with one group id but different prefix blocks never share; a one-member group
    is still a group (its merge is exact)."""
    meta = build_metadata([1, 1, 1, 3], [9, 10, 9, 12], [[1, 2, 3], [1, 2, 4], [5, 6, 7], [1, 2, 8]], 4, CPU,
                          shared_lens=[8, 8, 8, 8], group_ids=[0, 0, 0, 0])
    plan = build_plan(meta, Share.ALL)
    assert [(g.blocks, g.decodes, g.prefills) for g in plan.groups] == [([1, 2], [0, 1], [0]), ([5, 6], [2], [])]
    assert plan.decodes.tables == [[3], [4], [7]] and plan.decodes.key_lens == [1, 2, 1]
    assert plan.merges_decodes and plan.merges_prefills
    decodes = build_plan(meta, Share.DECODES)
    assert [g.prefills for g in decodes.groups] == [[], []] and decodes.prefills.tables == [[1, 2, 8]]
    assert not decodes.merges_prefills


def test_kv_bytes_read_counts_prefix_once() -> None:
    rng = random.Random(0)
    meta = make_step(rng, [(10, [(3, 1)] * 4)], [(7, 1)], bs=4)  # prefix 40 tokens, 4 members
    ref = kv_bytes_read(build_plan(meta, Share.NONE), num_layers=2, bytes_per_token_per_layer=10, rows_per_read=MAX_ROWS)
    shared = kv_bytes_read(build_plan(meta, Share.ALL), num_layers=2, bytes_per_token_per_layer=10,
                           rows_per_read=MAX_ROWS)
    assert ref == (4 * 43 + 7) * 20
    assert shared == (40 + 4 * 3 + 7) * 20
    with pytest.raises(ValueError):
        Share("other")


def test_auto_selection() -> None:
    rng = random.Random(0)
    small = make_step(rng, [(2, [(5, 1), (9, 1)])], [(30, 1)], bs=16)  # 2 members, 32-token prefix
    big = make_step(rng, [(1008 // 16, [(100, 1)] * 16)], [], bs=16)  # 16 members, 1008-token prefix
    assert saved_tokens(build_plan(small, Share.ALL), MAX_ROWS) == 32
    assert saved_tokens(build_plan(big, Share.ALL), MAX_ROWS) == 15 * 1008

    def share(meta, kind: ExecutorKind, mode: Mode = Mode.AUTO) -> Share:
        return plan_step(meta, mode, kind).share

    assert share(small, ExecutorKind.TORCH) is Share.NONE and share(big, ExecutorKind.TORCH) is Share.ALL
    auto = Attention("auto", TorchExecutor(CPU))
    assert not auto.prepare(small).plan.prefix_shared and auto.prepare(big).plan.prefix_shared
    mid = make_step(rng, [(512 // 16, [(20, 1)] * 4)], [], bs=16)  # 4 members, 512-token prefix
    assert saved_tokens(build_plan(mid, Share.ALL), MAX_ROWS) == 3 * 512
    assert share(mid, ExecutorKind.TORCH) is Share.NONE  # the C path pays off sooner
    assert share(mid, ExecutorKind.CPU_KERNELS) is Share.DECODES and share(mid, ExecutorKind.CPU_DECODE_KERNELS) is Share.ALL
    assert share(small, ExecutorKind.CPU_KERNELS) is Share.NONE
    # members' prefill chunks: shared on the PyTorch path; with C prefill only decode queries count
    pre = make_step(rng, [(1008 // 16, [(100, 50)] * 16)], [], bs=16)
    assert saved_tokens(build_plan(pre, Share.ALL), MAX_ROWS) == 14 * 1008
    assert saved_tokens(build_plan(pre, Share.DECODES), SHARED_DECODE_MEMBERS) == 0
    assert share(pre, ExecutorKind.TORCH) is Share.ALL and share(pre, ExecutorKind.CPU_DECODE_KERNELS) is Share.ALL
    assert AUTO_SHARE[ExecutorKind.CPU_KERNELS][0] is Share.DECODES and AUTO_SHARE[ExecutorKind.TORCH][0] is Share.ALL
    assert share(pre, ExecutorKind.CPU_KERNELS) is Share.NONE
    assert share(pre, ExecutorKind.CPU_KERNELS, Mode.PREFIX_SHARED) is Share.ALL  # forced: prefill shared too
    for kind in ExecutorKind:
        assert share(big, kind, Mode.REFERENCE) is Share.NONE
        assert share(small, kind, Mode.PREFIX_SHARED) is Share.ALL
        assert share(make_step(rng, [], [(9, 1)], bs=4), kind, Mode.PREFIX_SHARED) is Share.ALL  # counted as shared
    if KERNELS is not None:
        assert Attention("auto", make_executor(CPU, torch.float32, 64, KERNELS)).prepare(mid).plan.prefix_shared
    with pytest.raises(ValueError):
        Attention("fast", TorchExecutor(CPU))  # type: ignore[arg-type]


def test_auto_builds_one_plan_where_it_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """The groups are worked out once per step: a second plan only where sharing does not pay."""
    calls: list[Share] = []
    real = select.build_plan
    monkeypatch.setattr(select, "build_plan", lambda meta, share, window=None: calls.append(share) or real(meta, share, window))
    rng = random.Random(1)
    big = make_step(rng, [(1008 // 16, [(100, 1)] * 16)], [], bs=16)
    none = make_step(rng, [], [(30, 1), (20, 5)], bs=16)
    small = make_step(rng, [(2, [(5, 1), (9, 1)])], [], bs=16)
    for meta, want in ((big, [Share.ALL]), (none, [Share.ALL]), (small, [Share.ALL, Share.NONE])):
        calls.clear()
        plan_step(meta, Mode.AUTO, ExecutorKind.TORCH)
        assert calls == want


def test_factory_picks_the_executor_once_from_device_dtype_head_size_and_kernels() -> None:
    assert make_executor(CPU, torch.float32, 64, None).kind is ExecutorKind.TORCH  # no compiler / switched off
    assert make_executor(torch.device("meta"), torch.float32, 64, KERNELS).kind is ExecutorKind.TORCH
    assert make_executor(CPU, torch.float16, 64, KERNELS).kind is ExecutorKind.TORCH  # a dtype the kernels lack
    if KERNELS is not None:
        for dtype in (torch.float32, torch.bfloat16):
            for d in (16, 64, 128):
                ex = make_executor(CPU, dtype, d, KERNELS)
                want = ExecutorKind.CPU_KERNELS if KERNELS.fast_prefill(d) else ExecutorKind.CPU_DECODE_KERNELS
                assert ex.kind is want and ex.kernels is KERNELS  # type: ignore[attr-defined]
        assert KERNELS.fast_prefill(64) == KERNELS.avx512_decode
    attention = make_attention("reference", CPU, torch.float32, 64, None)
    assert attention.mode is Mode.REFERENCE and isinstance(attention.executor, TorchExecutor)
    with pytest.raises(ValueError):
        make_attention("fast", CPU, torch.float32, 64, None)


def test_config_attention_modes_are_the_selectors() -> None:
    """config.py names the modes without importing torch; they must be exactly select.Mode's."""
    from batchllm.attention.select import Mode
    from batchllm.config import ATTENTION_MODES

    assert ATTENTION_MODES == tuple(m.value for m in Mode)
