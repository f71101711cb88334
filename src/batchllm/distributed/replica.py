"""What a replica does with one bin, Ray-free: the requests it is sent and what it sends back.

`run_bin` streams: one `RequestDone` per request as soon as that request is done, then one
`BinDone` with the bin's statistics. The run-batch actors (`ray_runner.py`) pass each item to
the driver as it comes, so the driver writes a request's result while the rest of its bin
runs; the Ray Data processor (`batchllm/ray.py`) takes a whole bin at once (`collect`).
Token ids may be numpy integers (Ray Data hands columns over as arrays): `LLM` accepts them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchllm.outputs import RequestOutput, RunStats
from batchllm.sampling_params import SamplingParams


@dataclass
class BinRequest:
    """One request of a bin: its prompts (token ids, text if any) and their sampling params."""

    key: int  # the driver's index of the request
    prompt_ids: list[list[int]]
    prompt_texts: list[str | None]
    params: list[SamplingParams]


@dataclass
class RequestDone:
    """Request `key` is done: its outputs (one per prompt), or why this engine refused it
    (exactly one of the two is set)."""

    key: int
    outputs: list[RequestOutput] | None = None
    error: str | None = None


@dataclass
class BinDone:
    """The bin's run ended: the engine's statistics over it. `stopped`: the run was asked to
    stop, so some requests of the bin had no `RequestDone`."""

    stats: RunStats
    stopped: bool


BinEvent = RequestDone | BinDone


def run_bin(llm: Any, requests: Sequence[BinRequest], should_stop: Callable[[], bool] | None = None
            ) -> Iterator[BinEvent]:
    """Run `requests` as one batch on `llm` (planned together, so each prefix group in it is
    computed once), yielding a `RequestDone` as each request finishes and a `BinDone` last.
    A request the engine refuses (its own limits, a constraint that does not compile:
    `iter_generate(..., return_errors=True)`) is done with its `error`; the others run."""
    units = [(i, k) for i, r in enumerate(requests) for k in range(len(r.prompt_ids))]
    prompts = [{"prompt_token_ids": requests[i].prompt_ids[k], "prompt": requests[i].prompt_texts[k]}
               for i, k in units]
    params = [requests[i].params[k] for i, k in units]
    refused: dict[int, list[str]] = {}  # request -> its prompts' refusals
    refusals_sent = False
    slots: dict[int, list[RequestOutput | None]] = {}
    finished = 0
    before = llm.last_run_stats  # a run that starts replaces it; one that refuses everything does not
    if prompts:
        for out in llm.iter_generate(prompts, params, use_tqdm=False, should_stop=should_stop, return_errors=True):
            i, k = units[int(out.request_id)]
            if out.error is not None:  # iter_generate yields every refusal before any output
                refused.setdefault(i, []).append(out.error)
                continue
            if not refusals_sent:
                yield from _refusals(requests, refused)
                refusals_sent = True
            if i in refused:  # a request with a refused prompt is an error as a whole
                continue
            got = slots.setdefault(i, [None] * len(requests[i].prompt_ids))
            got[k] = out
            if all(o is not None for o in got):
                yield RequestDone(requests[i].key, [o for o in got if o is not None])
                finished += 1
    if not refusals_sent:
        yield from _refusals(requests, refused)
    ran = llm.last_run_stats if llm.last_run_stats is not before else None
    yield BinDone(ran or RunStats(), stopped=finished + len(refused) < len(requests))


def _refusals(requests: Sequence[BinRequest], refused: dict[int, list[str]]) -> Iterator[RequestDone]:
    for i, why in refused.items():
        yield RequestDone(requests[i].key, error="; ".join(why))


@dataclass
class BinResult:
    """A whole bin's events gathered: outputs and refusals by request key, the statistics."""

    outputs: dict[int, list[RequestOutput]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)
    stopped: bool = False


def collect(events: Iterable[BinEvent]) -> BinResult:
    """`run_bin`'s stream gathered into one result, for callers that take a bin at once."""
    result = BinResult()
    for e in events:
        if isinstance(e, BinDone):
            result.stats, result.stopped = e.stats, e.stopped
        elif e.outputs is not None:
            result.outputs[e.key] = e.outputs
        else:
            assert e.error is not None
            result.errors[e.key] = e.error
    return result
