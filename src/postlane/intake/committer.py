"""Group commit: many sessions' messages share one transaction and one fsync.

A message may only be acknowledged with ``250`` once it is durable, and a
durable commit costs an fsync (milliseconds on real disks). Committing each
message alone would cap intake at a few hundred messages a second however
fast everything else is. Instead one writer takes every message that is
waiting, writes them all in one transaction (:func:`write_batch`), and then
answers each waiting session. The writer is the commit process
(:mod:`postlane.intake.commit_service`, the default) or, with
``smtp.commit_process = false``, a thread of the intake process
(:class:`GroupCommitter`). With one client nothing waits: its message is committed at once.
With many, the batch grows by itself while the previous commit is flushing,
and ``max_delay`` lets a busy writer collect a few more before it starts.

If a grouped transaction fails because of a message (the database refused
its data: an integrity or data error, or a value Postlane cannot store), its
messages are retried one by one so that a single bad message cannot fail its
neighbours; each failure reaches only its own session, as ``CommitFailed``,
and nothing of it stays in the database.

If it fails because of the database (unreachable or black-holed, the
connection lost, a disk I/O error or a full disk, no connection free in the
pool), a retry would fail too, each after its own connect or lock timeout: a
group of 200 would wait 200 timeouts for its ``451`` while nothing else
commits. So every message of the group fails at once, and if the database
fails during the one-by-one retries, the messages not yet tried fail without
being tried. Clients retry a ``451 4.3.0`` later, when the database may be back.

SQLite's "database is locked" (and :class:`~postlane.store._writer_lock.WriterLock`
finding no write turn) counts as the database's failure. Every write waits for
the writer turn and then starts with ``BEGIN IMMEDIATE``, so the wait happens
before any row of any message is written: no message can cause it, and each
one-by-one retry would wait the same ten seconds again. A transaction conflict
on PostgreSQL (SQLSTATE class 40: deadlock, serialization failure) is neither
a bad message nor a failed database but a race that a retry may win, so the
one-by-one retries go ahead.

A session waits for its commit at most ``smtp.commit_timeout`` and then
answers ``451 4.3.0`` (:mod:`postlane.smtp.server`), cancelling its wait. A
message whose session gave up before the writer took it is not committed; one
already being written commits anyway, and its result, which nobody waits for
any more, is logged (:func:`log_late_result`): the client retries, and
duplicate detection recognises the retry of a message that did commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from sqlalchemy import exc as sa_exc

from postlane import metrics
from postlane.errors import CommitFailed, PostlaneError, StoreError
from postlane.store import Database
from postlane.store.intake import NewMessage, find_duplicates, insert_messages, record_duplicates

log = logging.getLogger("postlane.intake")


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The queue id to report: the new message's, or the original's for a duplicate."""

    queue_id: str
    duplicate_of: str | None = None


@dataclass(slots=True)
class _Pending:
    #: None once its session gave up waiting: the writer then skips it, and
    #: the queue no longer keeps the message's bytes alive.
    message: NewMessage | None
    future: asyncio.Future[CommitResult]
    loop: asyncio.AbstractEventLoop
    queue_id: str


_STOP = object()

#: Seconds ``close()`` waits for commits under way: a database or commit
#: process that stopped answering must not stop the shutdown for ever.
DRAIN_TIMEOUT = 30.0


class Committer(Protocol):
    """What a session needs: its message made durable (here, or in the commit process)."""

    async def open(self) -> None: ...

    async def close(self, grace: float = DRAIN_TIMEOUT) -> None:
        """Refuse new commits and wait, at most ``grace`` seconds, for those under way."""
        ...

    async def commit(self, message: NewMessage) -> CommitResult:
        """Make the message durable; CommitFailed if it was not.

        Cancelling the wait (a session's commit deadline) commits the message
        only if it was already on its way; a result that comes later is logged.
        """
        ...


