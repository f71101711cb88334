"""Where a run-batch job's requests run: the contract between the job (parse, prepare, write,
report: `job.py`) and a runner (this process: `local_runner.py`; Ray replicas:
`batchllm/distributed/ray_runner.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TextIO

from batchllm.limits import Limits
from batchllm.outputs import RequestOutput, RunStats
from batchllm.tokenizer import Tokenizer

from .prepare import Prepared
from .progress import Progress
from .signals import StopSignals

if TYPE_CHECKING:
    from batchllm.distributed.replica import RequestDone


@dataclass
class Finished:
    """A request of the run is done: its outputs (one per prompt), or why it could not run."""

    prepared: Prepared
    outputs: list[RequestOutput] | None = None
    error: str | None = None  # set when the engine refused it (e.g. its constraint did not compile)


def finished(todo: list[Prepared], done: RequestDone) -> Finished:
    """A runner's `RequestDone` as the job's `Finished` (`done.key` indexes `todo`)."""
    return Finished(todo[done.key], done.outputs, done.error)


class Runner(Protocol):
    """Runs prepared requests: `connect`, then `start`, then the rest; `close` always, at the end."""

    #: What `start` does, for the job's failure message ("model load failed: ...").
    start_phase: str

    def connect(self) -> None:
        """Check, before the job opens its files, that it can run here (resume.UsageError if not)."""
        ...

    def start(self, stream: TextIO) -> tuple[Tokenizer, Limits]:
        """Get ready (load the model, or start the replicas); the tokenizer and the limits to
        prepare requests with."""
        ...

    def screen(self, prepared: list[Prepared]) -> dict[int, str]:
        """Before the run: {index in `prepared`: why} for requests that cannot run."""
        ...

    def run(self, todo: list[Prepared], sig: StopSignals, progress: Progress) -> Iterator[Finished]:
        """Run `todo`, yielding each request as it finishes; stop early once `sig.requested`."""
        ...

    def stats(self) -> RunStats | None:
        """The run's statistics so far (None before it started)."""
        ...

    def replica_stats(self) -> list[RunStats] | None:
        """Each replica's own statistics, where there are replicas."""
        ...

    def close(self) -> None:
        ...
