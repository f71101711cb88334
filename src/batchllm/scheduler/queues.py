"""Waiting queues: the order in which the scheduler admits sequences (one class per policy)."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from batchllm.scheduler.block_manager import BlockManager
from batchllm.sequence import Sequence


class WaitingQueue(Protocol):
    """Contract: `peek` returns the next sequence to admit (or None) without removing it;
    `pop` removes that sequence; `push_front` puts a preempted sequence back so it is
    admitted again before anything that has not run yet."""

    def add(self, seq: Sequence) -> None: ...
    def peek(self) -> Sequence | None: ...
    def pop(self, seq: Sequence) -> None: ...
    def push_front(self, seq: Sequence) -> None: ...
    def __len__(self) -> int: ...


class FcfsQueue:
    """First come, first served: input order."""

    def __init__(self) -> None:
        self._q: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self._q.append(seq)

    def peek(self) -> Sequence | None:
        return self._q[0] if self._q else None

    def pop(self, seq: Sequence) -> None:
        self._q.remove(seq)

    def push_front(self, seq: Sequence) -> None:
        self._q.appendleft(seq)

    def __len__(self) -> int:
        return len(self._q)


class LpmQueue(FcfsQueue):
    """SGLang-like longest-prefix-match: among the first `window` waiting sequences, admit the
    one with the most cached prefix blocks (ties: input order). Preempted ones go first."""

    def __init__(self, block_manager: BlockManager, window: int = 128) -> None:
        super().__init__()
        self.bm = block_manager
        self.window = window
        self._preempted: deque[Sequence] = deque()

    def peek(self) -> Sequence | None:
        if self._preempted:
            return self._preempted[0]
        best, best_len = None, -1
        for i, seq in enumerate(self._q):
            if i >= self.window:
                break
            n = len(self.bm.cached_prefix_blocks(seq))
            if n > best_len:
                best, best_len = seq, n
        return best

    def pop(self, seq: Sequence) -> None:
        if self._preempted and self._preempted[0] is seq:
            self._preempted.popleft()
        else:
            self._q.remove(seq)

    def push_front(self, seq: Sequence) -> None:
        self._preempted.appendleft(seq)

    def __len__(self) -> int:
        return len(self._q) + len(self._preempted)
