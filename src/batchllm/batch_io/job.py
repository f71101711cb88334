"""The run-batch job: parse, validate, skip what is done, run, write results as they finish.

Exit codes: 0 done (bad input lines are error records, not failures), 1 engine failure,
2 usage error or refusal (OUT exists, resume mismatch), 130 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from batchllm.config import EngineConfig

from .manifest import Manifest, model_fingerprint
from .prepare import Prepared, effective_dtype, limits_of_config, limits_of_llm, paused_gc, prepare, units_of
from .progress import Progress, Report, log
from .requests import parse_file
from .schema import RecordMaker
from .writer import CorruptFileError, JsonlWriter, recover

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
THROUGHPUT_SETTINGS = ("block_size", "kv_cache_memory", "num_kv_blocks", "max_num_batched_tokens",
                       "max_num_seqs", "policy", "attention", "device")


class UsageError(Exception):
    """A refusal or bad argument: exit code 2, message printed as is."""


def sibling(out: Path, suffix: str) -> Path:
    """OUT.jsonl -> OUT<suffix> (e.g. results.jsonl -> results.errors.jsonl)."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + suffix)


@dataclass
class JobOptions:
    input: Path
    output: Path
    model: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    error_file: Path | None = None  # default: OUT.errors.jsonl
    resume: bool = False
    overwrite: bool = False
    stats_json: Path | None = None
    resume_command: str | None = None  # printed on interruption
    stream: TextIO | None = None  # progress and logs (default stderr)
    report_stream: TextIO | None = None  # the final report (default stdout)
    tty: bool | None = None
    log_interval: float = 5.0

    @property
    def errors_path(self) -> Path:
        return self.error_file or sibling(self.output, ".errors.jsonl")

    @property
    def manifest_path(self) -> Path:
        return sibling(self.output, ".manifest.json")


class _Signals:
    """SIGINT/SIGTERM: while running, ask the engine to stop after the current step; otherwise
    (or on a second signal) raise KeyboardInterrupt at once."""

    def __init__(self, stream: TextIO) -> None:
        self.signum: int | None = None
        self.running = False
        self._stream = stream
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if not self.running or not first:
            raise KeyboardInterrupt
        log(f"{signal.Signals(signum).name}: stopping after the current step; finished results are kept "
            f"(signal again to stop at once)", self._stream)


def _check_paths(o: JobOptions) -> list[Path]:
    """Refuse unusable paths; return the job's existing files (OUT, error file, manifest)."""
    if not o.input.is_file():
        raise UsageError(f"input file {str(o.input)!r} does not exist")
    paths = {"output": o.output, "error file": o.errors_path, "manifest": o.manifest_path}
    for name, p in paths.items():
        if p.resolve() == o.input.resolve():
            raise UsageError(f"the {name} path {str(p)!r} is the input file")
        if p.is_dir():
            raise UsageError(f"the {name} path {str(p)!r} is a directory")
        if not p.parent.is_dir():
            raise UsageError(f"the folder of the {name} path {str(p)!r} does not exist")
    if o.output.resolve() == o.errors_path.resolve():
        raise UsageError("the output and the error file must differ")
    if o.resume and o.overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    return [p for p in paths.values() if p.exists()]


def run_batch(o: JobOptions) -> int:
    """Run the job described by `o`; returns the exit code (see module docstring)."""
    stream = o.stream or sys.stderr
    try:
        return _Job(o, stream).run()
    except UsageError as e:
        print(f"batchllm run-batch: error: {e}", file=stream, flush=True)
        return EXIT_USAGE


