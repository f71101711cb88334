"""The step loop: running decodes, then continuing prefill chunks, then admissions.

One `Scheduler` runs every policy; a policy is the parts it is built from (`policies.py`): a
waiting queue (the admission order), a `Policy` (what KV an admitted sequence starts from and
whether it may start now), and the block manager.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from batchllm.scheduler.block_manager import BlockManager
from batchllm.scheduler.queues import Waiting, WaitingQueue
from batchllm.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step: compute `num_tokens[i]` new tokens of `seqs[i]`; first copy blocks `copies` (src, dst)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)


@dataclass(frozen=True)
class Start:
    """The KV an admitted sequence starts from (`BlockManager.attach`): `blocks` hold its first
    `num_computed` tokens, except that a `num_computed` past their end ends in a partial block,
    `copy_from`, whose KV is copied into the sequence's own next block. `shared`: the blocks are
    its group's prefix."""

    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    shared: bool = False
    copy_from: int | None = None


FROM_SCRATCH = Start()  # no KV to reuse: every token is computed


class Policy(Protocol):
    """What a scheduling policy decides beyond the admission order (the scheduler asks it at
    each admission, and tells it about admissions and finishes)."""

    def start(self, seq: Sequence) -> Start:
        """The KV `seq` reuses if it is admitted now."""
        ...

    def allows(self, seq: Sequence, n: int, running: list[Sequence], preempted: Iterable[Sequence]) -> bool:
        """Whether `seq`, started (attached to its `Start`), may be admitted now with its first `n` tokens."""
        ...

    def admitted(self, seq: Sequence) -> None:
        """`seq` was admitted (it holds the blocks of its first chunk)."""
        ...

    def finished(self, seq: Sequence) -> None:
        """`seq` finished; the scheduler has freed its blocks."""
        ...


class CachePolicy:
    """The baselines' policy (fcfs, fcfs-lru, lpm): start from whatever the prefix cache holds
    (nothing without caching), admit whatever fits."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.bm = block_manager

    def start(self, seq: Sequence) -> Start:
        # NOTE: a sequence asking for prompt log-probs computes its whole prompt (cached KV has no logits).
        if seq.params.prompt_logprobs is not None:
            return FROM_SCRATCH
        blocks = self.bm.cached_prefix_blocks(seq)
        return Start(blocks, len(blocks) * self.bm.block_size) if blocks else FROM_SCRATCH

    def allows(self, seq: Sequence, n: int, running: list[Sequence], preempted: Iterable[Sequence]) -> bool:
        return True

    def admitted(self, seq: Sequence) -> None:
        pass

    def finished(self, seq: Sequence) -> None:
        pass


class Scheduler:
    """Continuous batching with chunked prefill under `max_num_batched_tokens`.

    Each step takes every running decode (one token each), then the next chunk of every
    running prefill, then admits waiting sequences in the queue's order while the token
    budget, the request cap, the policy and KV memory allow. When a running sequence cannot get a
    block, the youngest running sequence is preempted: its KV is dropped and recomputed later,
    which leaves outputs unchanged. A prefix pseudo-sequence is never preempted to make room for
    another sequence, and leaves the running sequences once its KV is complete (its blocks stay,
    held for its group by the policy).

    The scheduler alone changes a sequence's `status` (`_admit`, `_preempt`, `finish`); the block
    manager alone changes its blocks and KV counts.
    """

    def __init__(self, block_manager: BlockManager, queue: WaitingQueue, policy: Policy,
                 max_num_batched_tokens: int, max_num_seqs: int | None) -> None:
        self.bm = block_manager
        self.waiting = Waiting(queue)
        self.policy = policy
        self.running: list[Sequence] = []
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.num_preemptions = 0
        self.computed_prefill_tokens = 0

    # ---- public -----------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_tokens
        decodes = [s for s in self.running if not s.in_prefill]
        prefills = [s for s in self.running if s.in_prefill]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:
                break
            if self._reserve(seq, n, out):
                out.add(seq, n)
                budget -= n
        self._admit(out, budget)
        for seq, n in zip(out.seqs, out.num_tokens):
            if seq.in_prefill:
                self.computed_prefill_tokens += n
        return out

    def after_step(self, out: SchedulerOutput) -> None:
        """The forward pass computed `out`: count the new KV (publishing it to the prefix cache);
        complete prefix pseudo-sequences leave the running sequences."""
        for seq, n in zip(out.seqs, out.num_tokens):
            self.bm.advance(seq, n)
            if seq.is_prefix and seq.num_computed_tokens == seq.num_tokens:
                self.running.remove(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a running sequence that has finished for `reason` ("stop" or "length"); free its KV."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.bm.free(seq)
        self.policy.finished(seq)

    # ---- internals --------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Get blocks for n more tokens of a running seq, preempting younger ones if needed."""
        while not self.bm.allocate(seq, n):
            victim = self._pick_victim(seq, out)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _pick_victim(self, seq: Sequence, out: SchedulerOutput) -> Sequence:
        """The youngest running sequence, not a prefix, not scheduled in this step (else `seq` itself)."""
        scheduled = set(map(id, out.seqs))
        for cand in reversed(self.running):
            if id(cand) not in scheduled and not cand.is_prefix:
                return cand
        return seq

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.push_preempted(seq)
        self.num_preemptions += 1

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while budget > 0 and (self.max_seqs is None or len(self.running) < self.max_seqs):
            seq = self.waiting.peek()
            if seq is None:
                break
            start = self.policy.start(seq)
            self.bm.attach(seq, start.blocks, start.num_computed, start.shared)
            n = min(seq.num_uncomputed_tokens, budget)
            if (not self.policy.allows(seq, n, self.running, self.waiting.preempted)
                    or not self.bm.allocate(seq, n)):
                self.bm.free(seq)
                break
            self.waiting.pop(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.policy.admitted(seq)
            if start.copy_from is not None:
                out.copies.append((start.copy_from, seq.block_table[len(start.blocks)]))
            out.add(seq, n)
            budget -= n
