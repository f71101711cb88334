"""The step loop: running decodes, then continuing prefill chunks, then admissions."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchllm.scheduler.block_manager import BlockManager
from batchllm.scheduler.queues import WaitingQueue
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


class Scheduler:
    """Continuous batching with chunked prefill under `max_num_batched_tokens`.

    Each step takes every running decode (one token each), then the next chunk of every
    running prefill, then admits waiting sequences in the queue's order while the token
    budget, the request cap and KV memory allow. When a running sequence cannot get a block,
    the youngest running sequence is preempted: its KV is dropped and recomputed later, which
    leaves outputs unchanged. Subclasses adapt admission (`_admit_setup`, `_admission_ok`) and
    finishing (`finish`) for prefix sharing.
    """

    def __init__(self, block_manager: BlockManager, queue: WaitingQueue, max_num_batched_tokens: int,
                 max_num_seqs: int | None) -> None:
        self.bm = block_manager
        self.waiting = queue
        self.running: list[Sequence] = []
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.num_preemptions = 0
        self.computed_prefill_tokens = 0

    # ---- public -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.add(seq)

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

    def finish(self, seq: Sequence) -> None:
        """Retire a finished sequence and free its KV."""
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        self.bm.free(seq)

    def after_step(self, out: SchedulerOutput) -> None:
        """Hook after the forward pass: publish newly computed prompt blocks to the prefix cache."""
        if not self.bm.enable_caching:
            return
        for seq, n in zip(out.seqs, out.num_tokens):
            if n > 1 or seq.num_output_tokens == 0:
                self.bm.commit_full_blocks(seq)

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
        """The youngest running sequence not scheduled in this step (may be `seq` itself)."""
        scheduled = set(map(id, out.seqs))
        for cand in reversed(self.running):
            if id(cand) not in scheduled and self._preemptible(cand):
                return cand
        return seq

    def _preemptible(self, seq: Sequence) -> bool:
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.push_front(seq)
        self.num_preemptions += 1

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while budget > 0 and (self.max_seqs is None or len(self.running) < self.max_seqs):
            seq = self.waiting.peek()
            if seq is None:
                break
            copies = self._admit_setup(seq)
            if copies is None:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._admission_ok(seq, n) or not self.bm.allocate(seq, n):
                self._admit_undo(seq)
                break
            self.waiting.pop(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._admitted(seq)
            out.copies.extend(copies)
            out.add(seq, n)
            budget -= n

    def _admit_setup(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Attach KV `seq` can reuse (cached blocks); return block copies, or None to stop admitting."""
        cached = self.bm.cached_prefix_blocks(seq)
        if cached:
            self.bm.adopt_cached(seq, cached)
        return []

    def _admitted(self, seq: Sequence) -> None:
        """Hook after `seq` joined the running sequences."""

    def _admit_undo(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_cached_tokens = 0

    def _admission_ok(self, seq: Sequence, n: int) -> bool:
        return True
