"""The scheduler's parts without a model: every waiting queue satisfies `WaitingQueue` and drains
in its order; `Waiting` puts preempted sequences first over any of them; the step loop with the
baselines' and the batchllm policy (cache hits attached, group members on their prefix's blocks
plus a copy of its partial block, prefixes released with their last member); and each piece of
`Sequence` state is changed by one module only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from batchllm import SamplingParams
from batchllm.planner import build_plan
from batchllm.scheduler.batch_scheduler import GroupPolicy
from batchllm.scheduler.block_manager import BlockManager
from batchllm.scheduler.groups import PlanQueue, build_groups
from batchllm.scheduler.queues import FcfsQueue, LpmQueue, Waiting, WaitingQueue
from batchllm.scheduler.scheduler import CachePolicy, Scheduler, SchedulerOutput
from batchllm.sequence import Sequence, SequenceStatus

BS = 4
SRC = Path(__file__).resolve().parents[1] / "src" / "batchllm"


def seq(seq_id: int, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(seq_id=seq_id, request_index=seq_id, sample_index=0, token_ids=list(tokens),
                    num_prompt_tokens=len(tokens), params=SamplingParams(temperature=0, max_tokens=max_tokens))


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step without a model: schedule, count the KV, sample token 7 for every sequence
    whose last token was computed, finish those at max_tokens."""
    out = sched.schedule()
    assert out.seqs
    sched.after_step(out)
    for s in out.seqs:
        if not s.is_prefix and s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
    return out


def run_to_end(sched: Scheduler, max_steps: int = 200) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched))
        assert len(outs) < max_steps
    return outs


# ---- waiting queues --------------------------------------------------------------------------

def plan_queue(seqs: list[Sequence]) -> tuple[PlanQueue, list[Sequence]]:
    """A PlanQueue over `seqs`, and the order in which it admits them (prefixes included) when
    each prefix's KV is complete as soon as it is admitted."""
    plan = build_plan([s.token_ids for s in seqs], block_size=BS, order="input")
    groups = build_groups(plan, seqs)
    order = [x for g in groups for x in ([g.prefix] if g.prefix is not None else []) + g.members]
    return PlanQueue(groups), order


def queues(seqs: list[Sequence]) -> list[tuple[WaitingQueue, list[Sequence]]]:
    """Every queue class over `seqs`, each with the order it admits them in (nothing is cached)."""
    return [(FcfsQueue(seqs), seqs), (LpmQueue(seqs, BlockManager(64, BS, enable_caching=True)), seqs),
            plan_queue(seqs)]


def take(q: WaitingQueue | Waiting) -> Sequence | None:
    """Pop what `q` offers next; a popped prefix counts as computed at once."""
    s = q.peek()
    if s is not None:
        n = len(q)
        q.pop(s)
        assert len(q) == n - 1
        if s.is_prefix:
            s.num_computed_tokens = s.num_tokens  # stands in for its prefill (no block manager here)
    return s


def drain(q: WaitingQueue | Waiting) -> list[Sequence]:
    """Pop everything `q` offers, in its order."""
    popped = []
    while (s := take(q)) is not None:
        popped.append(s)
    assert len(q) == 0
    return popped


def some_seqs() -> list[Sequence]:
    shared = list(range(100, 110))
    return [seq(0, shared + [1, 2]), seq(1, [50, 51, 52]), seq(2, shared + [3, 4, 5])]


@pytest.mark.parametrize("kind", ["fcfs", "lpm", "plan"])
def test_each_queue_satisfies_the_protocol_and_drains_in_order(kind: str) -> None:
    seqs = some_seqs()
    q, order = queues(seqs)[["fcfs", "lpm", "plan"].index(kind)]
    assert isinstance(q, WaitingQueue)
    assert len(q) == len(order)
    assert drain(q) == order
    assert q.peek() is None


@pytest.mark.parametrize("kind", ["fcfs", "lpm", "plan"])
def test_preempted_sequences_go_first_over_every_queue(kind: str) -> None:
    seqs = some_seqs()
    q, order = queues(seqs)[["fcfs", "lpm", "plan"].index(kind)]
    w = Waiting(q)
    assert take(w) is order[0]
    x, y = seq(10, [9, 9]), seq(11, [8, 8])
    w.push_preempted(x)
    w.push_preempted(y)  # the most recently preempted comes back first
    assert list(w.preempted) == [y, x] and len(w) == len(order) + 1
    assert drain(w) == [y, x] + order[1:]


def test_the_protocol_has_no_add() -> None:
    """Queues are filled when they are made (PlanQueue from the plan), so `add` is no part of it."""
    assert not hasattr(PlanQueue, "add") and not hasattr(FcfsQueue, "add")


# ---- the step loop -------------------------------------------------------------------------

