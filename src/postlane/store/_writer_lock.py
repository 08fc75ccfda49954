"""One SQLite writer at a time, handed over at once instead of polled for.

SQLite lets one transaction write at a time. A writer that finds the lock
taken waits in SQLite's busy handler, which sleeps 1, 2, 5, 10, 15, 20, 25 ...
milliseconds between tries: it does not learn when the lock is released.
With intake (group commits) and delivery (leases, outcomes) writing beside
each other, in one process or two, those sleeps became the intake latency
that smtp-source waits for (bench/relay, ``-s 10``).

So writers queue here first: a thread lock within the process, then an
exclusive ``flock`` on a file next to the database, shared with every
process that opens it. A blocked ``flock`` returns as soon as the holder
releases it, and the kernel releases it when a holder dies. SQLite's own
locking stays in place underneath (and still guards writers that do not
take this lock, such as the sqlite3 shell); this only decides who goes
next, and wakes them promptly.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from postlane.errors import StoreError

__all__ = ["WriterLock"]


class WriterLock:
    """The writer queue of one SQLite database file (``<file>.writer-lock``).

    ``timeout`` bounds the wait for this process's other writers, so a
    transaction that (wrongly) opens a second writing transaction from the
    same thread fails like a locked database instead of hanging.
    """

    def __init__(self, database: Path, timeout: float) -> None:
        self.path = database.with_name(database.name + ".writer-lock")
        self._timeout = timeout
        self._local = threading.Lock()
        self._fd: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        if not self._local.acquire(timeout=self._timeout):
            raise StoreError(
                f"database error: database is locked (no write turn in {self._timeout:g} s)"
            )
        try:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._local.release()

    def close(self) -> None:
        with self._local:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _file(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot open the writer lock {self.path}: {exc}") from exc
        return self._fd
