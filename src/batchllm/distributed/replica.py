"""What a replica does with one bin, Ray-free: the requests it is sent and what it sends back.

Used by the run-batch actors (`ray_runner.py`) and the Ray Data processor (`batchllm/ray.py`).
Token ids may arrive as numpy integers (Ray Data hands columns over as arrays): they are made
Python ints here, before the engine sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
class BinResult:
    """A bin's outcome: outputs (one per prompt) of the requests that finished, why the others
    were refused, and the engine's statistics. `stopped`: the run was asked to stop, so some
    requests of the bin are in neither dict."""

    outputs: dict[int, list[RequestOutput]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)
    stopped: bool = False


def run_bin(llm: Any, requests: Sequence[BinRequest], should_stop: Callable[[], bool] | None = None) -> BinResult:
    """Run `requests` as one batch on `llm` (planned together, so each prefix group in it is
    computed once). A request the engine refuses (its own limits, a constraint that does not
    compile) is reported in `errors`; the others run."""
    result = BinResult()
    units: list[tuple[int, int]] = []  # (position in `requests`, prompt index)
    prompts: list[dict[str, Any]] = []
    params: list[SamplingParams] = []
    refused = _refused(llm, requests)
    for i, r in enumerate(requests):
        if r.key in refused:
            result.errors[r.key] = refused[r.key]
            continue
        for k, ids in enumerate(r.prompt_ids):
            units.append((i, k))
            prompts.append({"prompt_token_ids": [int(t) for t in ids], "prompt": r.prompt_texts[k]})
            params.append(r.params[k])
    slots: dict[int, list[RequestOutput | None]] = {}
    if prompts:
        for out in llm.iter_generate(prompts, params, use_tqdm=False, should_stop=should_stop):
            i, k = units[int(out.request_id)]
            got = slots.setdefault(i, [None] * len(requests[i].prompt_ids))
            got[k] = out
            if all(o is not None for o in got):
                result.outputs[requests[i].key] = [o for o in got if o is not None]
        result.stats = llm.last_run_stats or RunStats()
    result.stopped = len(result.outputs) + len(result.errors) < len(requests)
    return result


def _refused(llm: Any, requests: Sequence[BinRequest]) -> dict[int, str]:
    """{key: why} for requests this engine would refuse (LLM.generate refuses a whole call)."""
    out: dict[int, str] = {}
    flat = [(r, p) for r in requests for p in r.params]
    for index, why in llm.structured_errors([p for _, p in flat]).items():
        out.setdefault(flat[index][0].key, why)
    for r in requests:
        problems = llm.validate([[int(t) for t in ids] for ids in r.prompt_ids], r.params)
        if problems and r.key not in out:
            out[r.key] = "; ".join(problems)
    return out
