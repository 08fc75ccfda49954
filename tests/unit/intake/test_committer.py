"""Group commit: many sessions' messages in one transaction, each answered on its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import psycopg.errors
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane import metrics
from postlane.errors import CommitFailed, StoreError
from postlane.intake import committer as committer_module
from postlane.intake.committer import CommitResult, GroupCommitter, write_batch
from postlane.store import Account, Database
from postlane.store.intake import NewMessage, NewRecipient
from postlane.store.schema import events, messages, recipients

T = TypeVar("T")
WAIT = 10.0  # seconds a test waits for the writer before calling it stuck


class GatedDatabase:
    """A Database stand-in that counts transactions and can hold the writer at BEGIN.

    Holding the writer while sessions submit is how a test decides what goes
    into one batch: everything submitted meanwhile is waiting when it resumes.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self.transactions = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        self.transactions += 1
        self.entered.set()
        if not self.gate.wait(WAIT):
            raise AssertionError("the test never opened the gate")
        with self._db.begin() as conn:
            yield conn


@pytest.fixture
def gated(db: Database) -> GatedDatabase:
    return GatedDatabase(db)


@pytest.fixture
def committer(gated: GatedDatabase) -> Iterator[GroupCommitter]:
    committer = GroupCommitter(cast(Database, gated))
    committer.start()
    try:
        yield committer
    finally:
        gated.gate.set()
        committer.stop()


_counter = iter(range(10**9))


def new_message(
    account_id: int,
    *,
    dedupe_key: str | None = None,
    received_at: datetime | None = None,
    **changes: Any,
) -> NewMessage:
    number = next(_counter)
    when = received_at or datetime.now(UTC)
    values: dict[str, Any] = {
        "id": f"Q{number:015d}",
        "account_id": account_id,
        "smtp_user_id": None,
        "mail_from": "news@acme.com",
        "header_from": "news@acme.com",
        "message_id_header": f"<{number}@acme.com>",
        "subject": "hi",
        "raw": b"From: news@acme.com\r\n\r\nbody\r\n",
        "options": {},
        "client_ip": "192.0.2.10",
        "tls": None,
        "received_at": when,
        "dedupe_key": dedupe_key,
        "recipients": (
            NewRecipient(
                address="bob@example.org",
                domain="example.org",
                priority=3,
                next_attempt_at=when,
                expires_at=when + timedelta(days=1),
            ),
        ),
        "event_data": {"n": number},
    }
    return NewMessage(**{**values, **changes})


def message_ids(db: Database) -> list[str]:
    with db.connect() as conn:
        return list(conn.scalars(sa.select(messages.c.id).order_by(messages.c.id)))


def event_rows(db: Database) -> list[tuple[str, str, dict[str, Any]]]:
    with db.connect() as conn:
        result = conn.execute(
            sa.select(events.c.message_id, events.c.type, events.c.data).order_by(events.c.id)
        )
        return [(m, t, d) for m, t, d in result]


def count(db: Database, table: sa.Table) -> int:
    with db.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


def batch_stats() -> tuple[float, float]:
    """(batches committed, messages in them) so far, from the batch size histogram."""
    samples = {s.name: s.value for s in metrics.COMMIT_BATCH_SIZE.collect()[0].samples}
    return (
        samples["postlane_intake_commit_batch_messages_count"],
        samples["postlane_intake_commit_batch_messages_sum"],
    )


def failures() -> float:
    return metrics.COMMIT_FAILURES._value.get()


def run(awaitable: Awaitable[T], timeout: float = WAIT) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout)

    return asyncio.run(bounded())


