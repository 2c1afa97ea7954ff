"""One `gazelit fit` per run directory: an exclusive lock held for the whole run.

The lock is `flock` on `<run dir>/.lock`, which the kernel releases when its holder dies (kill -9
included), so a lock left by a killed run is stale by construction: the next run takes it over and says
so. The file records who holds it (PID, host, start time) so that a refused run can name the holder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another gazelit fit ({holder}); wait for it to end, or use "
                f"another run.name"
            ) from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            log.warning("%s: taking over a stale lock (%s, no longer running)", self.path, _describe(previous))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: nobody held it when it was last released
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        record = json.loads(raw.decode())
        return f"PID {record['pid']} on host {record['host']}, since {record['since']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"
