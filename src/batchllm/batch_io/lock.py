"""One run-batch job per output: an exclusive lock held for the whole run.

A second `run-batch` (a retrying job scheduler, a resume typed while the first still runs) on
the same output would append the same requests' results again. The lock is `flock` on
`OUT.lock` beside the output: the kernel drops it when the holder exits however it ends (even
SIGKILL), so a dead job never blocks its resume. The lock file stays after the run; deleting it
would let a third run lock a new file while a second still holds the old one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the job's lock."""


class JobLock:
    """The lock on `path`; with None (results to stdout: no file to guard) it holds nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> JobLock:
        """Take the lock without waiting; LockHeld (naming the holder's pid, if recorded) if taken."""
        if self.path is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(f"another run-batch (pid {holder or 'unknown'}) is running on this output (it holds "
                           f"{self.path}); wait for it to finish or stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