class Faults:
    """Intake's inserts, recorded, and failed on demand inside the real transaction.

    A fault is raised after the rows were written, as by a failing COMMIT, so
    the real ``Database.begin`` turns it into the store's error and rolls the
    rows back: what a test finds stored is what really committed.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[str]] = []
        self.rule: Callable[[list[str]], Exception | None] = lambda ids: None
        real = committer_module.insert_messages

        def insert(conn: Connection, batch: Sequence[NewMessage]) -> None:
            ids = [m.id for m in batch]
            self.batches.append(ids)
            real(conn, batch)
            fault = self.rule(ids)
            if fault is not None:
                raise fault

        monkeypatch.setattr(committer_module, "insert_messages", insert)

    def always(self, fault: Callable[[], Exception]) -> None:
        self.rule = lambda ids: fault()


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch)


def _caused_by(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


#: How the store reports a database that cannot commit anything (a fresh error each time).
DATABASE_FAILURES: dict[str, Callable[[], Exception]] = {
    "disk I/O error": lambda: sa.exc.OperationalError(
        "COMMIT", None, sqlite3.OperationalError("disk I/O error")
    ),
    "connection lost": lambda: sa.exc.DBAPIError(
        "COMMIT",
        None,
        psycopg.DatabaseError("server closed the connection unexpectedly"),
        connection_invalidated=True,
    ),
    "disk full, from the SQLite cursor": lambda: _caused_by(
        StoreError("database error: database or disk is full"),
        sqlite3.OperationalError("database or disk is full"),
    ),
    "no write turn": lambda: StoreError(
        "database error: database is locked (no write turn in 10 s)"
    ),
    "connection pool exhausted": lambda: sa.exc.TimeoutError("QueuePool limit reached"),
}


def disk_io_error() -> Exception:
    return DATABASE_FAILURES["disk I/O error"]()


async def wait_until_held(gated: GatedDatabase) -> None:
    """Until the writer thread sits at BEGIN of its current batch."""
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, gated.entered.wait, WAIT)


async def submitted(*coroutines: Awaitable[T]) -> list[asyncio.Task[T]]:
    """Tasks for the coroutines, each already queued at the committer."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    await asyncio.sleep(0)  # every task runs up to its await of the commit
    return tasks


# -- one message ---------------------------------------------------------------------------


def test_commit_returns_the_queue_id_once_durable(
    committer: GroupCommitter, db: Database, account: Account
) -> None:
    message = new_message(account.id)
    result = run(committer.commit(message))
    assert result == CommitResult(message.id)
    assert result.duplicate_of is None
    assert message_ids(db) == [message.id]
    assert count(db, recipients) == 1
    accepted, queued = event_rows(db)
    assert accepted == (message.id, "accepted", message.event_data)
    assert queued[:2] == (message.id, "queued")


def test_lone_commit_is_one_transaction(
    committer: GroupCommitter, gated: GatedDatabase, account: Account
) -> None:
    before = batch_stats()
    run(committer.commit(new_message(account.id)))
    after = batch_stats()
    assert gated.transactions == 1
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


# -- grouping ------------------------------------------------------------------------------


def test_concurrent_commits_share_transactions(
    committer: GroupCommitter, gated: GatedDatabase, db: Database, account: Account
) -> None:
    batch = [new_message(account.id) for _ in range(50)]
    before = batch_stats()

    async def scenario() -> list[CommitResult]:
        gated.hold()
        tasks = await submitted(*(committer.commit(m) for m in batch))
        await wait_until_held(gated)
        gated.gate.set()
        return list(await asyncio.gather(*tasks))

    results = run(scenario())
    after = batch_stats()
    assert [r.queue_id for r in results] == [m.id for m in batch]
    assert all(r.duplicate_of is None for r in results)
    assert sorted(message_ids(db)) == sorted(m.id for m in batch)
    assert count(db, recipients) == 50
    # The writer took what was waiting when it started, then everything else at once.
    assert gated.transactions <= 2
    assert after[0] - before[0] == gated.transactions
    assert after[1] - before[1] == 50


def test_many_sessions_without_a_gate_still_need_fewer_transactions(
    committer: GroupCommitter, gated: GatedDatabase, db: Database, account: Account
) -> None:
    batch = [new_message(account.id) for _ in range(50)]

    async def scenario() -> list[CommitResult]:
        return list(await asyncio.gather(*(committer.commit(m) for m in batch)))

    results = run(scenario())
    assert {r.queue_id for r in results} == {m.id for m in batch}
    assert gated.transactions < 50
    assert len(message_ids(db)) == 50


# -- duplicates ----------------------------------------------------------------------------


