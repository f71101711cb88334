"""The run-batch runner on Ray: the driver plans, replicas (Ray actors) run whole bins.

The driver tokenizes and validates with the tokenizer and the limits computed from the model
folder (no weights loaded), compiles each distinct structured-output constraint (as the
single-process run does, so one that does not compile gets the same error record), plans the
whole batch, packs whole prefix groups into bins (`bins.pack`) and feeds them, largest first,
to whichever replica is idle. A replica loads the model once and runs each bin as one batch.
Its `run_bin` is a Ray streaming generator: each request's outcome comes back as soon as that
request finishes, and the driver, waiting on every running bin's stream at once (`ray.wait`),
hands it to the job, which writes it at once (`batch_io/job.py`). So a crash loses only the
requests still running, and `--resume` runs only what is not written, the unfinished part of a
half-finished bin included. A replica's statistics are added when its bin ends. A replica that
dies fails the job with the resume hint, after the others were told to stop and their finished
requests were written. A replica checks each request against its own engine too
(`LLM.iter_generate(..., return_errors=True)`): one its limits refuse (a smaller KV pool than
the driver computed) comes back as that request's error record.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, TextIO

import ray
from ray.exceptions import RayActorError, RayError

from batchllm.batch_io.prepare import Prepared, units_of
from batchllm.batch_io.progress import Progress, log
from batchllm.batch_io.resume import UsageError
from batchllm.batch_io.runner import Finished, finished
from batchllm.batch_io.signals import StopSignals
from batchllm.config import EngineConfig
from batchllm.limits import Limits, limits_of_config
from batchllm.outputs import RunStats
from batchllm.tokenizer import Tokenizer

from .bins import Bin, pack_batch
from .options import LOCAL, RayOptions
from .replica import BinDone, BinEvent, BinRequest, run_bin
from .resources import ReplicaResources, ResourceError, replica_resources
from .stats import after, over_replicas


class Replica:
    """A Ray actor's body: one `LLM` loaded once; `run_bin` runs a bin, `stop` (served on a
    second thread, hence `max_concurrency=2`) makes the running bin end after its current step."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], torch_threads: int) -> None:
        import torch

        from batchllm.llm import LLM

        torch.set_num_threads(torch_threads)
        self.llm = LLM(model, **engine_kwargs)
        self._stop = threading.Event()

    @ray.method(num_returns="streaming")
    def run_bin(self, requests: list[BinRequest]) -> Iterator[BinEvent]:
        """Each request's `RequestDone` as it finishes, then the `BinDone` (a Ray streaming generator)."""
        yield from run_bin(self.llm, requests, self._stop.is_set)

    def stop(self) -> None:
        self._stop.set()

    def pid(self) -> int:
        """The actor's process id (answers once the model is loaded)."""
        import os

        return os.getpid()


def connect(address: str) -> bool:
    """Join Ray (an already initialised session is used as it is); True when this call
    started the session, which the caller then shuts down."""
    if ray.is_initialized():
        return False
    if address == LOCAL:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def cluster_resources(options: RayOptions) -> ReplicaResources:
    """The replicas' resources on the connected cluster; ResourceError if they cannot fit."""
    total = ray.cluster_resources()
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return replica_resources(options.replicas, total.get("CPU", 0.0), max(node_cpus, default=0.0),
                             total.get("GPU", 0.0), options.cpus_per_replica, options.gpus_per_replica)


