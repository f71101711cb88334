"""The batchllm policy: runs a Plan group by group with KV-memory-bounded admission."""

from __future__ import annotations

from collections.abc import Iterable

from batchllm.capacity import final_tokens, group_fits
from batchllm.scheduler.block_manager import BlockManager
from batchllm.scheduler.estimate import OutputEstimate
from batchllm.scheduler.groups import GroupState
from batchllm.scheduler.scheduler import FROM_SCRATCH, Start
from batchllm.sequence import Sequence

# NOTE: a group's prefix starts only if the pool can also hold this many of its members,
# so admitted prefixes always have room to make progress (no deadlock).
MEMBERS_WITH_PREFIX = 2


class GroupPolicy:
    """The batchllm `Policy` over the groups of a plan (admitted in plan order by `PlanQueue`).
    docs/design.md §2.3, §3.1 and §3.3.

    - A shared group's prefix is prefilled once by a prefill-only pseudo-sequence (chunked like
      any prompt, never sampled); members join when it is complete, referencing its full blocks
      and receiving a copy of its last partial block, and then compute only their own part.
    - The prefix blocks are pinned until the group's last member finishes (the scheduler never
      preempts a prefix to make room for another sequence).
    - With `memory_centric`, admission is bounded by KV memory, `used + reserve + need <=
      threshold * pool` (reserve = blocks running sequences are still expected to grow by,
      `estimate.py`), not by a request cap. A sequence that outgrows its estimate grows on
      demand, and the scheduler preempts when the pool runs out.
    - The no-stall rules (`_prefixes_fit`, the ungrouped rule in `allows`) count each sequence at
      its longest (`_final_blocks`: prompt + `max_tokens`, capped at `max_context`), so one
      sequence can always run to its end beside the pinned prefixes.
    - A group whose prefix cannot fit beside its largest member runs unshared
      (`GroupState.unshare`); `max_context` (at most the pool) caps every sequence, so every
      sequence fits alone. Build the policy before the `PlanQueue` over its groups.
    """

    def __init__(self, block_manager: BlockManager, groups: list[GroupState], memory_centric: bool,
                 kv_threshold: float, max_context: int | None = None) -> None:
        self.bm = block_manager
        self.groups = groups
        self.memory_centric = memory_centric
        self.limit_blocks = int(kv_threshold * block_manager.num_blocks)
        pool_tokens = block_manager.num_blocks * block_manager.block_size
        self.max_context = pool_tokens if max_context is None else min(max_context, pool_tokens)
        self.estimate = OutputEstimate()
        self.unshared: list[int] = []  # gids of the groups run unshared because they cannot fit
        self._unshare_what_cannot_fit()
        self._by_gid = {g.gid: g for g in self.groups if g.prefix is not None}
        # per group: its largest member's own part, and its MEMBERS_WITH_PREFIX smallest members
        self._max_own = {g.gid: max(self._own_need(m, g) for m in g.members) for g in self.groups}
        self._first_members = {g.gid: sorted(g.members, key=lambda m, g=g: self._own_need(m, g))[:MEMBERS_WITH_PREFIX]
                               for g in self.groups}
        self._live: dict[int, GroupState] = {}  # started groups whose prefix is pinned
        self._pinned = 0  # blocks of their prefixes (at full length)

    # ---- memory rules -----------------------------------------------------------------------
    def _final_tokens(self, seq: Sequence) -> int:
        return final_tokens(seq.num_prompt_tokens, seq.params.max_tokens, self.max_context)

    def _final_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` holds at its longest (shared prefix blocks included)."""
        return self.bm.blocks_for(self._final_tokens(seq))

    def _expected_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` is expected to hold when it finishes: its estimated output, at least one
        more token than it has, at most its longest."""
        expected = max(seq.num_tokens + 1, seq.num_prompt_tokens + self.estimate.tokens)
        return self.bm.blocks_for(min(expected, self._final_tokens(seq)))

    def _own_need(self, seq: Sequence, g: GroupState) -> int:
        shared = g.prefix_len // self.bm.block_size if g.prefix is not None else 0
        return self._final_blocks(seq) - shared

    def _unshare_what_cannot_fit(self) -> None:
        """A shared group whose prefix plus its largest member cannot fit in the pool runs its
        members unshared (each fits alone: `max_context` is at most the pool)."""
        for g in self.groups:
            if g.prefix is not None and not group_fits(g.prefix_len, [self._final_tokens(m) for m in g.members],
                                                       self.bm.block_size, self.bm.num_blocks):
                g.unshare()
                self.unshared.append(g.gid)

    def _reserve_blocks(self, running: list[Sequence]) -> int:
        return sum(max(0, self._expected_blocks(s) - len(s.block_table)) for s in running if not s.is_prefix)

    def _prefixes_fit(self, g: GroupState, running: list[Sequence], preempted: Iterable[Sequence]) -> bool:
        """Starting `g`'s prefix keeps every started sequence runnable: the prefixes pinned so far,
        plus `g`'s, plus the largest own part of any member of their groups or of any running or
        preempted sequence fit in the pool. Pinned prefixes are never preempted, so then any one
        of those sequences can always run to the end once the others are preempted."""
        started = [x for x in (*running, *preempted) if not x.is_prefix]
        member = max([self._max_own[x] for x in (*self._live, g.gid)] +
                     [self._own_need(x, self._by_gid[x.group_id]) if x.group_id in self._by_gid else self._final_blocks(x)
                      for x in started])
        pinned = self._pinned + (0 if g.gid in self._live else self.bm.blocks_for(g.prefix_len))
        return pinned + member <= self.bm.num_blocks

    # ---- the Policy ---------------------------------------------------------------------------
    def start(self, seq: Sequence) -> Start:
        """A member of a shared group starts on its prefix's full blocks, and a copy of the
        prefix's partial last block if the prefix does not end on a block boundary."""
        g = self._by_gid.get(seq.group_id)
        if seq.is_prefix or g is None or g.prefix is None:
            return FROM_SCRATCH
        full, partial = divmod(g.prefix_len, self.bm.block_size)
        table = g.prefix.block_table
        return Start(table[:full], g.prefix_len, shared=True, copy_from=table[full] if partial else None)

    def allows(self, seq: Sequence, n: int, running: list[Sequence], preempted: Iterable[Sequence]) -> bool:
        # NOTE: the prefix rules hold with or without memory-centric admission: pinned prefixes are
        # never preempted, so a sequence that could not fit beside them would stall the run.
        if seq.is_prefix and not self._prefixes_fit(self._by_gid[seq.group_id], running, preempted):
            return False
        if (not seq.is_prefix and seq.group_id not in self._by_gid
                and self._pinned + self._final_blocks(seq) > self.bm.num_blocks):
            return False  # an ungrouped sequence waits until enough prefixes are released
        if not self.memory_centric or not running:
            return True  # the allocation itself decides (and an idle engine always admits)
        g = self._by_gid.get(seq.group_id)
        if seq.is_prefix:
            shared = g.prefix_len // self.bm.block_size
            first = sum(self._expected_blocks(m) - shared for m in self._first_members[g.gid])
            need = len(seq.block_table) + self.bm.blocks_for(seq.num_tokens) + first
        else:
            need = max(0, self._expected_blocks(seq) - len(seq.block_table))
        return self.bm.num_used_blocks + self._reserve_blocks(running) + need <= self.limit_blocks

    def admitted(self, seq: Sequence) -> None:
        # NOTE: a prefix still prefilling can preempt itself when nothing else can make room, and
        # comes back later: it is pinned once.
        if seq.is_prefix and seq.group_id not in self._live:
            g = self._by_gid[seq.group_id]
            self._live[g.gid] = g
            self._pinned += self.bm.blocks_for(g.prefix_len)

    def finished(self, seq: Sequence) -> None:
        """The group's last member to finish releases the prefix blocks."""
        if not seq.is_prefix:
            self.estimate.observe(seq.num_output_tokens)
        g = self._by_gid.get(seq.group_id)
        if g is None:
            return
        g.alive -= 1
        if g.alive == 0 and g.prefix is not None:
            self.bm.free(g.prefix)
            del self._live[g.gid]
            self._pinned -= self.bm.blocks_for(g.prefix_len)
