"""A Ray Data processor in the shape of `ray.data.llm.build_processor`, keeping prefix groups whole.

    from batchllm.ray import ProcessorConfig, build_processor
    processor = build_processor(ProcessorConfig(model_source="path/to/model", replicas=2,
                                                sampling_params={"temperature": 0, "max_tokens": 64}))
    out = processor(ray.data.from_items([{"prompt": "..."}, {"messages": [...]}]))

Rows hold `prompt` (text or token ids) or `messages` (a chat, rendered with the model's
template), and optionally `sampling_params` (a dict over the config's defaults; None entries,
which Arrow adds for keys other rows have, are dropped). The output has every input column plus
`generated_text`, `generated_token_ids`, `num_generated_tokens`, `num_input_tokens` and
`error`: None, or why that row did not run (the other rows still run). With n > 1 samples
the generated columns hold the first sample.

The rows are materialised on the driver, which must see the whole batch to plan it: it
tokenizes and validates them (no weights loaded), plans, packs whole prefix groups into bins
(`distributed/bins.py`), and maps the bins over a pool of actors (`ActorPoolStrategy`, one bin
per call, its results gathered whole by `replica.collect`), each loading the model once. The
rows come back in input order. Importing this module imports Ray (the `ray` extra).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from batchllm.config import EngineConfig
from batchllm.distributed.bins import pack_batch
from batchllm.distributed.options import LOCAL, RayOptions
from batchllm.distributed.ray_runner import cluster_resources, connect
from batchllm.distributed.replica import BinRequest, BinResult, collect, run_bin
from batchllm.limits import limits_of_config
from batchllm.outputs import RunStats
from batchllm.sampling_params import SamplingParams
from batchllm.seeding import with_seeds
from batchllm.tokenizer import Tokenizer

Row = dict[str, Any]


@dataclass
class ProcessorConfig:
    """The model and its engine arguments (as `LLM`'s), default sampling parameters (as
    `SamplingParams`' keywords), and the replicas and what each asks Ray for."""

    model_source: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling_params: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    cpus_per_replica: float | None = None
    gpus_per_replica: float | None = None


def _plain(x: Any) -> Any:
    """Arrow/numpy values as plain Python (arrays to lists, numpy scalars to Python scalars)."""
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x.item() if isinstance(x, np.generic) else x


class _BinWorker:
    """The actor class Ray Data maps the bins with: one `LLM`, loaded once."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], torch_threads: int) -> None:
        import torch

        from batchllm.llm import LLM

        torch.set_num_threads(torch_threads)
        self.llm = LLM(model, **engine_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [pickle.dumps(collect(run_bin(self.llm, pickle.loads(b)))) for b in batch["requests"]]
        return {"result": np.array(results, dtype=object)}


class Processor:
    """Maps a Dataset of prompts to one with generated text (see the module docstring)."""

    def __init__(self, config: ProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                 postprocess: Callable[[Row], Row] | None = None) -> None:
        self.config, self.preprocess, self.postprocess = config, preprocess, postprocess
        self.cfg = EngineConfig.from_kwargs(config.model_source, **config.engine_kwargs)
        self.tokenizer = Tokenizer(self.cfg.tokenizer or self.cfg.model)
        self.limits = limits_of_config(self.cfg)
        self.last_run_stats: list[RunStats] = []  # one per bin of the last call

    def _request(self, row: Row) -> tuple[list[int], SamplingParams]:
        """Token ids and sampling params of a row; ValueError (or TypeError) says why it cannot run."""
        given = {k: v for k, v in _plain(row.get("sampling_params") or {}).items() if v is not None}
        params = SamplingParams(**{**self.config.sampling_params, **given})
        if row.get("messages") is not None:
            text = self.tokenizer.apply_chat_template(_plain(row["messages"]))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(row.get("prompt"), str):
            ids = self.tokenizer.encode(row["prompt"])
        elif row.get("prompt") is not None:
            ids = [int(t) for t in _plain(row["prompt"])]
        else:
            raise ValueError("the row has neither 'prompt' nor 'messages'")
        problems = self.limits.prompt_errors([ids], [params])
        if problems:
            raise ValueError(next(iter(problems.values())))
        return ids, params

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        rows = ds.take_all()
        requests: list[BinRequest] = []
        errors: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                ids, params = self._request(row)
            except (ValueError, TypeError) as e:
                errors[i] = str(e)
                continue
            text = row["prompt"] if isinstance(row.get("prompt"), str) else None
            requests.append(BinRequest(i, [ids], [text], [params]))
        results = self._run(requests) if requests else []
        outputs = {}
        for result in results:
            outputs.update(result.outputs)
            errors.update(result.errors)
        out = [self._row(row, outputs.get(i), errors.get(i)) for i, row in enumerate(rows)]
        result_ds = ray.data.from_items(out)
        return result_ds.map(self.postprocess) if self.postprocess is not None else result_ds

    def _run(self, requests: list[BinRequest]) -> list[BinResult]:
        """Plan all requests, pack whole groups into bins, run the bins on the actor pool."""
        if not ray.is_initialized():
            connect(LOCAL)
        res = cluster_resources(RayOptions(LOCAL, self.config.replicas, self.config.cpus_per_replica,
                                           self.config.gpus_per_replica))
        ids = [r.prompt_ids[0] for r in requests]
        # Seeds over the whole batch, as one LLM would give them, so the bins sample the same.
        params = with_seeds(ids, [r.params[0] for r in requests], self.cfg.seed)
        requests = [dataclasses.replace(r, params=[p]) for r, p in zip(requests, params)]
        bins = pack_batch(self.cfg, ids, params, range(len(ids)), self.config.replicas)
        items = [{"requests": pickle.dumps([requests[k] for k in b.requests])} for b in bins]
        engine_kwargs = dict(self.config.engine_kwargs)
        if res.gpus and "device" not in engine_kwargs:
            engine_kwargs["device"] = "cuda"
        mapped = ray.data.from_items(items).map_batches(
            _BinWorker, fn_constructor_kwargs={"model": self.config.model_source, "engine_kwargs": engine_kwargs,
                                               "torch_threads": res.torch_threads},
            compute=ray.data.ActorPoolStrategy(size=min(self.config.replicas, len(bins))), batch_size=1,
            num_cpus=res.cpus, **({"num_gpus": res.gpus} if res.gpus else {}))
        results = [pickle.loads(r["result"]) for r in mapped.take_all()]
        self.last_run_stats = [r.stats for r in results]
        return results

    @staticmethod
    def _row(row: Row, outputs: list[Any] | None, error: str | None) -> Row:
        first = outputs[0].outputs[0] if outputs else None
        return {**row, "generated_text": None if first is None else first.text,
                "generated_token_ids": None if first is None else list(first.token_ids),
                "num_generated_tokens": None if first is None else len(first.token_ids),
                "num_input_tokens": None if not outputs else len(outputs[0].prompt_token_ids),
                "error": error if outputs is None else None}


def build_processor(config: ProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                    postprocess: Callable[[Row], Row] | None = None) -> Processor:
    """A processor for `config`: `processor(ds)` returns `ds`'s rows with their generations.
    `preprocess` / `postprocess` map each row before planning / after generation."""
    return Processor(config, preprocess, postprocess)