class GroupCommitter:
    """Group commit in a writer thread of this process (``smtp.commit_process = false``)."""

    def __init__(
        self,
        db: Database,
        *,
        max_delay: float = 0.002,
        max_batch: int = 256,
        duplicate_window: float = 86400.0,
    ) -> None:
        self._db = db
        self._max_delay = max_delay
        self._max_batch = max_batch
        self._window = timedelta(seconds=duplicate_window)
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._accepting = False
        # Held while checking _accepting and queuing, and while stop() turns it
        # off and queues its marker: without it a commit could pass the check,
        # stop() could drain the queue, and the commit's item would land behind
        # the drain and never be answered.
        self._gate = threading.Lock()
        self._last_batch = 0

    async def open(self) -> None:
        self.start()

    async def close(self, grace: float = DRAIN_TIMEOUT) -> None:
        await asyncio.to_thread(self.stop, grace)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="intake-commit", daemon=True)
        self._accepting = True
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Commit everything already submitted, then end the writer thread.

        A commit that arrives while stopping is refused (its session gets
        451); one that slipped in behind the stop marker is failed, not left
        waiting forever. After ``timeout`` (a writer stuck in the database)
        what the writer has not taken yet is failed too, and the writer, a
        daemon thread, is left to the end of the process.
        """
        if self._thread is None:
            return
        with self._gate:
            self._accepting = False
            self._queue.put(_STOP)
        self._thread.join(timeout)
        stuck = self._thread.is_alive()
        self._thread = None
        failed = 0
        reason = "the intake writer did not finish in time" if stuck else "intake is stopping"
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Pending):
                failed += item.message is not None
                _resolve(item, CommitFailed(reason))
        if stuck:
            self._queue.put(_STOP)  # for the writer, should it ever come back
            log.error(
                "the intake writer did not finish in %g s; %d waiting message(s) not committed",
                timeout,
                failed,
            )

    async def commit(self, message: NewMessage) -> CommitResult:
        """Make the message durable; raises CommitFailed if it could not be."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CommitResult] = loop.create_future()
        item = _Pending(message, future, loop, message.id)
        with self._gate:
            if not self._accepting:
                raise CommitFailed("intake is not running")
            self._queue.put(item)
        try:
            return await future
        except asyncio.CancelledError:
            item.message = None  # the session gave up: skipped unless being written
            raise

    # -- writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            assert isinstance(first, _Pending)
            batch = [first]
            stopping = self._collect(batch)
            self._write(batch)

    def _collect(self, batch: list[_Pending]) -> bool:
        """Add waiting messages to the batch; True when a stop request was seen."""
        deadline = time.monotonic() + (self._max_delay if self._last_batch > 1 else 0.0)
        while len(batch) < self._max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _STOP:
                return True
            assert isinstance(item, _Pending)
            batch.append(item)
        return False

    def _write(self, batch: list[_Pending]) -> None:
        self._last_batch = len(batch)
        # each item's message is read once: a session giving up from now on
        # is too late to keep its message out of this transaction
        taken = [(item, item.message) for item in batch]
        wanted = [(item, message) for item, message in taken if message is not None]
        if len(wanted) < len(taken):
            log.info(
                "%d message(s) not committed: their sessions gave up waiting (451 4.3.0)",
                len(taken) - len(wanted),
            )
        if not wanted:
            return
        outcome = write_batch(self._db, [message for _, message in wanted], self._window)
        record_metrics(len(wanted), outcome.seconds, outcome.failed_transactions)
        for (item, _), result in zip(wanted, outcome.results, strict=True):
            _resolve(item, result)


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one grouped commit did: each message's result, and what the metrics count."""

    results: list[CommitResult | CommitFailed]
    seconds: float
    failed_transactions: int


def write_batch(db: Database, batch: Sequence[NewMessage], window: timedelta) -> BatchOutcome:
    """Commit messages in one transaction; each gets its result or its own failure.

    The one place that decides how a failed group is retried, for the writer
    thread and the commit process alike (see the module docstring).
    """
    started = time.perf_counter()
    try:
        results: list[CommitResult | CommitFailed] = list(_transaction(db, batch, window))
    except Exception as exc:  # any failure must reach the sessions, never kill the writer
        _log_failure(exc)
        if len(batch) == 1:
            log.error("intake commit failed for %s: %s", batch[0].id, exc)
        elif _database_failed(exc):
            log.error("grouped commit of %d failed, the database with it: %s", len(batch), exc)
        else:
            log.warning("grouped commit of %d failed (%s); retrying one by one", len(batch), exc)
            return _one_by_one(db, batch, window, started)
        return BatchOutcome(_failed_at_once(len(batch), exc), time.perf_counter() - started, 1)
    return BatchOutcome(results, time.perf_counter() - started, 0)


def _one_by_one(
    db: Database, batch: Sequence[NewMessage], window: timedelta, started: float
) -> BatchOutcome:
    results: list[CommitResult | CommitFailed] = []
    failed = 1  # the grouped transaction
    for message in batch:
        try:
            results.extend(_transaction(db, [message], window))
        except Exception as exc:  # as in write_batch: answer the session, keep the writer
            _log_failure(exc)
            failed += 1
            log.error("intake commit failed for %s: %s", message.id, exc)
            results.append(CommitFailed(str(exc)))
            if _database_failed(exc):
                untried = len(batch) - len(results)
                if untried:
                    log.error("%d message(s) of the group fail untried", untried)
                    results.extend(_failed_at_once(untried, exc, tried=False))
                break
    return BatchOutcome(results, time.perf_counter() - started, failed)