def test_duplicate_within_one_batch_returns_the_original(
    committer: GroupCommitter, gated: GatedDatabase, db: Database, account: Account
) -> None:
    first = new_message(account.id, dedupe_key="k")
    again = new_message(account.id, dedupe_key="k")
    other = new_message(account.id, dedupe_key="other")
    before = batch_stats()

    async def scenario() -> list[CommitResult]:
        gated.hold()
        blocker = await submitted(committer.commit(new_message(account.id)))
        await wait_until_held(gated)
        tasks = await submitted(*(committer.commit(m) for m in (first, again, other)))
        gated.gate.set()
        await asyncio.gather(*blocker)
        return list(await asyncio.gather(*tasks))

    results = run(scenario())
    after = batch_stats()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 4)  # [blocker], [the three]
    assert results == [
        CommitResult(first.id),
        CommitResult(first.id, duplicate_of=first.id),
        CommitResult(other.id),
    ]
    assert again.id not in message_ids(db)
    assert count(db, messages) == 3
    duplicates = [e for e in event_rows(db) if e[1] == "duplicate"]
    assert duplicates == [(first.id, "duplicate", {**again.event_data, "resubmitted_as": again.id})]


def test_duplicate_across_batches_returns_the_original(
    committer: GroupCommitter, db: Database, account: Account
) -> None:
    first = new_message(account.id, dedupe_key="k")
    again = new_message(account.id, dedupe_key="k")
    third = new_message(account.id, dedupe_key="k")
    assert run(committer.commit(first)) == CommitResult(first.id)
    assert run(committer.commit(again)) == CommitResult(first.id, duplicate_of=first.id)
    assert run(committer.commit(third)) == CommitResult(first.id, duplicate_of=first.id)
    assert message_ids(db) == [first.id]
    assert count(db, recipients) == 1
    assert [(m, t) for m, t, _ in event_rows(db)] == [
        (first.id, "accepted"),
        (first.id, "queued"),
        (first.id, "duplicate"),
        (first.id, "duplicate"),
    ]


def test_messages_without_a_key_are_never_duplicates(
    committer: GroupCommitter, db: Database, account: Account
) -> None:
    one = new_message(account.id)
    two = new_message(account.id, message_id_header=one.message_id_header)
    assert run(committer.commit(one)).queue_id == one.id
    assert run(committer.commit(two)).queue_id == two.id
    assert count(db, messages) == 2


def test_original_outside_the_window_is_not_a_duplicate(db: Database, account: Account) -> None:
    committer = GroupCommitter(db, duplicate_window=3600)
    committer.start()
    try:
        now = datetime.now(UTC)
        old = new_message(account.id, dedupe_key="k", received_at=now - timedelta(hours=2))
        recent = new_message(account.id, dedupe_key="k", received_at=now - timedelta(minutes=5))
        again = new_message(account.id, dedupe_key="k", received_at=now)
        assert run(committer.commit(old)) == CommitResult(old.id)
        assert run(committer.commit(recent)) == CommitResult(recent.id)
        assert run(committer.commit(again)) == CommitResult(recent.id, duplicate_of=recent.id)
    finally:
        committer.stop()
    assert message_ids(db) == sorted([old.id, recent.id])


def test_no_window_means_no_duplicate_detection(db: Database, account: Account) -> None:
    committer = GroupCommitter(db, duplicate_window=0)
    committer.start()
    try:
        one = new_message(account.id, dedupe_key="k")
        two = new_message(account.id, dedupe_key="k")
        assert run(committer.commit(one)) == CommitResult(one.id)
        assert run(committer.commit(two)) == CommitResult(two.id)
    finally:
        committer.stop()
    assert count(db, messages) == 2


# -- failures ------------------------------------------------------------------------------


