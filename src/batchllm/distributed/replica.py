"""What a replica does with one bin, Ray-free: the requests it is sent and what it sends back.

Used by the run-batch actors (`ray_runner.py`) and the Ray Data processor (`batchllm/ray.py`).
Token ids may be numpy integers (Ray Data hands columns over as arrays): `LLM` accepts them.
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
    compile: `generate(..., return_errors=True)`) is reported in `errors`; the others run."""
    result = BinResult()
    units = [(i, k) for i, r in enumerate(requests) for k in range(len(r.prompt_ids))]
    prompts = [{"prompt_token_ids": requests[i].prompt_ids[k], "prompt": requests[i].prompt_texts[k]}
               for i, k in units]
    params = [requests[i].params[k] for i, k in units]
    slots: dict[int, list[RequestOutput | None]] = {}
    if prompts:
        for out in llm.iter_generate(prompts, params, use_tqdm=False, should_stop=should_stop, return_errors=True):
            i, k = units[int(out.request_id)]
            key = requests[i].key
            if out.error is not None:  # these come before any output (iter_generate's order)
                earlier = result.errors.get(key)
                result.errors[key] = out.error if earlier is None else f"{earlier}; {out.error}"
                continue
            got = slots.setdefault(i, [None] * len(requests[i].prompt_ids))
            got[k] = out
            if key not in result.errors and all(o is not None for o in got):
                result.outputs[key] = [o for o in got if o is not None]
        result.stats = llm.last_run_stats or RunStats()
    result.stopped = len(result.outputs) + len(result.errors) < len(requests)
    return result
