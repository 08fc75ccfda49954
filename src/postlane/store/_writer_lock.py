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

The wait for a turn is bounded, the lock file's as well as the thread
lock's: a writer of another process that never ends its turn (stopped,
hung, or a ``flock`` taken by hand) would otherwise stop every writer here
for as long, and with them every SMTP session waiting for its commit.
``flock`` has no timeout, and a signal cannot interrupt it outside the main
thread, so a contended wait blocks in a thread of its own that the writer
can give up on (see :class:`_FileWait`); an uncontended one costs a single
non-blocking ``flock``, as before.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from postlane.errors import StoreError

__all__ = ["WriterLock"]


class WriterLock:
    """The writer queue of one SQLite database file (``<file>.writer-lock``).

    ``timeout`` bounds the whole wait for a write turn, the same ten seconds
    as SQLite's own busy timeout (``SQLITE_BUSY_TIMEOUT_MS``), which still
    applies to writers that bypass this lock. After it the write fails with
    :class:`StoreError` ("database is locked"), as SQLite's would: a
    transaction that (wrongly) opens a second writing transaction from the
    same thread, and a lock file another process keeps, fail instead of
    hanging. Intake counts that as the database failing (``451 4.3.0``).
    """

    def __init__(self, database: Path, timeout: float) -> None:
        self.path = database.with_name(database.name + ".writer-lock")
        self._timeout = timeout
        self._local = threading.Lock()
        self._fd: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        deadline = time.monotonic() + self._timeout
        if not self._local.acquire(timeout=self._timeout):
            raise StoreError(
                f"database error: database is locked (no write turn in {self._timeout:g} s)"
            )
        turn_is_ours = True  # False once a given-up wait took the turn with it
        try:
            fd = self._file()
            if not _flock_now(fd):
                remaining = deadline - time.monotonic()
                wait = _FileWait(fd, self._local) if remaining > 0 else None
                if wait is None or not wait.wait(remaining):
                    turn_is_ours = wait is None
                    raise StoreError(
                        f"database error: database is locked (no write turn in "
                        f"{self._timeout:g} s: another process holds {self.path.name})"
                    )
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            if turn_is_ours:
                self._local.release()

    def close(self) -> None:
        """Close the lock file, after waiting (bounded) for this process's writer.

        Bounded because a given-up wait may keep the turn for as long as
        another process keeps the file; that wait has a descriptor of its own.
        """
        turn = self._local.acquire(timeout=self._timeout)
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            if turn:
                self._local.release()

    def _file(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot open the writer lock {self.path}: {exc}") from exc
        return self._fd


def _flock_now(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _FileWait:
    """A blocking ``flock`` in a thread of its own, so that the writer can stop waiting.

    Until the writer gives up, the process's turn (``turn``) stays the
    writer's. When it gives up, the turn passes to the thread: it keeps
    waiting, releases the file lock as soon as it gets it, and only then
    releases the turn, so that no other writer of this process uses the
    shared open file while a lock request on it may still be granted. Those
    writers meanwhile fail after their own timeout, on the turn. The thread
    waits on a duplicate descriptor, which stays valid if the writer lock is
    closed meanwhile (the duplicate shares the lock: closing it does not
    release a lock the writer goes on to use).
    """

    def __init__(self, fd: int, turn: threading.Lock) -> None:
        self._fd = os.dup(fd)
        self._turn = turn
        self._state = threading.Lock()
        self._done = threading.Event()
        self._given_up = False
        self._error: OSError | None = None
        try:
            threading.Thread(target=self._run, name="writer-lock-wait", daemon=True).start()
        except BaseException:
            os.close(self._fd)
            raise

    def wait(self, timeout: float) -> bool:
        """True with the file lock held; False once given up (the turn went to the thread)."""
        self._done.wait(timeout)
        with self._state:
            if not self._done.is_set():
                self._given_up = True
                return False
        if self._error is not None:
            raise StoreError(f"cannot take the writer lock: {self._error}") from self._error
        return True

    def _run(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            self._error = exc
        with self._state:
            if not self._given_up:
                os.close(self._fd)  # the writer's own descriptor holds the lock now
                self._done.set()
                return
        if self._error is None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._turn.release()
