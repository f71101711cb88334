"""The run-batch runner of a single process: one `LLM` here runs every request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TextIO

from batchllm.distributed.replica import BinRequest, RequestDone, run_bin
from batchllm.limits import Limits
from batchllm.outputs import RunStats
from batchllm.tokenizer import Tokenizer

from .prepare import Prepared
from .progress import Progress
from .runner import Finished, finished
from .signals import StopSignals


class LocalRunner:
    """`LLM(model, **engine_kwargs)` in this process (see `runner.Runner`)."""

    start_phase = "model load failed"

    def __init__(self, model: str, engine_kwargs: dict[str, Any]) -> None:
        self.model, self.engine_kwargs = model, engine_kwargs
        self.llm: Any = None

    def connect(self) -> None:
        pass  # nothing to reach: the model loads in `start`

    def start(self, stream: TextIO) -> tuple[Tokenizer, Limits]:
        from batchllm.llm import LLM

        self.llm = LLM(self.model, **self.engine_kwargs)
        return self.llm.tokenizer, self.llm.engine.limits

    def screen(self, prepared: list[Prepared]) -> dict[int, str]:
        """Compile every distinct structured-output constraint once, before the run."""
        return self.llm.structured_errors([r.params[0] for r in prepared])

    def run(self, todo: list[Prepared], sig: StopSignals, progress: Progress) -> Iterator[Finished]:
        """Yield each request as soon as all of its prompts finish (or the engine refuses it):
        the whole of `todo` is one bin (`distributed.replica.run_bin`)."""
        llm = self.llm

        def should_stop() -> bool:  # polled by the engine before every step
            progress.tick(llm.last_run_stats)
            return sig.requested

        requests = [BinRequest(i, r.prompt_ids, r.prompt_texts, r.params) for i, r in enumerate(todo)]
        sig.running = True
        try:
            for event in run_bin(llm, requests, should_stop):
                if isinstance(event, RequestDone):
                    yield finished(todo, event)
        finally:
            sig.running = False

    def stats(self) -> RunStats | None:
        return None if self.llm is None else self.llm.last_run_stats

    def replica_stats(self) -> list[RunStats] | None:
        return None

    def close(self) -> None:
        self.llm = None