def test_finish_is_the_schedulers_and_frees_the_blocks() -> None:
    bm = BlockManager(16, BS)
    seqs = [seq(0, [5, 6, 7, 8, 9]), seq(1, [10, 11])]
    sched = Scheduler(bm, FcfsQueue(seqs), CachePolicy(bm), 64, None)
    step(sched)
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)
    sched.finish(seqs[1], "stop")
    assert seqs[1].is_finished and seqs[1].finish_reason == "stop" and seqs[1].block_table == []
    assert sched.running == [seqs[0]]
    run_to_end(sched)
    assert seqs[0].finish_reason == "length" and bm.num_used_blocks == 0


def test_cache_hits_are_attached_at_admission() -> None:
    """fcfs-lru: the second sequence starts on the first one's published prompt blocks."""
    bm = BlockManager(16, BS, enable_caching=True)
    a, b = seq(0, list(range(20, 29))), seq(1, list(range(20, 28)) + [99, 98])
    sched = Scheduler(bm, FcfsQueue([a, b]), CachePolicy(bm), 9, None)  # budget: only a in the first step
    assert step(sched).seqs == [a]
    out = step(sched)
    assert out.seqs == [a, b] and out.num_tokens == [1, 2]
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8 and b.num_shared_blocks == 0
    run_to_end(sched)
    assert bm.num_used_blocks == 0


@pytest.mark.parametrize("prefix_len", [10, 8])
def test_group_members_start_on_their_prefix(prefix_len: int) -> None:
    """batchllm: the prefix pseudo-sequence runs first and leaves the running sequences when
    complete; members reference its full blocks, get a copy of its partial block (if any), and
    the prefix is freed with the last member."""
    shared = list(range(100, 100 + prefix_len))
    seqs = [seq(0, shared + [1, 2]), seq(1, shared + [3, 4, 5]), seq(2, [50, 51, 52])]
    plan = build_plan([s.token_ids for s in seqs], block_size=BS, order="input")
    groups = build_groups(plan, seqs)
    bm = BlockManager(32, BS)
    sched = Scheduler(bm, PlanQueue(groups), GroupPolicy(bm, groups, True, 0.9), 64, None)
    prefix = next(g.prefix for g in groups if g.prefix is not None)
    assert prefix.num_tokens == prefix_len and prefix.group_id == seqs[0].group_id
    out = step(sched)
    assert out.seqs[0] is prefix and prefix not in sched.running  # complete after one step
    out = step(sched)
    members = [s for s in out.seqs if s.group_id == prefix.group_id]
    assert len(members) == 2
    full = prefix_len // BS
    for m in members:
        assert m.block_table[:full] == prefix.block_table[:full] and m.num_shared_blocks == full
        assert m.num_cached_tokens == prefix_len
    if prefix_len % BS:
        assert out.copies == [(prefix.block_table[full], m.block_table[full]) for m in members]
    else:
        assert out.copies == []
    run_to_end(sched)
    assert prefix.block_table == [] and bm.num_used_blocks == 0


# ---- one owner per piece of Sequence state -------------------------------------------------

OWNERS = {
    "status": "scheduler/scheduler.py",
    "finish_reason": "scheduler/scheduler.py",
    "block_table": "scheduler/block_manager.py",
    "num_computed_tokens": "scheduler/block_manager.py",
    "num_shared_blocks": "scheduler/block_manager.py",
    "num_cached_tokens": "scheduler/block_manager.py",
    "group_id": "scheduler/groups.py",
    "token_ids": "engine.py",
    "stop_reason": "engine.py",
    "stop_text": "engine.py",
    "logprobs": "engine.py",
    "cumulative_logprob": "engine.py",
}
MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"}


def writes(tree: ast.AST) -> list[tuple[str, int]]:
    """(attribute, line) for every assignment to `x.attr` (plain, augmented, or an item of it)
    and every mutating method called on `x.attr`, for the attributes in OWNERS."""
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            flat = []
            for t in targets:
                flat.extend(t.elts if isinstance(t, ast.Tuple) else [t])
            targets = [t.value if isinstance(t, ast.Subscript) else t for t in flat]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in MUTATORS):
            targets = [node.func.value]
        found += [(t.attr, t.lineno) for t in targets if isinstance(t, ast.Attribute) and t.attr in OWNERS]
    return found


def test_each_piece_of_sequence_state_has_one_owner() -> None:
    """Outside sequence.py (which declares them), each field is changed in its owner module only."""
    wrong = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "sequence.py":
            continue
        for attr, line in writes(ast.parse(path.read_text())):
            if OWNERS[attr] != rel:
                wrong.append(f"{rel}:{line} changes {attr} (owned by {OWNERS[attr]})")
    assert wrong == []


def test_the_owner_check_sees_writes() -> None:
    src = "s.status = 1\na.b, s.block_table = 1, []\ns.num_computed_tokens += 2\ns.token_ids.append(3)\nx = s.status"
    assert sorted(writes(ast.parse(src))) == [("block_table", 2), ("num_computed_tokens", 3), ("status", 1),
                                              ("token_ids", 4)]