class RayRunner:
    """See the module docstring and `batch_io.runner.Runner`."""

    start_phase = "replica start failed"

    def __init__(self, model: str, engine_kwargs: dict[str, Any], options: RayOptions) -> None:
        self.model, self.options = model, options
        self.engine_kwargs = dict(engine_kwargs)
        if options.gpus_per_replica and "device" not in self.engine_kwargs:
            self.engine_kwargs["device"] = "cuda"
        self.owns_session = False
        self.resources: ReplicaResources | None = None
        self.actors: list[Any] = []
        self.per_replica: list[RunStats] = []
        self.run_started: float | None = None
        self.run_ended: float | None = None
        self.stopped: set[int] = set()  # replicas told to stop

    def connect(self) -> None:
        try:
            self.owns_session = connect(self.options.address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"cannot reach Ray at {self.options.address!r}: {e}") from e
        try:
            self.resources = cluster_resources(self.options)
        except ResourceError as e:
            raise UsageError(str(e)) from e

    def start(self, stream: TextIO) -> tuple[Tokenizer, Limits]:
        if self.resources is None:
            self.connect()
        res = self.resources
        assert res is not None
        cfg = EngineConfig.from_kwargs(self.model, **self.engine_kwargs)
        actor = ray.remote(Replica).options(num_cpus=res.cpus, num_gpus=res.gpus, max_concurrency=2)
        log(f"starting {self.options.replicas} replica(s) on Ray, each {res.cpus:g} CPU(s)"
            + (f" and {res.gpus:g} GPU(s)" if res.gpus else "") + f", {res.torch_threads} torch thread(s)", stream)
        self.actors = [actor.remote(self.model, self.engine_kwargs, res.torch_threads)
                       for _ in range(self.options.replicas)]
        self.per_replica = [RunStats() for _ in self.actors]
        ray.get([a.pid.remote() for a in self.actors])  # every replica has loaded the model (or raises)
        self.cfg = cfg
        self.tokenizer, self.limits = Tokenizer(cfg.tokenizer or cfg.model), limits_of_config(cfg)
        return self.tokenizer, self.limits

    def screen(self, prepared: list[Prepared]) -> dict[int, str]:
        """Compile every distinct structured-output constraint here, before the run, as the
        single-process run does (the compiler needs the tokenizer and the vocabulary only)."""
        params = [r.params[0] for r in prepared]
        if not any(p.structured_outputs is not None for p in params):
            return {}
        from batchllm.structured.grammars import GrammarCache

        return GrammarCache(self.tokenizer, self.limits.vocab_size).compile(params, self.cfg.grammar_timeout_s)

    def plan(self, todo: list[Prepared]) -> list[Bin]:
        """Whole prefix groups of `todo` packed into bins (request indices into `todo`)."""
        units = units_of(todo)
        prompt_ids = [todo[u.request].prompt_ids[u.index] for u in units]
        params = [todo[u.request].params[u.index] for u in units]
        return pack_batch(self.cfg, prompt_ids, params, [u.request for u in units], len(self.actors))

    def run(self, todo: list[Prepared], sig: StopSignals, progress: Progress) -> Iterator[Finished]:
        """Yield each request as its replica reports it done, from every running bin at once."""
        self.run_started = time.monotonic()
        queue = deque(self.plan(todo))
        idle = list(range(len(self.actors)))
        running: dict[Any, int] = {}  # a running bin's stream (ObjectRefGenerator) -> its replica
        failure: str | None = None
        sig.running = True
        try:
            while running or (queue and failure is None and not sig.requested):
                while queue and idle and failure is None and not sig.requested:
                    r = idle.pop(0)
                    b = queue.popleft()
                    reqs = [BinRequest(i, todo[i].prompt_ids, todo[i].prompt_texts, todo[i].params) for i in b.requests]
                    running[self.actors[r].run_bin.remote(reqs)] = r
                # A stream is ready when its next item has arrived; `ray.wait` keeps the list's
                # order, and a stream read from moves to the end, so every replica is heard.
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                progress.tick(self.stats())
                if sig.requested or failure is not None:
                    self._stop_all(running.values())
                for stream in ready:
                    r = running[stream]
                    try:
                        event: BinEvent = ray.get(next(stream))
                    except RayError as e:  # the actor died (RayActorError) or its bin raised (RayTaskError)
                        del running[stream]
                        what = "died" if isinstance(e, RayActorError) else "failed"
                        failure = failure or f"replica {r} {what}: {e}".splitlines()[0]
                        self._stop_all(running.values())
                        continue
                    if isinstance(event, BinDone):
                        del running[stream]
                        self.per_replica[r] = after(self.per_replica[r], event.stats)
                        idle.append(r)
                        continue
                    running[stream] = running.pop(stream)
                    yield finished(todo, event)
        finally:
            sig.running = False
            self.run_ended = time.monotonic()
        if failure is not None:
            raise RuntimeError(failure)

    def _stop_all(self, replicas: Any) -> None:
        """Tell the replicas still running a bin to end it after their current step."""
        for r in set(replicas) - self.stopped:
            self.actors[r].stop.remote()
            self.stopped.add(r)

    def stats(self) -> RunStats | None:
        if self.run_started is None:
            return None
        return over_replicas(self.per_replica, (self.run_ended or time.monotonic()) - self.run_started)

    def replica_stats(self) -> list[RunStats] | None:
        return list(self.per_replica) if self.run_started is not None else None

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.owns_session:
            ray.shutdown()
            self.owns_session = False
