"""The run-batch job: parse, validate, skip what is done, run, write results as they finish.

Exit codes: 0 done (bad input lines are error records, not failures; an empty input is a
warning), 1 engine failure, or no request of the file succeeded, 2 usage error or refusal (OUT
exists, resume mismatch, another run holds OUT's lock), 130 interrupted (SIGINT/SIGTERM/SIGHUP).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batchllm.limits import Limits
from batchllm.tokenizer import Tokenizer

from .exit_codes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from .local_runner import LocalRunner
from .lock import JobLock, LockHeld
from .pipes import PipeGuard
from .prepare import Prepared, paused_gc, prepare
from .progress import Progress, Report, log
from .requests import ErrorRecord
from .resume import STDOUT, JobFiles, OpenedJob, UsageError, open_job, sibling
from .runner import Runner
from .schema import RecordMaker
from .signals import StopSignals
from .writer import JsonlWriter, StdoutWriter, open_writer

if TYPE_CHECKING:
    from batchllm.distributed.options import RayOptions


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
    resume_command: str | None = None  # printed on interruption or failure
    stream: TextIO | None = None  # progress and logs (default stderr)
    report_stream: TextIO | None = None  # the final report (default stdout)
    tty: bool | None = None  # progress bar? (default: whether `stream` is a terminal)
    log_interval: float = 5.0
    served_model_name: str | None = None  # the results' `model` field (default: `model` as given)
    ray: RayOptions | None = None  # run on Ray replicas instead of in this process

    def runner(self) -> Runner:
        """Where the requests run (Ray is imported only when asked for)."""
        if self.ray is None:
            return LocalRunner(self.model, self.engine_kwargs)
        from batchllm.distributed.ray_runner import RayRunner

        return RayRunner(self.model, self.engine_kwargs, self.ray)

    @property
    def files(self) -> JobFiles:
        if self.output == STDOUT:
            return JobFiles(self.input, STDOUT, self.error_file or STDOUT, None, self.stats_json)
        return JobFiles(self.input, self.output, self.error_file or sibling(self.output, ".errors.jsonl"),
                        sibling(self.output, ".manifest.json"), self.stats_json)


def run_batch(o: JobOptions) -> int:
    """Run the job described by `o`; returns the exit code (see module docstring)."""
    stream = PipeGuard(o.stream or sys.stderr, "stderr")
    # NOTE: with `-o -` stdout carries the results alone; the report goes to stderr.
    to_stdout = o.output == STDOUT
    report = PipeGuard(o.report_stream or (sys.stderr if to_stdout else sys.stdout), "stderr" if to_stdout else "stdout")
    lock = JobLock(None if to_stdout else sibling(o.output, ".lock"))  # `-o -` writes no file to guard
    try:
        lock.acquire()
    except (LockHeld, OSError) as e:
        print(f"batchllm run-batch: error: {e}", file=stream, flush=True)
        return EXIT_USAGE
    runner = o.runner()
    try:
        try:
            runner.connect()  # first: a usage error here must not cost --overwrite the earlier job's files
            job = open_job(o.files, o.model, o.engine_kwargs, o.resume, o.overwrite, stream)
        except UsageError as e:
            print(f"batchllm run-batch: error: {e}", file=stream, flush=True)
            return EXIT_USAGE
        _mark_killed_runs(job)
        return _Job(o, job, stream, report, runner).run()
    finally:
        runner.close()
        lock.release()


def _mark_killed_runs(job: OpenedJob) -> None:
    """An earlier run still logged "running" ended without recording it (SIGKILL, out of memory,
    power loss): we hold the lock, so it is not running. Saved with this run's entry."""
    for r in job.manifest.runs:
        if r.get("status") == "running":
            r["status"] = "killed"
            r["note"] = "ended without recording its end (killed or crashed); found by the next run"


