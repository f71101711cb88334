"""Progress while a batch runs (tqdm on a terminal, plain log lines otherwise) and the final report."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from batchllm.outputs import RunStats

LOG_INTERVAL_S = 5.0


def log(msg: str, stream: TextIO | None = None) -> None:
    """One line on stderr (above a progress bar, if one is showing), prefixed "[batchllm]"."""
    out = stream or sys.stderr
    tqdm.write(f"[batchllm] {msg}", file=out)
    out.flush()


class Progress:
    """Requests done/total, prefill and output tokens per second, prefix saving so far, ETA.

    A tqdm bar when `stream` is a terminal, else a log line every `log_interval` seconds.
    `tick` is cheap and may be called every engine step. "prefill" counts the prompt tokens
    computed so far (prefill in progress included); "out" the tokens decoded so far; "prefix
    saving" is the share of finished requests' prompt tokens reused from computation for another
    request (their `cached_tokens`; "n/a" until one finishes). The final report's saving
    (1 - computed/logical prefill) also charges each prefix once. The ETA extrapolates this run's
    requests per second ("n/a" until one finishes).
    """

    def __init__(self, total: int, done_before: int, stream: TextIO | None = None, tty: bool | None = None,
                 log_interval: float = LOG_INTERVAL_S) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.done = total, done_before
        self.done_before = done_before
        self.start = time.monotonic()
        self.prompt_tokens = self.cached_tokens = 0
        self.out_tokens = 0
        self._stats: RunStats | None = None
        self._steps_seen = self._tokens_processed = 0
        self._interval = log_interval
        self._last = self.start
        self.bar = tqdm(total=total, initial=done_before, desc="requests", unit="req", file=self.stream,
                        dynamic_ncols=True, disable=not self.tty, smoothing=0.1) if self.tty else None

    def request_done(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.done += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        if self.bar is not None:
            self.bar.update(1)
        self.tick(self._stats)

    def tick(self, stats: RunStats | None) -> None:
        """Refresh from the live run statistics (rate-limited)."""
        self._stats = stats
        now = time.monotonic()
        if now - self._last < (0.5 if self.tty else self._interval):
            return
        self._last = now
        if self.bar is not None:
            self.bar.set_postfix_str(self._rates(now), refresh=True)
        else:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            log(f"{self.done}/{self.total} requests ({pct:.1f}%) | {self._rates(now)} | "
                f"elapsed {now - self.start:.0f} s, ETA {self._eta(now)}", self.stream)

    def _eta(self, now: float) -> str:
        """Time left at this run's request rate so far, "n/a" before the first request finishes."""
        finished = self.done - self.done_before
        if finished <= 0:
            return "n/a"
        left = (self.total - self.done) * (now - self.start) / finished
        return f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"

    def _rates(self, now: float) -> str:
        s = self._stats
        out = prefill = 0
        if s is not None:  # tokens processed so far, finished requests or not
            new = s.tokens_per_step[self._steps_seen:]
            self._steps_seen += len(new)
            self._tokens_processed += sum(new)
            prefill = s.computed_prefill_tokens
            out = max(s.output_tokens, self._tokens_processed - prefill)
        t = max(now - self.start, 1e-9)
        saving = f"{self.cached_tokens / self.prompt_tokens:.1%}" if self.prompt_tokens else "n/a"
        return f"prefill {prefill / t:,.0f} tok/s, out {out / t:,.0f} tok/s, prefix saving {saving}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Report:
    """The end-of-job report (`--stats-json` writes `to_dict()`)."""

    status: str  # "complete" | "interrupted" | "failed"
    requests_in_file: int
    ok: int
    failed: int
    ok_this_run: int
    ok_before: int
    failed_this_run: int
    remaining: int
    total_time_s: float
    load_time_s: float
    run: RunStats | None
    files: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    # Each replica's own statistics when the job ran on several (`run` is then their sum);
    # absent from the JSON of a single-process job.
    replicas: list[RunStats] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run"] = _stats_dict(self.run)
        if self.replicas is None:
            d.pop("replicas")
        else:
            d["replicas"] = [_stats_dict(s) for s in self.replicas]
        return d

    def text(self) -> str:
        lines = [f"batchllm run-batch: {self.status} in {self.total_time_s:.1f} s "
                 f"(model load {self.load_time_s:.1f} s)"]
        if self.message:
            lines.append(f"  {self.message}")
        lines.append(f"  requests    {self.requests_in_file} in file: {self.ok} ok ({self.ok_this_run} this run, "
                     f"{self.ok_before} before), {self.failed} failed, {self.remaining} not run yet")
        s = self.run
        if s is not None and s.steps == 0:  # nothing ran: no saving, throughput or KV use to speak of
            lines.append(f"  prompt      {s.logical_prefill_tokens:,} tokens logical, none computed (prefix saving n/a)")
            lines.append("  throughput  n/a (no engine step ran)")
            lines.append("  KV cache    peak n/a")
        elif s is not None:
            if self.ok_before:
                lines.append("  (tokens, time and KV below are for this run)")
            if self.status != "complete":
                lines.append("  (a cut-short run: logical prompt tokens and tok/s count every request it started with)")
            lines += [
                f"  prompt      {s.logical_prefill_tokens:,} tokens logical, {s.computed_prefill_tokens:,} computed "
                f"(prefix saving {s.saving:.1%})",
                f"  output      {s.output_tokens:,} tokens",
                f"  throughput  {s.tokens_per_second:,.0f} tok/s ({s.output_tokens_per_second:,.0f} output tok/s) "
                f"over {s.wall_time_s:.2f} s, {s.steps} steps",
                f"  KV cache    peak {s.peak_kv_tokens:,} tokens ({s.peak_kv_blocks}/{s.num_kv_blocks} blocks), "
                f"{s.preemptions} preemptions",
            ]
        if self.replicas:
            lines.append(f"  replicas    {len(self.replicas)}, prompt tokens computed by each: "
                         + ", ".join(f"{r.computed_prefill_tokens:,}" for r in self.replicas))
        for name, path in self.files.items():
            lines.append(f"  {name:<11} {path}")
        return "\n".join(lines)


def _stats_dict(s: RunStats | None) -> dict[str, Any] | None:
    if s is None:
        return None
    d = s.to_dict()
    d.pop("tokens_per_step", None)  # one entry per step: too long for a report
    return d
