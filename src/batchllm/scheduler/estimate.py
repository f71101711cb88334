"""The output length the batchllm policy expects of a sequence, for memory-centric admission.

Admission reserves KV for what running sequences are expected to produce, not for their
`max_tokens`: chat requests without `max_tokens` may grow to the whole context (thousands of
tokens) but usually stop after a few hundred, and reserving the maximum ran them a few at a time.
A sequence that outgrows its estimate grows on demand; when the pool runs out the scheduler
preempts the youngest sequence (recomputed later, outputs unchanged).

The estimate is a high quantile of the outputs of the sequences finished so far (the last
`WINDOW`), so a batch whose outputs all reach `max_tokens` reserves `max_tokens`, as before;
before `MIN_SEEN` have finished it is `PRIOR`. It depends only on the finish order, which is
deterministic, so runs stay reproducible.
"""

from __future__ import annotations

import bisect
from collections import deque

PRIOR = 256  # tokens expected of an output before enough have finished
MIN_SEEN = 4
WINDOW = 512
QUANTILE = 0.9


class OutputEstimate:
    def __init__(self, prior: int = PRIOR) -> None:
        self.prior = prior
        self._seen: deque[int] = deque()  # the last WINDOW outputs, in finish order
        self._sorted: list[int] = []  # the same, sorted
        self._value = prior

    def observe(self, num_output_tokens: int) -> None:
        self._seen.append(num_output_tokens)
        bisect.insort(self._sorted, num_output_tokens)
        if len(self._seen) > WINDOW:
            del self._sorted[bisect.bisect_left(self._sorted, self._seen.popleft())]
        n = len(self._sorted)
        if n >= MIN_SEEN:
            self._value = self._sorted[min(n - 1, int(QUANTILE * n))]

    @property
    def tokens(self) -> int:
        """Output tokens a sequence is expected to produce (before its own `max_tokens` cap)."""
        return self._value