class _Job:
    def __init__(self, o: JobOptions, job: OpenedJob, stream: PipeGuard, report: PipeGuard, runner: Runner) -> None:
        self.o, self.job, self.stream, self.files = o, job, stream, o.files
        self.report_stream = report
        self.runner = runner
        self.t0 = time.monotonic()
        self.load_s = 0.0
        self.ok_run = self.failed_run = self.remaining = 0
        self.errors: list[ErrorRecord] = []
        self.manifest_saved = False
        self.run_entry: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running",
                                          "engine": job.this_run.engine, "batchllm_version": job.this_run.version}

    def run(self) -> int:
        p, job = self.job.parsed, self.job
        log(f"{self.files.input}: {len(p.items)} requests, {len(p.errors)} invalid line(s)"
            + (f"; resuming: {len(job.done_ids)} results and {len(job.done_lines)} error records already written"
               if job.resumed else ""), self.stream)
        if not p.items:
            log(f"warning: {self.files.input} holds no request (it is empty or blank); nothing to run", self.stream)
            return self._finish("complete", None)
        status, message, phase = "failed", None, self.runner.start_phase
        writers: list[JsonlWriter | StdoutWriter] = []
        with StopSignals(self.stream) as sig:
            try:
                log(f"loading {self.o.model} ...", self.stream)
                tokenizer, limits = self.runner.start(self.stream)
                self.load_s = time.monotonic() - self.t0
                phase = "failure while preparing requests"
                todo, maker = self._prepare(tokenizer, limits)
                out_w, err_w = open_writer(self.files.output), open_writer(self.files.errors)
                writers += [out_w, err_w]
                self._write_errors(err_w, maker)
                self.remaining = len(todo)
                if todo:
                    phase = "engine failure"
                    self._run(todo, maker, out_w, err_w, sig)
                if self.remaining and not sig.requested:
                    raise RuntimeError(f"the engine stopped with {self.remaining} request(s) unfinished")
                status = "interrupted" if self.remaining else "complete"
            except KeyboardInterrupt:
                status = "interrupted"
            except Exception as e:
                status, message = "failed", f"{phase}: {type(e).__name__}: {e}"
                traceback.print_exc(file=self.stream)
            finally:
                for w in writers:
                    w.close()
            if status == "interrupted" and self.files.to_stdout:
                message = f"interrupted by {sig.name}; the results finished so far went to stdout"
            elif status == "interrupted":
                message = (f"interrupted by {sig.name}; finished results are saved. Resume with:\n    "
                           f"{self.o.resume_command or 'the same command plus --resume'}")
        if status == "failed" and self.o.resume_command:
            message = f"{message}. Finished results are saved; after fixing the cause resume with:\n    " \
                      f"{self.o.resume_command}"
        return self._finish(status, message)

    def _prepare(self, tokenizer: Tokenizer, limits: Limits) -> tuple[list[Prepared], RecordMaker]:
        """Tokenize and validate everything, save the manifest; return the requests still to run."""
        job, p = self.job, self.job.parsed
        max_context = job.manifest.settings.get("max_context") or limits.max_context
        job.manifest.settings["max_context"] = max_context
        with paused_gc():
            prepared, bad = prepare(p.requests, tokenizer, limits, job.cfg.seed, max_context)
        prepared, bad = _screen(self.runner, prepared, bad)
        self.errors = sorted(p.errors + bad, key=lambda e: e.line)
        job.manifest.runs.append(self.run_entry)
        if self.files.manifest is not None:
            job.manifest.save(self.files.manifest)
            self.manifest_saved = True
        maker = RecordMaker(p.sha256, self.o.served_model_name or self.o.model, tokenizer,
                            f"fp_{job.this_run.model_fingerprint[:10]}")
        todo = [r for r in prepared if not job.is_done(r.request.line, r.request.custom_id)]
        if prepared and not todo:
            log("every request is already done", self.stream)
        elif not prepared:
            log("no valid request in the input", self.stream)
        return todo, maker

    def _write_errors(self, err_w: JsonlWriter | StdoutWriter, maker: RecordMaker) -> None:
        """Error records not written by an earlier run (a duplicate's id belongs to another line)."""
        new = [e for e in self.errors if not self.job.is_done(e.line, e.custom_id if e.owns_id else None)]
        for e in new:
            err_w.write(maker.error(e))
        err_w.sync()
        self.failed_run = len(new)
        if new:
            log(f"{len(new)} invalid request(s) written to {_name(self.files.errors)}", self.stream)

    def _run(self, todo: list[Prepared], maker: RecordMaker, out_w: JsonlWriter | StdoutWriter,
             err_w: JsonlWriter | StdoutWriter, sig: StopSignals) -> None:
        log(f"running {len(todo)} request(s) ({sum(len(r.prompt_ids) for r in todo)} prompts)", self.stream)
        done = len(self.job.done_ids)
        progress = Progress(len(todo) + done, done, self.stream, self.o.tty, self.o.log_interval)
        try:
            for f in self.runner.run(todo, sig, progress):
                r = f.prepared.request
                if f.outputs is None:  # refused by the engine where it ran: an error record, as before the run
                    err_w.write(maker.error(ErrorRecord(r.line, r.custom_id, f"line {r.line}: {f.error}",
                                                        "invalid_prompt", "messages" if r.endpoint == "chat"
                                                        else "prompt")))
                    err_w.sync()
                    self.failed_run += 1
                else:
                    out_w.write(maker.result(r, f.outputs))
                    self.ok_run += 1
                    progress.request_done(sum(len(s.prompt_token_ids) for s in f.outputs),
                                          sum(s.num_cached_tokens for s in f.outputs))
                self.remaining -= 1
        finally:
            progress.close()

    def _finish(self, status: str, message: str | None) -> int:
        """Log the run in the manifest, print the report, write --stats-json; the exit code."""
        job = self.job
        ok_before = len(job.done_ids)
        failed = len(job.done_lines) + self.failed_run
        ok = ok_before + self.ok_run
        f = self.files
        report = Report(status=status, requests_in_file=len(job.parsed.items), ok=ok, failed=failed,
                        ok_this_run=self.ok_run, ok_before=ok_before, failed_this_run=self.failed_run,
                        remaining=max(0, len(job.parsed.items) - ok - failed),
                        total_time_s=time.monotonic() - self.t0, load_time_s=self.load_s, run=self.runner.stats(),
                        replicas=self.runner.replica_stats(),
                        files={"results": _name(f.output), "errors": _name(f.errors),
                               "manifest": _name(f.manifest)},
                        message=message)
        print(report.text(), file=self.report_stream, flush=True)
        broken = [g.name for g in (self.stream, self.report_stream) if g.broken]
        if self.manifest_saved and f.manifest is not None:
            self.run_entry.update(status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), ok=self.ok_run,
                                  failed=self.failed_run)
            if broken:  # the job kept going; its log or report went nowhere from then on
                self.run_entry["broken_pipe"] = broken
            job.manifest.save(f.manifest)
        if f.stats_json is not None:
            f.stats_json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if status == "complete" and ok == 0 and failed:
            log(f"error: no request succeeded ({failed} failed); see {_name(f.errors)}", self.stream)
            return EXIT_FAILURE
        return {"complete": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILURE)


def _screen(runner: Runner, prepared: list[Prepared], bad: list[ErrorRecord]
            ) -> tuple[list[Prepared], list[ErrorRecord]]:
    """A request the runner refuses before the run (its structured-output constraint does not
    compile) becomes an error record; the others run."""
    failed = runner.screen(prepared)
    if not failed:
        return prepared, bad
    bad = bad + [ErrorRecord(prepared[i].request.line, prepared[i].request.custom_id,
                             f"line {prepared[i].request.line}: {why}", "invalid_value", "response_format")
                 for i, why in failed.items()]
    return [r for i, r in enumerate(prepared) if i not in failed], bad


def _name(path: Path | None) -> str:
    return "(none)" if path is None else "stdout" if path == STDOUT else str(path)
