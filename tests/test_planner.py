"""Tests for batchllm.planner: prefix tree, MaximizeReuse, materialisation, order, Plan."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.planner import Plan, PrefixTree, build_plan, decode_ratio, maximize_reuse
from batchllm.planner.prefix_tree import END

Prompts = list[list[int]]


def _worked_example() -> Prompts:
    """docs/design.md §2.2: |A|=100, |B|=|C|=2000, |q|=50; A B q1, A B q2, A B q3, A C q4."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 50_000, n).tolist() for n in (100, 2000, 2000))
    q = [rng.integers(0, 50_000, 50).tolist() for _ in range(4)]
    return [a + b + q[0], a + b + q[1], a + b + q[2], a + c + q[3]]


def test_worked_example() -> None:
    prompts = _worked_example()
    tree = PrefixTree(prompts)
    raw = sorted(maximize_reuse(tree), key=lambda g: g.members)
    assert [g.members for g in raw] == [(0, 1, 2), (3,)]
    assert raw[0].prefix_len == 2100  # AB
    # NOTE: in the compact tree C and q4 lie on one edge, so the one-member group [AC: q4]
    # comes out with the whole prompt A C q4 as its raw prefix (2150); it is unshared anyway.
    assert raw[1].prefix_len == 2150
    plan = build_plan(prompts, block_size=16)
    s = plan.stats
    assert (s.logical_prefill_tokens, s.multilevel_optimum_tokens) == (8600, 4300)
    # AC has one member, so it is unshared: planned = AB 2100 + 3*50 + A C q4 2150 = 4400.
    assert s.planned_prefill_tokens == 2100 + 150 + 2150 == 4400
    assert [(g.prefix_len, g.members) for g in plan.groups if g.shared] == [(2100, (0, 1, 2))]
    assert plan.group_of(3).members == (3,) and not plan.group_of(3).shared
    assert s.num_shared_groups == 1 and s.share_degree_histogram == {1: 1, 3: 1}
    # Recompute mode floors AB to 2096 and recomputes 4 tokens per member.
    rec = build_plan(prompts, block_size=16, partial_block="recompute")
    assert rec.stats.planned_prefill_tokens == 2096 + 3 * 54 + 2150
    assert "saving 48.8%" in str(plan)


def test_n_samples_and_duplicates_keep_one_own_token() -> None:
    prompt = list(range(40))
    plan = build_plan([prompt] * 4, block_size=16)
    assert [(g.prefix_len, g.members, g.own_lens) for g in plan.groups] == [
        (39, (0, 1, 2, 3), (1,) * 4)
    ]
    assert plan.stats.planned_prefill_tokens == 39 + 4
    rec = build_plan([prompt] * 4, block_size=16, partial_block="recompute")
    assert rec.groups[0].prefix_len == 32 and rec.stats.planned_prefill_tokens == 32 + 4 * 8


def test_short_prefix_and_ablations_are_unshared() -> None:
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [9, 9]]
    assert not any(g.shared for g in build_plan(prompts, block_size=16).groups)
    assert build_plan(prompts, block_size=4).group_of(0).prefix_len == 4
    off = build_plan(prompts, block_size=4, global_groups=False, order="input")
    assert off.stats.planned_prefill_tokens == off.stats.logical_prefill_tokens == 12
    assert [g.members for g in off.groups] == [(0,), (1,), (2,)]


def test_order_modes() -> None:
    base = list(range(100, 132))
    prompts = [base + [1], [7] * 20, base + [2], [8] * 5]
    est = [10, 1000, 10, 1]
    plan = build_plan(prompts, block_size=16, expected_output_tokens=est)
    assert [g.members for g in plan.groups] == [(1,), (0, 2), (3,)]
    by_input = build_plan(prompts, block_size=16, order="input")
    assert [g.members for g in by_input.groups] == [(0, 2), (1,), (3,)]
    # Equal R: the longer prefix goes first, then the lower first member.
    # R = 2/42 for the pair (prefix 40 + 2 own tokens) and 1/21 for each 21-token single.
    tie = build_plan([[9] * 21, [5] * 40 + [1], [5] * 40 + [2], [8] * 21], block_size=16)
    assert [g.members for g in tie.groups] == [(1, 2), (0,), (3,)]