def test_a_bad_message_fails_alone_and_its_batch_neighbours_commit(
    committer: GroupCommitter, gated: GatedDatabase, db: Database, account: Account
) -> None:
    good1 = new_message(account.id)
    bad = new_message(account.id + 1000)  # no such account: the foreign key refuses it
    good2 = new_message(account.id)
    failed_before = failures()

    async def scenario() -> list[Any]:
        gated.hold()
        blocker = await submitted(committer.commit(new_message(account.id)))
        await wait_until_held(gated)
        tasks = await submitted(*(committer.commit(m) for m in (good1, bad, good2)))
        gated.gate.set()
        await asyncio.gather(*blocker)
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    results = run(scenario())
    assert results[0] == CommitResult(good1.id)
    assert isinstance(results[1], CommitFailed)
    assert results[2] == CommitResult(good2.id)
    # The grouped attempt failed, then the bad message failed again on its own.
    assert failures() - failed_before == 2
    ids = message_ids(db)
    assert good1.id in ids
    assert good2.id in ids
    assert bad.id not in ids
    assert all(m != bad.id for m, _, _ in event_rows(db))
    assert count(db, recipients) == 3


def test_a_bad_message_alone_fails_and_the_committer_goes_on(
    committer: GroupCommitter, db: Database, account: Account
) -> None:
    with pytest.raises(CommitFailed):
        run(committer.commit(new_message(account.id + 1000)))
    good = new_message(account.id)
    assert run(committer.commit(good)) == CommitResult(good.id)
    assert message_ids(db) == [good.id]


def test_reused_queue_id_fails_only_that_message(
    committer: GroupCommitter, db: Database, account: Account
) -> None:
    first = new_message(account.id)
    run(committer.commit(first))
    with pytest.raises(CommitFailed):
        run(committer.commit(new_message(account.id, id=first.id)))
    assert count(db, recipients) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unexpected_error_fails_only_its_message(
    committer: GroupCommitter, db: Database, account: Account
) -> None:
    bad = new_message(account.id, options={"not json": object()})
    with pytest.raises(CommitFailed):
        run(committer.commit(bad), timeout=1)
    good = new_message(account.id)
    assert run(committer.commit(good), timeout=1) == CommitResult(good.id)


def test_a_batch_on_a_failing_database_costs_one_transaction_not_one_per_message(
    db: Database, account: Account, faults: Faults
) -> None:
    """Each one-by-one retry would wait for its own connect or lock timeout."""
    batch = [new_message(account.id) for _ in range(200)]
    faults.always(disk_io_error)
    outcome = write_batch(db, batch, timedelta(days=1))
    assert len(faults.batches) == 1
    assert outcome.failed_transactions == 1
    assert all(isinstance(r, CommitFailed) for r in outcome.results)
    assert len(outcome.results) == 200
    assert count(db, messages) == 0


@pytest.mark.parametrize("fault", DATABASE_FAILURES.values(), ids=DATABASE_FAILURES.keys())
def test_a_database_failure_fails_every_session_of_the_batch_at_once(
    committer: GroupCommitter,
    gated: GatedDatabase,
    db: Database,
    account: Account,
    faults: Faults,
    fault: Callable[[], Exception],
) -> None:
    blocker = new_message(account.id)
    batch = [new_message(account.id) for _ in range(20)]
    faults.always(fault)
    failed_before = failures()

    async def scenario() -> list[Any]:
        gated.hold()
        first = await submitted(committer.commit(blocker))
        await wait_until_held(gated)
        tasks = await submitted(*(committer.commit(m) for m in batch))
        gated.gate.set()
        await asyncio.gather(*first, return_exceptions=True)
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    results = run(scenario())
    assert all(isinstance(r, CommitFailed) for r in results)
    assert faults.batches == [[blocker.id], [m.id for m in batch]]  # not 20 more, one each
    assert failures() - failed_before == 2
    assert count(db, messages) == 0
    assert count(db, recipients) == 0


def test_a_database_failure_in_the_one_by_one_retries_fails_the_rest_untried(
    db: Database, account: Account, faults: Faults
) -> None:
    good1, good2, good3, good4 = (new_message(account.id) for _ in range(4))
    bad = new_message(account.id + 1000)  # no such account: the foreign key refuses it
    faults.rule = lambda ids: disk_io_error() if ids == [good2.id] else None

    outcome = write_batch(db, [good1, bad, good2, good3, good4], timedelta(days=1))

    assert faults.batches == [
        [good1.id, bad.id, good2.id, good3.id, good4.id],  # the group: refused for bad
        [good1.id],
        [bad.id],
        [good2.id],  # the database fails: good3 and good4 are not tried
    ]
    assert outcome.results[0] == CommitResult(good1.id)
    assert all(isinstance(r, CommitFailed) for r in outcome.results[1:])
    assert outcome.failed_transactions == 3  # the group, bad, good2: untried is not a failure
    assert message_ids(db) == [good1.id]
    assert count(db, recipients) == 1