class _Job:
    def __init__(self, o: JobOptions, stream: TextIO) -> None:
        self.o, self.stream = o, stream
        self.t0 = time.monotonic()

    # ---- before loading the model (fast refusals) -------------------------------------------
    def _setup(self) -> tuple[Manifest, Manifest | None]:
        o = self.o
        existing = _check_paths(o)
        try:
            self.cfg = EngineConfig.from_kwargs(o.model, **o.engine_kwargs)
            limits = limits_of_config(self.cfg)
            dtype = effective_dtype(self.cfg)
        except (ValueError, TypeError, OSError) as e:  # ModelFolderError is a ValueError
            raise UsageError(str(e)) from e
        with paused_gc():
            self.parsed = parse_file(o.input)
        this = Manifest(
            input_path=str(o.input.resolve()), input_sha256=self.parsed.sha256,
            model_path=str(Path(o.model).resolve()), model_fingerprint=model_fingerprint(o.model),
            settings={"dtype": dtype, "seed": self.cfg.seed, "max_model_len": limits.max_model_len},
            engine={k: getattr(self.cfg, k) for k in THROUGHPUT_SETTINGS}, error_file=str(o.errors_path.resolve()))
        old = None
        if existing and o.overwrite:
            for p in existing:
                p.unlink()
            log(f"--overwrite: removed {', '.join(map(str, existing))}", self.stream)
        elif existing and not o.resume:
            raise UsageError(f"{', '.join(map(str, existing))} already exist(s); pass --resume to continue that job "
                             f"or --overwrite to start over")
        elif existing:
            if not o.manifest_path.exists():
                raise UsageError(f"cannot resume: {o.manifest_path} (the run manifest) is missing, so the input and "
                                 f"model of the earlier run cannot be checked; use --overwrite to start over")
            try:
                old = Manifest.load(o.manifest_path)
            except ValueError as e:
                raise UsageError(str(e)) from e
            problems = old.mismatches(this)
            if problems:
                raise UsageError("cannot resume: " + "; ".join(problems) + ". Resume with the original input, "
                                 "model and settings, or use --overwrite (or another -o) to start a new job")
            changed = [f"{k} {old.engine.get(k)!r} -> {this.engine[k]!r}" for k in THROUGHPUT_SETTINGS
                       if k in old.engine and old.engine[k] != this.engine[k]]
            if changed:
                log(f"resuming with changed throughput settings: {', '.join(changed)}", self.stream)
        elif o.resume:
            log("--resume: no earlier output found; starting a new job", self.stream)
        return this, old

    def _done(self) -> tuple[set[str], set[int]]:
        """custom_ids completed in OUT and lines recorded in the error file (partial tails cut)."""
        try:
            results, cut_out = recover(self.o.output)
            errors, cut_err = recover(self.o.errors_path)
        except CorruptFileError as e:
            raise UsageError(f"cannot resume: {e}") from e
        for cut, p in ((cut_out, self.o.output), (cut_err, self.o.errors_path)):
            if cut:
                log(f"{p}: cut a partial last line ({cut} bytes) left by a crash", self.stream)
        return ({r["custom_id"] for r in results if isinstance(r.get("custom_id"), str)},
                {r["line"] for r in errors if isinstance(r.get("line"), int)})

    # ---- the job -----------------------------------------------------------------------------
    def run(self) -> int:
        o = self.o
        this, old = self._setup()
        done_ids, done_lines = self._done() if old is not None else (set(), set())
        p = self.parsed
        log(f"{o.input}: {len(p.items)} requests, {len(p.errors)} invalid line(s)"
            + (f"; resuming: {len(done_ids)} results and {len(done_lines)} error records already written"
               if old is not None else ""), self.stream)
        status, message, stats, ok_run, failed_run, load_s = "failed", None, None, 0, 0, 0.0
        manifest = old or this
        run_entry: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running",
                                     "engine": this.engine, "batchllm_version": this.version}
        remaining = 0
        sig = _Signals(self.stream)
        progress: Progress | None = None
        writers: list[JsonlWriter] = []
        phase, manifest_saved = "model load failed", False
        with sig:
            try:
                log(f"loading {o.model} ...", self.stream)
                from batchllm.llm import LLM

                llm = LLM(o.model, **o.engine_kwargs)
                load_s = time.monotonic() - self.t0
                phase = "failure while preparing requests"
                limits = limits_of_llm(llm)
                max_context = (old.settings.get("max_context") if old is not None else None) or limits.max_context
                manifest.settings["max_context"] = max_context
                with paused_gc():
                    prepared, bad = prepare(p.requests, llm.tokenizer, limits, llm.validate, self.cfg.seed,
                                            max_context)
                errors = sorted(p.errors + bad, key=lambda e: e.line)
                manifest.runs.append(run_entry)
                manifest.save(o.manifest_path)
                manifest_saved = True
                maker = RecordMaker(p.sha256, o.model, llm.tokenizer, f"fp_{this.model_fingerprint[:10]}")
                out_w, err_w = JsonlWriter(o.output), JsonlWriter(o.errors_path)
                writers += [out_w, err_w]
                new_errors = [e for e in errors if not self._is_done(e.line, e.custom_id if e.owns_id else None,
                                                                     done_ids, done_lines)]
                for e in new_errors:
                    err_w.write(maker.error(e))
                err_w.sync()
                failed_run = len(new_errors)
                todo = [r for r in prepared
                        if not self._is_done(r.request.line, r.request.custom_id, done_ids, done_lines)]
                remaining = len(todo)
                if new_errors:
                    log(f"{len(new_errors)} invalid request(s) written to {o.errors_path}", self.stream)
                if prepared and not todo:
                    log("every request is already done", self.stream)
                elif not prepared:
                    log("no valid request in the input", self.stream)
                if todo:
                    phase = "engine failure"
                    progress = Progress(len(todo) + len(done_ids), len(done_ids), self.stream, o.tty, o.log_interval)
                    for req_out in self._generate(llm, todo, sig, progress):
                        out_w.write(maker.result(*req_out))
                        ok_run += 1
                        remaining -= 1
                if remaining and sig.signum is None:
                    raise RuntimeError(f"the engine stopped with {remaining} request(s) unfinished")
                status = "interrupted" if remaining else "complete"
            except KeyboardInterrupt:
                status = "interrupted"
                sig.signum = sig.signum or signal.SIGINT
            except Exception as e:
                status, message = "failed", f"{phase}: {type(e).__name__}: {e}"
                traceback.print_exc(file=self.stream)
            finally:
                if progress is not None:
                    progress.close()
                    stats = llm.last_run_stats
                for w in writers:
                    w.close()
        if status == "interrupted":
            name = signal.Signals(sig.signum).name if sig.signum else "a signal"
            message = (f"interrupted by {name}; finished results are saved. Resume with:\n    "
                       f"{o.resume_command or 'the same command plus --resume'}")
        elif status == "failed":
            message = (message or "failed") + (f". Finished results are saved; after fixing the cause resume "
                                               f"with:\n    {o.resume_command}" if o.resume_command else "")
        ok_before = len(done_ids)
        failed_total = len(done_lines) + failed_run
        report = Report(status=status, requests_in_file=len(p.items), ok=ok_before + ok_run, failed=failed_total,
                        ok_this_run=ok_run, ok_before=ok_before, failed_this_run=failed_run,
                        remaining=max(0, len(p.items) - ok_before - ok_run - failed_total),
                        total_time_s=time.monotonic() - self.t0, load_time_s=load_s, run=stats,
                        files={"results": str(o.output), "errors": str(o.errors_path),
                               "manifest": str(o.manifest_path)}, message=message)
        if manifest_saved:  # log how this run ended
            run_entry.update(status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), ok=ok_run,
                             failed=failed_run)
            manifest.save(o.manifest_path)
        print(report.text(), file=o.report_stream or sys.stdout, flush=True)
        if o.stats_json is not None:
            o.stats_json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if status == "complete" and report.ok == 0 and report.failed:
            log("warning: every request failed; see the error file", self.stream)
        return {"complete": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILURE)

    @staticmethod
    def _is_done(line: int, owned_id: str | None, done_ids: set[str], done_lines: set[int]) -> bool:
        return line in done_lines or (owned_id is not None and owned_id in done_ids)

    def _generate(self, llm: Any, todo: list[Prepared], sig: _Signals, progress: Progress):
        """Yield (request, outputs) as each request's prompts all finish."""
        units = units_of(todo)
        prompts = [{"prompt_token_ids": todo[u.request].prompt_ids[u.index],
                    "prompt": todo[u.request].prompt_texts[u.index]} for u in units]
        params = [todo[u.request].params[u.index] for u in units]
        collected: dict[int, list[Any]] = {}
        log(f"running {len(todo)} request(s) ({len(units)} prompts)", self.stream)

        def should_stop() -> bool:
            progress.tick(llm.last_run_stats)
            return sig.signum is not None

        sig.running = True
        try:
            for out in llm.iter_generate(prompts, params, use_tqdm=False, should_stop=should_stop):
                u = units[int(out.request_id)]
                slots = collected.setdefault(u.request, [None] * len(todo[u.request].prompt_ids))
                slots[u.index] = out
                if all(s is not None for s in slots):
                    del collected[u.request]
                    progress.request_done(sum(len(s.prompt_token_ids) for s in slots),
                                          sum(s.num_cached_tokens for s in slots))
                    yield todo[u.request].request, slots
        finally:
            sig.running = False

