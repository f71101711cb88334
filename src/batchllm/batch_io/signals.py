"""SIGINT/SIGTERM/SIGHUP during a job: stop after the current engine step, keep what is finished."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, TextIO

from .progress import log


class StopSignals:
    """While `running`, the first SIGINT/SIGTERM/SIGHUP (its terminal went away) only records itself (the engine polls
    `requested` every step and stops admitting, ending the run after that step). Outside the
    run (loading, tokenizing) or on a second signal, KeyboardInterrupt is raised at once.
    Handlers are installed only in the main thread and restored on exit."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.signum: int | None = None
        self.running = False
        self._stream = stream
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if not self.running or not first:
            raise KeyboardInterrupt
        log(f"{signal.Signals(signum).name}: stopping after the current step; finished results are kept "
            f"(signal again to stop at once)", self._stream)
