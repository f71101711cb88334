"""Packing a planned batch into bins of whole prefix groups, balanced by predicted work.

Pure data (no torch, no Ray). A bin is what one replica runs in one go: its requests are
planned again there, so every prefix group inside it is computed once per bin. Predicted work
of a group = its prefix once + each member's own prompt tokens + each member's output tokens.

Rules: a request (all its prompts and samples) is never split; groups linked by a request
(its prompts fall into several groups) travel together; such a linked unit larger than one
replica's share of the batch is cut between its requests (each part pays the prefix of every
group it touches once) where that shortens the busiest replica by more than the repeated
prefixes cost (`_parts`); then units go largest first to the least loaded bin (LPT). Ties
break on the lowest request index and the lowest bin index, so packing is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from batchllm.batch_plan import plan_batch
from batchllm.config import EngineConfig
from batchllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class GroupWork:
    """One prefix group: `prefix_len` computed once (0 when unshared); `members` holds
    (request index, own prompt tokens, output tokens) per sequence."""

    prefix_len: int
    members: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Bin:
    """Requests (ascending indices) run together on one replica; `work` their predicted tokens."""

    requests: tuple[int, ...]
    work: int


def work_of(groups: Sequence[GroupWork], requests: set[int] | None = None) -> int:
    """Predicted tokens of `groups` restricted to `requests` (all when None): each touched
    group's prefix once plus its members' own and output tokens."""
    total = 0
    for g in groups:
        own = [o + out for r, o, out in g.members if requests is None or r in requests]
        if own:
            total += g.prefix_len + sum(own)
    return total


def _linked(groups: Sequence[GroupWork]) -> list[list[int]]:
    """Indices of groups joined by a shared request (union-find), each list ascending, the
    lists ordered by their first group."""
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for r, _, _ in g.members:
            if r in owner:
                a, b = root(owner[r]), root(gi)
                parent[max(a, b)] = min(a, b)
            else:
                owner[r] = gi
    units: dict[int, list[int]] = {}
    for gi in range(len(groups)):
        units.setdefault(root(gi), []).append(gi)
    return list(units.values())


def _split(groups: list[GroupWork], k: int) -> list[tuple[int, ...]]:
    """Requests of linked `groups` cut, in ascending order, into at most `k` parts of roughly
    equal work, each part paying the prefixes of the groups it touches."""
    by_request: dict[int, list[tuple[int, int]]] = {}  # request -> (group, own + output tokens)
    for gi, g in enumerate(groups):
        for r, own, out in g.members:
            by_request.setdefault(r, []).append((gi, own + out))
    target = (work_of(groups) + (k - 1) * sum(g.prefix_len for g in groups)) / k
    parts: list[tuple[int, ...]] = []
    current: list[int] = []
    work, touched = 0, set()
    for r in sorted(by_request):
        current.append(r)
        for gi, tokens in by_request[r]:
            work += tokens + (groups[gi].prefix_len if gi not in touched else 0)
            touched.add(gi)
        if len(parts) < k - 1 and work >= target:
            parts.append(tuple(current))
            current, work, touched = [], 0, set()
    return parts + [tuple(current)] if current else parts


def _parts(groups: list[GroupWork], total: int, replicas: int) -> int:
    """How many parts linked `groups` are cut into: the k in 1..replicas that minimises a bound
    on the busiest replica, max(one part, all work incl. the repeated prefixes / replicas), plus
    the repeated prefixes' cost over the replicas (compute spent twice is lost to every other
    job on the cluster, so a split must shorten the run by more than it wastes)."""
    work, prefixes = work_of(groups), sum(g.prefix_len for g in groups)
    n = len({r for g in groups for r, _, _ in g.members})

    def bound(k: int) -> float:
        extra = (k - 1) * prefixes
        return max((work + extra) / k, (total + extra) / replicas) + extra / replicas

    return min(range(1, min(replicas, n) + 1), key=lambda k: (bound(k), k))


BINS_PER_REPLICA = 4  # several bins per replica, so one slow bin does not leave the others idle


def pack(groups: Sequence[GroupWork], replicas: int, bins_per_replica: int = BINS_PER_REPLICA) -> list[Bin]:
    """Pack every request of `groups` into at most `replicas * bins_per_replica` bins (see the
    module docstring). Linked groups are split only when their work exceeds one replica's share
    of the whole, into as many parts (at most `replicas`) as minimise the busiest replica's
    bound; smaller ones can be balanced by the other bins. Returns the non-empty bins, largest
    first (the order to run them in)."""
    if replicas < 1 or bins_per_replica < 1:
        raise ValueError(f"replicas and bins_per_replica must be >= 1, got {replicas} and {bins_per_replica}")
    num_bins = replicas * bins_per_replica
    total = work_of(groups)
    units: list[tuple[int, tuple[int, ...]]] = []  # (work, requests)
    for linked in _linked(groups):
        members = [groups[i] for i in linked]
        work = work_of(members)
        k = _parts(members, total, replicas) if work > total / replicas else 1
        if k > 1:
            units += [(work_of(members, set(p)), p) for p in _split(members, k)]
        else:
            units.append((work, tuple(sorted({r for g in members for r, _, _ in g.members}))))
    units.sort(key=lambda u: (-u[0], u[1][0]))
    heap = [(0, b) for b in range(num_bins)]  # (load, bin index): least loaded, then lowest index
    filled: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for work, requests in units:
        load, b = heapq.heappop(heap)
        filled[b] += requests
        loads[b] = load + work
        heapq.heappush(heap, (loads[b], b))
    bins = [Bin(tuple(sorted(f)), loads[b]) for b, f in enumerate(filled) if f]
    return sorted(bins, key=lambda x: (-x.work, x.requests[0]))


def groups_of_plan(plan_groups: Sequence[tuple[int, Sequence[int], Sequence[int]]], request_of: Sequence[int],
                   output_tokens: Sequence[int]) -> list[GroupWork]:
    """`GroupWork` from a plan's groups given as (prefix_len, member sequence indices, own
    lengths); `request_of[s]` and `output_tokens[s]` are sequence s's request and expected output."""
    return [GroupWork(prefix, tuple((request_of[m], own, output_tokens[m]) for m, own in zip(members, owns,
                                                                                             strict=True)))
            for prefix, members, owns in plan_groups]


def pack_batch(cfg: EngineConfig, prompt_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams],
               request_of_prompt: Sequence[int], replicas: int) -> list[Bin]:
    """Plan the prompts as one batch under `cfg` (`plan_batch`: prompt i's n samples are n
    sequences) and pack its groups into bins; `request_of_prompt[i]` is prompt i's request."""
    plan = plan_batch(cfg, prompt_ids, params)
    request_of = [r for r, p in zip(request_of_prompt, params, strict=True) for _ in range(p.n)]
    expected = [p.max_tokens for p in params for _ in range(p.n)]
    return pack(groups_of_plan([(g.prefix_len, g.members, g.own_lens) for g in plan.groups], request_of, expected),
                replicas)