def test_a_transaction_conflict_is_retried_one_by_one(
    db: Database, account: Account, faults: Faults
) -> None:
    """A deadlock or serialization failure lost a race that the retries win."""
    batch = [new_message(account.id) for _ in range(3)]
    conflict = sa.exc.OperationalError(
        "INSERT", None, psycopg.errors.DeadlockDetected("deadlock detected")
    )
    faults.rule = lambda ids: conflict if len(ids) > 1 else None

    outcome = write_batch(db, batch, timedelta(days=1))

    assert len(faults.batches) == 4
    assert outcome.results == [CommitResult(m.id) for m in batch]
    assert outcome.failed_transactions == 1
    assert sorted(message_ids(db)) == sorted(m.id for m in batch)


def test_an_integrity_error_in_a_group_still_commits_the_neighbours(
    db: Database, account: Account, faults: Faults
) -> None:
    good1, good2 = new_message(account.id), new_message(account.id)
    again = new_message(account.id, id=good1.id)  # a reused queue id: the primary key refuses it

    outcome = write_batch(db, [good1, again, good2], timedelta(days=1))

    assert len(faults.batches) == 4
    assert outcome.results[0] == CommitResult(good1.id)
    assert isinstance(outcome.results[1], CommitFailed)
    assert outcome.results[2] == CommitResult(good2.id)
    assert outcome.failed_transactions == 2
    assert sorted(message_ids(db)) == sorted([good1.id, good2.id])


# -- start and stop ------------------------------------------------------------------------


def test_commit_before_start_fails(db: Database, account: Account) -> None:
    committer = GroupCommitter(db)
    with pytest.raises(CommitFailed):
        run(committer.commit(new_message(account.id)))
    assert count(db, messages) == 0


def test_stop_commits_everything_already_submitted(
    committer: GroupCommitter, gated: GatedDatabase, db: Database, account: Account
) -> None:
    blocker = new_message(account.id)
    batch = [new_message(account.id) for _ in range(10)]
    stopper = threading.Thread(target=committer.stop, daemon=True)

    async def scenario() -> list[CommitResult]:
        gated.hold()
        first = await submitted(committer.commit(blocker))
        await wait_until_held(gated)  # the writer holds [blocker]; the rest wait behind it
        tasks = await submitted(*(committer.commit(m) for m in batch))
        stopper.start()  # the stop request queues up behind the ten
        opener = threading.Timer(0.05, gated.gate.set)
        opener.start()
        stopper.join(WAIT)  # stop() returns once the writer has finished ...
        assert not stopper.is_alive(), "stop() did not return"
        opener.join()
        assert len(message_ids(db)) == 11  # ... and everything is durable by then
        await asyncio.gather(*first)
        return list(await asyncio.gather(*tasks))

    results = run(scenario())
    assert [r.queue_id for r in results] == [m.id for m in batch]


def test_commit_after_stop_fails(committer: GroupCommitter, db: Database, account: Account) -> None:
    run(committer.commit(new_message(account.id)))
    committer.stop()
    with pytest.raises(CommitFailed):
        run(committer.commit(new_message(account.id)))
    assert count(db, messages) == 1
    committer.stop()  # a second stop is harmless


def test_commit_during_stop_is_answered(
    committer: GroupCommitter, gated: GatedDatabase, account: Account
) -> None:
    async def scenario() -> None:
        gated.hold()
        first = await submitted(committer.commit(new_message(account.id)))
        await wait_until_held(gated)
        stopping = asyncio.ensure_future(asyncio.to_thread(committer.stop))
        await asyncio.sleep(0.05)  # stop() has queued its marker and is joining
        late = asyncio.ensure_future(committer.commit(new_message(account.id)))
        await asyncio.sleep(0.05)
        gated.gate.set()
        await asyncio.gather(*first)
        await stopping
        with contextlib.suppress(CommitFailed):  # refusing is fine; waiting forever is not
            await asyncio.wait_for(late, 1)

    asyncio.run(scenario())


