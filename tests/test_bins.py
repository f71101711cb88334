"""The bin packer of the Ray runner (batchllm/distributed/bins.py): LPT balance, groups whole,
splitting only between members, deterministic. Pure data: no model, no Ray."""

from __future__ import annotations

import random

import pytest

from batchllm.distributed.bins import Bin, GroupWork, pack, work_of


def _group(prefix: int, requests: list[int], own: int = 10, out: int = 5) -> GroupWork:
    return GroupWork(prefix, tuple((r, own, out) for r in requests))


def _where(bins: list[Bin]) -> dict[int, int]:
    where: dict[int, int] = {}
    for b, x in enumerate(bins):
        for r in x.requests:
            assert r not in where, f"request {r} in two bins"
            where[r] = b
    return where


def test_lpt_balance_on_a_known_case() -> None:
    # unshared single requests of work 7..1 into 3 bins: LPT gives loads 10, 9, 9
    groups = [GroupWork(0, ((r, w, 0),)) for r, w in enumerate([7, 6, 5, 4, 3, 2, 1])]
    bins = pack(groups, 3, bins_per_replica=1)
    assert sorted(b.work for b in bins) == [9, 9, 10]
    assert bins[0].work == 10  # largest first
    assert sum(b.work for b in bins) == work_of(groups)
    assert [b.work for b in bins] == [work_of(groups, set(b.requests)) for b in bins]


def test_groups_stay_whole_and_balance_within_one_group() -> None:
    rng = random.Random(1)
    groups, r = [], 0
    for _ in range(40):
        size = rng.randint(1, 9)
        groups.append(_group(rng.choice([0, 100, 300]) if size > 1 else 0, list(range(r, r + size)),
                             rng.randint(1, 50), rng.randint(1, 20)))
        r += size
    bins = pack(groups, replicas=2)
    where = _where(bins)
    assert sorted(where) == list(range(r))
    for g in groups:
        assert len({where[m] for m, _, _ in g.members}) == 1  # no group is larger than a replica's share
    assert len(bins) <= 8
    largest = max(work_of([g]) for g in groups)
    assert max(b.work for b in bins) - min(b.work for b in bins) <= largest  # LPT's bound


def test_linked_groups_travel_together() -> None:
    # request 3 has prompts in both groups: they must share a bin
    groups = [_group(50, [0, 1, 3]), _group(50, [2, 3, 4]), _group(50, [5, 6])]
    where = _where(pack(groups, 1, bins_per_replica=3))
    assert len({where[r] for r in (0, 1, 2, 3, 4)}) == 1 and where[5] == where[6]


def test_a_group_too_large_splits_only_between_members() -> None:
    big = _group(300, list(range(16)), own=20, out=10)
    small = [_group(0, [16 + i]) for i in range(4)]
    bins = pack([big, *small], replicas=2)
    where = _where(bins)
    parts = {where[m] for m, _, _ in big.members}
    # 2 parts: 540 tokens each (prefix + 8 members); unsplit, one replica would get 780 of 840
    assert len(parts) == 2
    for b in bins:
        in_big = [r for r in b.requests if r < 16]
        if in_big:  # each part pays the prefix once, plus its members' own tokens
            assert work_of([big], set(in_big)) == 300 + 30 * len(in_big)
    assert sum(b.work for b in bins) == work_of([big, *small]) + 300  # one extra prefix


def test_a_request_with_many_prompts_is_never_split() -> None:
    # request 0 is one request holding 12 prompts of one group: it cannot be cut
    g = GroupWork(100, tuple((0, 10, 10) for _ in range(12)))
    bins = pack([g, _group(0, [1])], replicas=4)
    assert [b.requests for b in bins] == [(0,), (1,)]


def test_a_group_is_not_split_when_the_prefix_would_cost_more() -> None:
    # a 2,000-token prefix shared by 4 short members, beside a little other work: splitting it in
    # two would make each half 2,000+ tokens, no better than keeping it whole
    big = _group(2000, [0, 1, 2, 3], own=10, out=10)
    bins = pack([big, _group(0, [4]), _group(0, [5])], replicas=2)
    assert len({_where(bins)[r] for r in range(4)}) == 1


def test_deterministic() -> None:
    rng = random.Random(7)
    groups = [_group(rng.randint(0, 200), list(range(8 * i, 8 * i + rng.randint(1, 8)))) for i in range(30)]
    assert pack(groups, 3) == pack(list(groups), 3)


@pytest.mark.parametrize("bad", [0, -1])
def test_refuses_no_bins(bad: int) -> None:
    with pytest.raises(ValueError):
        pack([_group(0, [0])], bad)
    with pytest.raises(ValueError):
        pack([_group(0, [0])], 2, bins_per_replica=bad)
