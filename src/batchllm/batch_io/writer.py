"""Crash-safe JSONL: append whole lines, fsync at a bounded cadence, recover after a crash.

Durability: every record is one `os.write` of the whole line on an O_APPEND descriptor, so the
moment `write` returns the line is in the kernel and survives the process being killed (even
`kill -9`). `os.fsync` (surviving power loss / OS crash as well) runs at most every
`fsync_interval` seconds (default 0.5 s) while writing, and on `sync()` / `close()`. A crash can
therefore leave at most a partial last line, which `recover` cuts off.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

FSYNC_INTERVAL_S = 0.5


class JsonlWriter:
    """Appends JSON records to `path`, one whole line per `os.write`."""

    def __init__(self, path: str | Path, fsync_interval: float = FSYNC_INTERVAL_S) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._interval = fsync_interval
        self._last_sync = time.monotonic()
        self._dirty = False
        self.lines_written = 0

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        assert self._fd is not None, "writer is closed"
        view = memoryview(data)
        while view:  # a regular file takes the whole line at once; loop only for safety
            view = view[os.write(self._fd, view):]
        self.lines_written += 1
        self._dirty = True
        if time.monotonic() - self._last_sync >= self._interval:
            self.sync()

    def sync(self) -> None:
        """Force written lines to stable storage."""
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StdoutWriter:
    """`JsonlWriter`'s interface on standard output (`-o -`): one line per record, flushed at once."""

    def __init__(self) -> None:
        self.path = Path("-")
        self.lines_written = 0

    def write(self, record: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        sys.stdout.flush()
        self.lines_written += 1

    def sync(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        self.sync()


def open_writer(path: Path) -> JsonlWriter | StdoutWriter:
    """A writer for `path`; "-" is standard output."""
    return StdoutWriter() if str(path) == "-" else JsonlWriter(path)


class CorruptFileError(ValueError):
    """A line before the end of a JSONL file is not valid JSON (edited outside batchllm?)."""


def recover(path: str | Path, truncate: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Read the records of `path`; cut a partial or garbled tail (what a crash leaves).

    Returns the records and how many bytes were cut (0 if none; nothing is cut unless
    `truncate`). A bad line followed by good ones raises CorruptFileError.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0  # byte offset just past the last good line
    pos = 0
    bad_at: int | None = None
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        rec = None
        if nl >= 0 and raw.strip():
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
        if rec is not None and isinstance(rec, dict):
            if bad_at is not None:
                line_no = data.count(b"\n", 0, bad_at) + 1
                raise CorruptFileError(f"{path}: line {line_no} is not a valid record but later lines are; "
                                       f"the file was modified outside batchllm")
            records.append(rec)
            good_end = end
        elif raw.strip() and bad_at is None:
            bad_at = pos
        elif not raw.strip() and bad_at is None:
            good_end = end
        pos = end
    cut = len(data) - good_end
    if cut and truncate:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records, cut
