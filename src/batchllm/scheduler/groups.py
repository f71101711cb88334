"""Prefix-sharing groups at run time: the prefix pseudo-sequence, its members, and the plan-order queue."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchllm.planner import Plan
from batchllm.sampling_params import SamplingParams
from batchllm.sequence import Sequence

_PREFIX_PARAMS = SamplingParams(temperature=0, max_tokens=1)


@dataclass(eq=False)
class GroupState:
    """One planned group. Shared groups have a `prefix` pseudo-sequence whose blocks every member
    references; they are released when the last member finishes (`alive` reaches 0)."""

    gid: int
    prefix_len: int
    members: list[Sequence]
    prefix: Sequence | None = None
    waiting: deque[Sequence] = field(default_factory=deque)
    alive: int = 0

    def unshare(self) -> None:
        """Run the members without the shared prefix (before any of them starts): each computes
        its whole prompt, as an unshared group's members do."""
        self.prefix, self.prefix_len = None, 0
        for m in self.members:
            m.group_id = -1

    @property
    def prefix_done(self) -> bool:
        return self.prefix is None or self.prefix.num_computed_tokens == self.prefix.num_tokens


def build_groups(plan: Plan, seqs: list[Sequence]) -> list[GroupState]:
    """Groups in plan order; members of shared groups get their group id, and a prefix sequence
    holding the first `prefix_len` prompt tokens is created for each shared group."""
    groups = []
    next_id = max((s.seq_id for s in seqs), default=-1) + 1
    for gid, g in enumerate(plan.groups):
        members = [seqs[i] for i in g.members]
        state = GroupState(gid, g.prefix_len if g.shared else 0, members, waiting=deque(members),
                           alive=len(members))
        if g.shared:
            for m in members:
                m.group_id = gid
            state.prefix = Sequence(seq_id=next_id, request_index=-1, sample_index=0,
                                    token_ids=list(members[0].token_ids[:g.prefix_len]),
                                    num_prompt_tokens=g.prefix_len, params=_PREFIX_PARAMS,
                                    is_prefix=True, group_id=gid)
            next_id += 1
        groups.append(state)
    return groups


class PlanQueue:
    """Admits in plan order: waiting members of started groups whose prefix KV is complete; then
    the next group (its prefix first, if shared). Preempted sequences are `queues.Waiting`'s.

    NOTE: members of a group whose prefix is still being prefilled are skipped, not waited
    for, so a later group can start in the same step.
    """

    def __init__(self, groups: list[GroupState]) -> None:
        self.groups = groups
        self._next = 0  # first group not started yet
        self._active: list[GroupState] = []  # started, with members still waiting
        self._size = sum(len(g.members) + (g.prefix is not None) for g in groups)

    def peek(self) -> Sequence | None:
        for g in self._active:
            if g.prefix_done and g.waiting:
                return g.waiting[0]
        if self._next < len(self.groups):
            g = self.groups[self._next]
            return g.prefix if g.prefix is not None else g.waiting[0]
        return None

    def pop(self, seq: Sequence) -> None:
        self._size -= 1
        if self._next < len(self.groups) and not self._active_has(seq):
            g = self.groups[self._next]
            self._next += 1
            self._active.append(g)
            if g.prefix is seq:
                return
        g = next(g for g in self._active if g.waiting and g.waiting[0] is seq)
        g.waiting.popleft()
        if not g.waiting:
            self._active.remove(g)

    def _active_has(self, seq: Sequence) -> bool:
        return any(g.waiting and g.waiting[0] is seq for g in self._active)

    def __len__(self) -> int:
        return self._size
