"""A job's log and report streams that survive a closed pipe.

`batchllm run-batch ... 2>&1 | head` or a supervisor that goes away closes the job's stdout or
stderr. Python ignores SIGPIPE, so the next write raised BrokenPipeError, which ended the job
mid-run (and then again while it reported the failure, leaving its manifest entry "running").
Writes to a broken stream are dropped instead and the job keeps going; the manifest notes which
stream broke (`broken`). The broken file descriptor is pointed at /dev/null so that the
interpreter's own flush at exit does not fail either.
"""

from __future__ import annotations

import os
from typing import Any, TextIO


class PipeGuard:
    """Wraps a text stream; `broken` is set once a write or flush hit a closed pipe."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream = stream
        self.name = name
        self.broken = False

    def _broke(self) -> None:
        self.broken = True
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, s: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(s)
            except (BrokenPipeError, ConnectionResetError):
                self._broke()
        return len(s)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (BrokenPipeError, ConnectionResetError):
                self._broke()

    def isatty(self) -> bool:
        try:
            return not self.broken and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, ... of the wrapped stream
        return getattr(self._stream, name)
