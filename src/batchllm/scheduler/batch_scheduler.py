"""The batchllm policy: runs a Plan group by group with KV-memory-bounded admission."""

from __future__ import annotations

from collections.abc import Iterable

from batchllm.scheduler.block_manager import BlockManager
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
      threshold * pool` (reserve = blocks running sequences will still grow by, assuming they
      produce `max_tokens`), not by a request cap.
    """

    def __init__(self, block_manager: BlockManager, groups: list[GroupState], memory_centric: bool,
                 kv_threshold: float) -> None:
        self.bm = block_manager
        self.groups = groups
        self.memory_centric = memory_centric
        self.limit_blocks = int(kv_threshold * block_manager.num_blocks)
        self._by_gid = {g.gid: g for g in self.groups}
        # per group: its largest member's own part, and the own parts of its MEMBERS_WITH_PREFIX smallest
        self._max_own = {g.gid: max(self._own_need(m, g) for m in g.members) for g in self.groups}
        self._first_members = {g.gid: sum(sorted(self._own_need(m, g) for m in g.members)[:MEMBERS_WITH_PREFIX])
                               for g in self.groups}
        self._live: dict[int, GroupState] = {}  # started groups whose prefix is pinned
        self._pinned = 0  # blocks of their prefixes (at full length)
        self._check_fits()

    # ---- memory rules -----------------------------------------------------------------------
    def _final_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` holds when it has produced `max_tokens` (shared prefix blocks included)."""
        return self.bm.blocks_for(seq.num_prompt_tokens + seq.params.max_tokens)

    def _own_need(self, seq: Sequence, g: GroupState) -> int:
        shared = g.prefix_len // self.bm.block_size if g.prefix is not None else 0
        return self._final_blocks(seq) - shared

    def _check_fits(self) -> None:
        """Raise ValueError before running if some group's prefix plus one member cannot fit."""
        for g in self.groups:
            prefix = self.bm.blocks_for(g.prefix_len) if g.prefix is not None else 0
            need = prefix + self._max_own[g.gid]
            if need > self.bm.num_blocks:
                raise ValueError(
                    f"KV pool too small: group {g.gid} needs {need} blocks for its {g.prefix_len}-token "
                    f"prefix plus one member, but the pool has {self.bm.num_blocks} blocks of "
                    f"{self.bm.block_size} tokens; raise kv_cache_memory/num_kv_blocks or lower max_tokens"
                )

    def _reserve_blocks(self, running: list[Sequence]) -> int:
        return sum(max(0, self._final_blocks(s) - len(s.block_table)) for s in running if not s.is_prefix)

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
            need = len(seq.block_table) + self.bm.blocks_for(seq.num_tokens) + self._first_members[g.gid]
        else:
            need = max(0, self._final_blocks(seq) - len(seq.block_table))
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
        g = self._by_gid.get(seq.group_id)
        if g is None:
            return
        g.alive -= 1
        if g.alive == 0 and g.prefix is not None:
            self.bm.free(g.prefix)
            del self._live[g.gid]
            self._pinned -= self.bm.blocks_for(g.prefix_len)