def test_a_commit_racing_stop_is_answered(db: Database, account: Account) -> None:
    """stop() once fitted between a commit's check and its queuing.

    The commit saw intake running, stop() turned it off and drained the queue,
    and the commit's item landed after the drain: its session waited for ever.
    Here stop() is started at exactly that point and given time to finish.
    """
    racing = GroupCommitter(db)
    stopper = threading.Thread(target=racing.stop, daemon=True)

    class RacingQueue(queue.SimpleQueue[Any]):
        def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
            if stopper.ident is None and getattr(item, "message", None) is not None:
                stopper.start()
                stopper.join(0.3)  # without the gate, stop() is over by now
            super().put(item, block, timeout)

    racing._queue = RacingQueue()
    racing.start()

    async def scenario() -> CommitResult:
        return await asyncio.wait_for(racing.commit(new_message(account.id)), 5)

    result = run(scenario())
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert message_ids(db) == [result.queue_id]


# -- sessions that stop waiting (their commit deadline) --------------------------------------


async def given_up(task: asyncio.Task[Any]) -> None:
    """Cancel a commit's wait, as a session's deadline does."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_a_message_whose_session_gave_up_before_the_writer_took_it_is_not_committed(
    committer: GroupCommitter,
    gated: GatedDatabase,
    db: Database,
    account: Account,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker, dropped = new_message(account.id), new_message(account.id)

    async def scenario() -> None:
        gated.hold()
        (first,) = await submitted(committer.commit(blocker))
        await wait_until_held(gated)
        (second,) = await submitted(committer.commit(dropped))
        await given_up(second)  # its client got 451 and will send it again
        gated.gate.set()
        await first

    with caplog.at_level(logging.INFO, "postlane.intake"):
        run(scenario())
        committer.stop()
    assert message_ids(db) == [blocker.id]
    assert "1 message(s) not committed: their sessions gave up waiting" in caplog.text


def test_a_late_result_for_a_session_that_gave_up_is_logged_and_nothing_else(
    committer: GroupCommitter,
    gated: GatedDatabase,
    db: Database,
    account: Account,
    caplog: pytest.LogCaptureFixture,
) -> None:
    late = new_message(account.id)

    async def scenario() -> None:
        gated.hold()
        (task,) = await submitted(committer.commit(late))
        await wait_until_held(gated)  # being written: too late to leave it out
        await given_up(task)
        gated.gate.set()
        for _ in range(int(WAIT / 0.01)):  # the writer's answer arrives in this loop
            if "committed after its session gave up" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert task.cancelled()

    with caplog.at_level(logging.INFO, "postlane.intake"):
        run(scenario())
    assert message_ids(db) == [late.id]
    assert f"queue_id={late.id} committed after its session gave up (451 4.3.0 sent)" in (
        caplog.text
    )
    assert run(committer.commit(new_message(account.id)))  # the writer goes on


def test_stop_gives_up_on_a_writer_stuck_in_the_database_after_its_grace(
    committer: GroupCommitter,
    gated: GatedDatabase,
    account: Account,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[float, BaseException | None]:
        gated.hold()
        await submitted(committer.commit(new_message(account.id)))
        await wait_until_held(gated)  # and it stays there
        (waiting,) = await submitted(committer.commit(new_message(account.id)))
        started = time.monotonic()
        await committer.close(0.3)
        took = time.monotonic() - started
        await asyncio.wait([waiting], timeout=WAIT)
        return took, waiting.exception()

    with caplog.at_level(logging.ERROR, "postlane.intake"):
        took, error = run(scenario())
    assert took < 5
    assert isinstance(error, CommitFailed) and "did not finish in time" in str(error)
    assert "the intake writer did not finish in 0.3 s; 1 waiting message(s)" in caplog.text
