"""The run-batch runner of a single process: one `LLM` here runs every request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TextIO

from batchllm.limits import Limits
from batchllm.outputs import RequestOutput, RunStats
from batchllm.tokenizer import Tokenizer

from .prepare import Prepared, units_of
from .progress import Progress
from .runner import Finished
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
        """Yield each request as soon as all of its prompts finish."""
        llm = self.llm
        units = units_of(todo)
        prompts = [{"prompt_token_ids": todo[u.request].prompt_ids[u.index],
                    "prompt": todo[u.request].prompt_texts[u.index]} for u in units]
        params = [todo[u.request].params[u.index] for u in units]
        collected: dict[int, list[RequestOutput | None]] = {}

        def should_stop() -> bool:  # polled by the engine before every step
            progress.tick(llm.last_run_stats)
            return sig.requested

        sig.running = True
        try:
            for out in llm.iter_generate(prompts, params, use_tqdm=False, should_stop=should_stop):
                u = units[int(out.request_id)]
                slots = collected.setdefault(u.request, [None] * len(todo[u.request].prompt_ids))
                slots[u.index] = out
                if all(s is not None for s in slots):
                    del collected[u.request]
                    yield Finished(todo[u.request], [s for s in slots if s is not None])
        finally:
            sig.running = False

    def stats(self) -> RunStats | None:
        return None if self.llm is None else self.llm.last_run_stats

    def replica_stats(self) -> list[RunStats] | None:
        return None

    def close(self) -> None:
        self.llm = None