def _failed_at_once(
    count: int, exc: Exception, *, tried: bool = True
) -> list[CommitResult | CommitFailed]:
    # one exception per session: a shared instance would gather every raiser's traceback
    reason = str(exc) if tried else f"not tried after a database failure: {exc}"
    return [CommitFailed(reason) for _ in range(count)]


def _log_failure(exc: Exception) -> None:
    if not isinstance(exc, PostlaneError):
        log.error("unexpected error in an intake commit", exc_info=exc)


def _database_failed(exc: Exception) -> bool:
    """Whether the database failed (a retry would too), rather than a message's data.

    The first driver error in the chain of causes decides: operational and
    interface errors and invalidated connections are the database's, a
    transaction conflict (SQLSTATE class 40) and every other driver error
    (integrity, data, programming) are the transaction's. Without a driver
    error, a :class:`StoreError` or ``OSError`` is the store failing before
    any statement (no write turn, the lock file, the connection settings),
    and anything else (``InvalidInput``, a value that cannot be encoded) is
    the message's.
    """
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        verdict = _driver_verdict(error)
        if verdict is not None:
            return verdict
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return isinstance(exc, StoreError | OSError)


def _driver_verdict(error: BaseException) -> bool | None:
    """True: the database failed; False: the transaction did; None: not a driver error."""
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if str(getattr(error.orig, "sqlstate", None) or "").startswith("40"):
            return False
        return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
    if isinstance(error, sqlite3.Error):  # intake's SQLite inserts run on the raw cursor
        return isinstance(error, sqlite3.OperationalError | sqlite3.InterfaceError)
    if isinstance(error, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True  # no connection free in the pool, or a disconnect seen by the pool
    return None


def record_metrics(size: int, seconds: float, failed_transactions: int) -> None:
    """Count a grouped commit (its size and time only when it committed as a group).

    Failures count transactions that were attempted and failed: a message
    failed untried after a database failure cost no transaction.
    """
    if failed_transactions:
        metrics.COMMIT_FAILURES.inc(failed_transactions)
    else:
        metrics.COMMIT_SECONDS.observe(seconds)
        metrics.COMMIT_BATCH_SIZE.observe(size)


def _transaction(
    db: Database, batch: Sequence[NewMessage], window: timedelta
) -> list[CommitResult]:
    keys = [m.dedupe_key for m in batch if m.dedupe_key]
    since = min(m.received_at for m in batch) - window
    fresh: list[NewMessage] = []
    duplicates: list[tuple[NewMessage, str]] = []
    results: list[CommitResult] = []
    with db.begin() as conn:
        seen = find_duplicates(conn, keys, since) if keys and window else {}
        for message in batch:
            original = seen.get(message.dedupe_key) if message.dedupe_key else None
            if original is not None:
                duplicates.append((message, original))
                results.append(CommitResult(original, duplicate_of=original))
                continue
            if message.dedupe_key and window:
                seen[message.dedupe_key] = message.id
            fresh.append(message)
            results.append(CommitResult(message.id))
        insert_messages(conn, fresh)
        record_duplicates(conn, duplicates)
    return results


def log_late_result(queue_id: str, outcome: CommitResult | Exception) -> None:
    """Note what became of a message whose session had stopped waiting (and sent 451).

    Nothing else happens: the client was told to retry, and if the message
    did commit, duplicate detection recognises the retry (given a Message-ID).
    """
    if isinstance(outcome, Exception):
        log.info("queue_id=%s not committed after its session gave up: %s", queue_id, outcome)
    elif outcome.duplicate_of is not None:
        log.info(
            "queue_id=%s was a duplicate of %s, found after its session gave up",
            queue_id,
            outcome.duplicate_of,
        )
    else:
        log.info(
            "queue_id=%s committed after its session gave up (451 4.3.0 sent); "
            "a retry is a duplicate",
            queue_id,
        )


def _resolve(item: _Pending, outcome: CommitResult | Exception) -> None:
    def settle() -> None:
        if item.future.cancelled():  # the session gave up; the commit stands regardless
            log_late_result(item.queue_id, outcome)
            return
        if item.future.done():
            return
        if isinstance(outcome, Exception):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        item.loop.call_soon_threadsafe(settle)