def test_deep_chain_no_recursion() -> None:
    prompts = [list(range(k)) for k in range(1, 3 * sys.getrecursionlimit())]
    plan = build_plan(prompts, block_size=16)
    assert sorted(m for g in plan.groups for m in g.members) == list(range(len(prompts)))


def test_numpy_and_list_inputs_agree_and_bad_inputs_raise() -> None:
    prompts = _worked_example()
    arrays = [np.asarray(p, dtype=np.int32) for p in prompts]
    assert build_plan(arrays) == build_plan(prompts)
    with pytest.raises(ValueError):
        build_plan([[1, 2], []])
    with pytest.raises(ValueError):
        build_plan([[1, 2]], expected_output_tokens=[1, 2])
    with pytest.raises(ValueError):
        build_plan([[1.5, 2.0]])
    assert build_plan([]).stats.num_groups == 0


def test_planner_does_not_import_torch() -> None:
    """The planner's own imports work with torch unimportable (the package __init__ is
    bypassed: it may pull in the engine)."""
    import subprocess
    from pathlib import Path

    import batchllm.planner

    pkg_dir = str(Path(batchllm.planner.__file__).resolve().parent.parent)
    code = f"""
import importlib.abc, sys, types
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, NoTorch())
pkg = types.ModuleType("batchllm")
pkg.__path__ = [{pkg_dir!r}]
sys.modules["batchllm"] = pkg
from batchllm.planner import build_plan
assert build_plan([[1, 2, 3]] * 2, block_size=1).stats.num_shared_groups == 1
assert "torch" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- property tests -------------------------------------------------------------------

tokens = st.lists(st.integers(0, 3), min_size=1, max_size=12)
random_sets = st.lists(tokens, min_size=1, max_size=25)


@st.composite
def nested_sets(draw: st.DrawFn) -> Prompts:
    """system prompt -> document -> question, with reuse at every level and duplicates."""
    part = lambda lo, hi: st.lists(st.integers(-2, 70_000), min_size=lo, max_size=hi)  # noqa: E731
    systems = draw(st.lists(part(0, 20), min_size=1, max_size=2))
    docs = draw(st.lists(part(0, 40), min_size=1, max_size=4))
    questions = draw(st.lists(part(1, 10), min_size=1, max_size=5))
    n = draw(st.integers(1, 30))
    pick = lambda xs: draw(st.sampled_from(xs))  # noqa: E731
    prompts = [pick(systems) + pick(docs) + pick(questions) for _ in range(n)]
    return prompts + draw(st.lists(st.sampled_from(prompts), max_size=4))


any_sets = st.one_of(random_sets, nested_sets())


def _check_tree(prompts: Prompts, tree: PrefixTree) -> None:
    seen: list[int] = []
    todo = [(tree.root, [])]
    while todo:
        node, path = todo.pop()
        path = path + tree.edge_tokens(node)
        assert node.count == len(node.seqs) + sum(c.count for c in node.children.values())
        assert not (node.seqs and node.children)
        for key, child in node.children.items():
            assert child.start == node.depth
            assert key == (END if child.edge_len == 0 else tree.edge_tokens(child)[0])
            todo.append((child, path))
        for s in node.seqs:
            assert list(prompts[s]) == path
        seen += node.seqs
    assert sorted(seen) == list(range(len(prompts)))


class _Ref:
    """Reference node for a naive recursive MaximizeReuse (leaf count recomputed, not cached)."""

    def __init__(self, length: int, kids: list[_Ref], seqs: list[int]) -> None:
        self.length, self.kids, self.seqs = length, kids, seqs

    def leaves(self) -> list[int]:
        return self.seqs + [s for k in self.kids for s in k.leaves()]


def _reference_groups(prompts: Prompts) -> set[tuple[int, tuple[int, ...]]]:
    trie: dict = {}
    for i, p in enumerate(prompts):
        d = trie
        for t in p:
            d = d.setdefault(t, {})
        d.setdefault(END, []).append(i)

    def compact(d: dict) -> list[_Ref]:
        out = []
        for key, sub in d.items():
            if key is END:
                out.append(_Ref(0, [], sub))
                continue
            n = 1
            while len(sub) == 1 and END not in sub:
                sub, n = next(iter(sub.values())), n + 1
            out.append(_Ref(n, [], sub[END]) if list(sub) == [END] else _Ref(n, compact(sub), []))
        return out

    def run(v: _Ref) -> None:
        for c in v.kids:
            run(c)
        new = []
        for c in v.kids:
            hoist = [g for g in c.kids if (len(g.leaves()) - 1) * g.length - c.length > 0]
            for g in hoist:
                g.length += c.length
            c.kids = [g for g in c.kids if g not in hoist]
            new += hoist
            if len(c.kids) == 1:
                c.kids[0].length += c.length
                new.append(c.kids[0])
            elif c.kids or c.seqs:
                new.append(c)
        v.kids = new

    root = _Ref(0, compact(trie), [])
    run(root)
    return {(c.length, tuple(sorted(c.leaves()))) for c in root.kids}


@settings(max_examples=200, deadline=None)
@given(any_sets)
def test_tree_matches_brute_force(prompts: Prompts) -> None:
    tree = PrefixTree(prompts)
    _check_tree(prompts, tree)
    distinct = {tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)}
    assert tree.multilevel_optimum_tokens == len(distinct)
    raw = maximize_reuse(tree)
    assert {(g.prefix_len, g.members) for g in raw} == _reference_groups(prompts)
    for prefix_len, members in raw:
        assert len({tuple(prompts[m][:prefix_len]) for m in members}) == 1
        assert all(len(prompts[m]) >= prefix_len for m in members)


@settings(max_examples=300, deadline=None)
@given(
    any_sets,
    st.sampled_from([1, 2, 4, 16]),
    st.sampled_from(["copy", "recompute"]),
    st.sampled_from(["decode-ratio", "input"]),
    st.data(),
)
def test_plan_properties(prompts: Prompts, bs: int, mode: str, order: str, data: st.DataObject) -> None:
    est = data.draw(st.lists(st.integers(1, 500), min_size=len(prompts), max_size=len(prompts)))
    plan = build_plan(prompts, block_size=bs, expected_output_tokens=est, partial_block=mode, order=order)
    members = sorted(m for g in plan.groups for m in g.members)
    assert members == list(range(len(prompts)))
    for m in range(len(prompts)):
        assert m in plan.group_of(m).members
    planned = 0
    for g in plan.groups:
        assert list(g.members) == sorted(g.members)
        assert g.own_lens == tuple(len(prompts[m]) - g.prefix_len for m in g.members)
        assert min(g.own_lens) >= 1
        if g.shared:
            assert g.prefix_len >= bs and len({tuple(prompts[m][: g.prefix_len]) for m in g.members}) == 1
            planned += g.prefix_len + sum(g.own_lens)
            if mode == "recompute":
                assert g.prefix_len % bs == 0
        else:
            assert g.prefix_len == 0 and len(g.members) == 1
            planned += len(prompts[g.members[0]])
    s = plan.stats
    assert s.planned_prefill_tokens == planned
    assert s.logical_prefill_tokens == sum(map(len, prompts))
    assert s.multilevel_optimum_tokens <= s.planned_prefill_tokens <= s.logical_prefill_tokens
    assert s.num_groups == len(plan.groups)
    assert sum(k * v for k, v in s.share_degree_histogram.items()) == len(prompts)
    if order == "decode-ratio":
        keys = [(decode_ratio(g, est), g.prefix_len) for g in plan.groups]
        assert all(a >= b for a, b in zip(keys, keys[1:]))
    else:
        firsts = [g.members[0] for g in plan.groups]
        assert firsts == sorted(firsts)
    assert Plan.from_json(plan.to_json()) == plan
    assert str(plan) == plan.summary()
    arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
    kwargs = dict(block_size=bs, expected_output_tokens=est, partial_block=mode, order=order)
    assert build_plan(arrays, **kwargs) == plan
