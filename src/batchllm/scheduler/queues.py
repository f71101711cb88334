"""Waiting queues: the order in which the scheduler admits sequences.

`Waiting` is what the scheduler holds: sequences it preempted, which go first, in front of one
policy queue (`FcfsQueue`, `LpmQueue`, or `groups.PlanQueue`) that orders the sequences that have
not run yet. Every policy queue is filled when it is made and satisfies `WaitingQueue`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from batchllm.scheduler.block_manager import BlockManager
from batchllm.sequence import Sequence


@runtime_checkable
class WaitingQueue(Protocol):
    """A policy's order over the sequences that have not run yet.

    `peek` returns the sequence to admit next (None when empty) without removing it; `pop(seq)`
    removes the sequence `peek` just returned; `len` counts the sequences not popped yet.
    """

    def peek(self) -> Sequence | None: ...
    def pop(self, seq: Sequence) -> None: ...
    def __len__(self) -> int: ...


class Waiting:
    """The sequences waiting to be admitted: preempted ones first, the most recently preempted at
    the front, then `order`'s sequences in its order.

    NOTE: the most recently preempted is the one that started earliest: nothing is admitted from
    `order` while a preempted sequence waits, and the youngest running sequence is preempted first.
    """

    def __init__(self, order: WaitingQueue) -> None:
        self.order = order
        self._preempted: deque[Sequence] = deque()

    @property
    def preempted(self) -> deque[Sequence]:
        """Preempted sequences waiting to be admitted again (read only)."""
        return self._preempted

    def push_preempted(self, seq: Sequence) -> None:
        self._preempted.appendleft(seq)

    def peek(self) -> Sequence | None:
        return self._preempted[0] if self._preempted else self.order.peek()

    def pop(self, seq: Sequence) -> None:
        if self._preempted:
            assert self._preempted[0] is seq, "pop takes the sequence peek returned"
            self._preempted.popleft()
        else:
            self.order.pop(seq)

    def __len__(self) -> int:
        return len(self._preempted) + len(self.order)


class FcfsQueue:
    """First come, first served: input order."""

    def __init__(self, seqs: Iterable[Sequence]) -> None:
        self._q: deque[Sequence] = deque(seqs)

    def peek(self) -> Sequence | None:
        return self._q[0] if self._q else None

    def pop(self, seq: Sequence) -> None:
        self._q.remove(seq)

    def __len__(self) -> int:
        return len(self._q)


class LpmQueue(FcfsQueue):
    """SGLang-like longest-prefix-match: among the first `window` waiting sequences, admit the
    one with the most cached prefix blocks (ties: input order)."""

    def __init__(self, seqs: Iterable[Sequence], block_manager: BlockManager, window: int = 128) -> None:
        super().__init__(seqs)
        self.bm = block_manager
        self.window = window

    def peek(self) -> Sequence | None:
        best, best_len = None, -1
        for i, seq in enumerate(self._q):
            if i >= self.window:
                break
            n = len(self.bm.cached_prefix_blocks(seq))
            if n > best_len:
                best, best_len = seq, n
        return best
