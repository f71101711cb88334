"""`distributed/replica.run_bin` streams a bin's outcomes (pure: a stand-in for `LLM`, no Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from batchllm.distributed.replica import BinDone, BinRequest, RequestDone, collect, run_bin
from batchllm.outputs import RunStats
from batchllm.sampling_params import SamplingParams


class FakeLLM:
    """Yields `script` from `iter_generate`: (prompt index, error or None), refusals first as
    `LLM` does; a run that starts (any output in the script) gets new statistics."""

    def __init__(self, script: list[tuple[int, str | None]]) -> None:
        self.script = script
        self.last_run_stats: RunStats | None = RunStats(num_requests=99)  # an earlier bin's

    def iter_generate(self, prompts: list[Any], params: list[Any], **_: Any) -> Iterator[Any]:
        started = False
        for i, error in self.script:
            if error is None and not started:  # the run starts after the refusals
                self.last_run_stats, started = RunStats(num_requests=len(prompts)), True
            yield SimpleNamespace(request_id=str(i), error=error)


def _requests() -> list[BinRequest]:
    p = SamplingParams(max_tokens=1)
    sizes = {10: 2, 11: 1, 12: 1, 13: 2}  # key -> prompts; prompt indices 0-1, 2, 3, 4-5
    return [BinRequest(k, [[5]] * n, [None] * n, [p] * n) for k, n in sizes.items()]


def test_each_request_as_it_finishes_refusals_first_then_the_bin() -> None:
    llm = FakeLLM([(2, "too long"), (5, "bad"), (3, None), (0, None), (4, None), (1, None)])
    events = list(run_bin(llm, _requests()))
    assert [(e.key, e.error) for e in events[:-1] if isinstance(e, RequestDone)] == \
        [(11, "too long"), (13, "bad"), (12, None), (10, None)]  # 13's other prompt ran, yet it is an error
    assert [len(e.outputs or []) for e in events[2:4]] == [1, 2]
    assert events[-1] == BinDone(RunStats(num_requests=6), stopped=False)
    result = collect(events)
    assert sorted(result.outputs) == [10, 12] and result.errors == {11: "too long", 13: "bad"}


def test_a_stopped_bin_and_a_bin_of_refusals() -> None:
    stopped = list(run_bin(FakeLLM([(3, None)]), _requests()))
    assert [e.key for e in stopped[:-1]] == [12] and stopped[-1].stopped  # type: ignore[union-attr]
    refused = list(run_bin(FakeLLM([(i, "no") for i in range(6)]), _requests()))
    assert [e.key for e in refused[:-1]] == [10, 11, 12, 13]  # type: ignore[union-attr]
    assert refused[-1] == BinDone(RunStats(), stopped=False)  # not the earlier bin's statistics
