"""The delivery queue: leasing, reclaiming, fenced outcomes, the sweeper, operator actions."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from postlane.errors import InvalidInput, NotFound
from postlane.store import Account, Database, create_account, queue
from postlane.store.intake import NewMessage, NewRecipient, insert_messages
from postlane.store.queue import (
    Delivery,
    Leased,
    cancel,
    expire_overdue,
    get_recipient,
    hold,
    lease_due,
    list_queue,
    mark_deferred,
    mark_delivered,
    mark_delivered_many,
    mark_expired,
    mark_failed,
    mark_suppressed,
    reclaim_expired_leases,
    release,
    renew_leases,
    retry,
)
from postlane.store.schema import events, recipients
from postlane.store.suppressions import add_suppression, list_suppressions

T0 = datetime(2024, 5, 1, 8, 0, 0, 250000, tzinfo=UTC)
LEASE = timedelta(minutes=5)
MINUTE = timedelta(minutes=1)


def enqueue(
    db: Database,
    account_id: int,
    queue_id: str,
    *addresses: str,
    priority: int = 3,
    next_attempt_at: datetime = T0,
    expires_at: datetime = T0 + timedelta(days=3),
    subject: str | None = "Spring news",
) -> list[int]:
    """Store one message for ``addresses``; the new recipient ids, in address order."""
    message = NewMessage(
        id=queue_id,
        account_id=account_id,
        smtp_user_id=None,
        mail_from="news@acme.com",
        header_from="news@acme.com",
        message_id_header=None,
        subject=subject,
        raw=b"From: news@acme.com\r\n\r\nhi\r\n",
        options={},
        client_ip=None,
        tls=None,
        received_at=next_attempt_at,
        dedupe_key=None,
        recipients=tuple(
            NewRecipient(
                address=address,
                domain=address.rpartition("@")[2].lower(),
                priority=priority,
                next_attempt_at=next_attempt_at,
                expires_at=expires_at,
            )
            for address in addresses
        ),
    )
    with db.begin() as conn:
        insert_messages(conn, [message])
        query = (
            sa.select(recipients.c.id)
            .where(recipients.c.message_id == queue_id)
            .order_by(recipients.c.id)
        )
        return list(conn.execute(query).scalars())


def lease(
    db: Database,
    owner: str = "w1",
    *,
    now: datetime = T0,
    limit: int = 100,
    lease_for: timedelta = LEASE,
) -> list[Leased]:
    with db.begin() as conn:
        return lease_due(
            conn, owner=owner, now=now, limit=limit, lease_for=lease_for, dialect=db.dialect_name
        )


def row(db: Database, recipient_id: int) -> dict[str, Any]:
    with db.connect() as conn:
        found = conn.execute(sa.select(recipients).where(recipients.c.id == recipient_id)).one()
    return dict(found._mapping)


def set_status(db: Database, status: str, *ids: int) -> None:
    with db.begin() as conn:
        conn.execute(sa.update(recipients).where(recipients.c.id.in_(ids)).values(status=status))


def queue_events(db: Database, recipient_id: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(type, data) of the queue's recipient events (all recipients if None), oldest first.

    Intake's ``queued`` events (store/intake.py) are left out: these tests are
    about what the queue writes after them.
    """
    query = sa.select(events.c.type, events.c.data).where(
        events.c.recipient_id.is_not(None), events.c.type != "queued"
    )
    if recipient_id is not None:
        query = query.where(events.c.recipient_id == recipient_id)
    with db.connect() as conn:
        return [(t, dict(d)) for t, d in conn.execute(query.order_by(events.c.id))]


def ids_of(leased: Sequence[Leased]) -> list[int]:
    return [x.id for x in leased]


# -- lease_due -------------------------------------------------------------------------------


def test_lease_due_takes_waiting_rows_whose_time_has_come(db: Database, account: Account) -> None:
    queued, deferred, later, held, done = enqueue(
        db, account.id, "Q1", "a@x.org", "b@x.org", "c@x.org", "d@x.org", "e@x.org"
    )
    set_status(db, "deferred", deferred)
    set_status(db, "held", held)
    set_status(db, "delivered", done)
    with db.begin() as conn:
        conn.execute(
            sa.update(recipients)
            .where(recipients.c.id == later)
            .values(next_attempt_at=T0 + MINUTE)
        )

    leased = lease(db, "worker-a", now=T0)

    assert sorted(ids_of(leased)) == [queued, deferred]
    first = next(x for x in leased if x.id == queued)
    assert first == Leased(
        id=queued,
        message_id="Q1",
        account_id=account.id,
        address="a@x.org",
        domain="x.org",
        priority=3,
        attempts=0,
        expires_at=T0 + timedelta(days=3),
        next_attempt_at=T0,
    )
    for rid in (queued, deferred):
        stored = row(db, rid)
        assert stored["status"] == "sending"
        assert stored["lease_owner"] == "worker-a"
        assert stored["lease_expires_at"] == T0 + LEASE
        assert stored["updated_at"] == T0
        assert stored["attempts"] == 0
    assert [row(db, rid)["status"] for rid in (later, held, done)] == [
        "queued",
        "held",
        "delivered",
    ]
    assert queue_events(db) == []  # the lease itself is not an event
    assert lease(db, "worker-b", now=T0) == []  # leased rows are not due
    assert ids_of(lease(db, "worker-b", now=T0 + MINUTE)) == [later]


def test_lease_due_takes_highest_priority_then_oldest_then_lowest_id(
    db: Database, account: Account
) -> None:
    p3_old = enqueue(db, account.id, "Q1", "a@x.org", "b@x.org", priority=3, next_attempt_at=T0)
    p3_new = enqueue(db, account.id, "Q2", "c@x.org", priority=3, next_attempt_at=T0 + MINUTE)
    p1 = enqueue(db, account.id, "Q3", "d@x.org", priority=1, next_attempt_at=T0 + 2 * MINUTE)
    p5 = enqueue(db, account.id, "Q4", "e@x.org", priority=5, next_attempt_at=T0 - MINUTE)
    now = T0 + 3 * MINUTE
    taken: list[int] = []
    for _ in range(5):
        (one,) = lease(db, now=now, limit=1)
        taken.append(one.id)
    assert taken == [*p1, *p3_old, *p3_new, *p5]


def test_lease_due_merges_queued_and_deferred_rows_in_one_order(
    db: Database, account: Account
) -> None:
    (deferred_p2_old,) = enqueue(db, account.id, "Q1", "a@x.org", priority=2, next_attempt_at=T0)
    (queued_p2_new,) = enqueue(
        db, account.id, "Q2", "b@x.org", priority=2, next_attempt_at=T0 + MINUTE
    )
    (queued_p1,) = enqueue(db, account.id, "Q3", "c@x.org", priority=1, next_attempt_at=T0 + MINUTE)
    (deferred_p1,) = enqueue(db, account.id, "Q4", "d@x.org", priority=1, next_attempt_at=T0)
    set_status(db, "deferred", deferred_p2_old, deferred_p1)
    now = T0 + 2 * MINUTE
    assert ids_of(lease(db, now=now, limit=1)) == [deferred_p1]
    assert ids_of(lease(db, now=now, limit=1)) == [queued_p1]
    assert ids_of(lease(db, now=now, limit=1)) == [deferred_p2_old]
    assert ids_of(lease(db, now=now, limit=1)) == [queued_p2_new]


def test_lease_due_returns_rows_grouped_by_destination(db: Database, account: Account) -> None:
    enqueue(db, account.id, "Q1", "a@b.org", "a@a.org", priority=3, next_attempt_at=T0)
    enqueue(db, account.id, "Q2", "b@b.org", "b@a.org", priority=1, next_attempt_at=T0)
    enqueue(db, account.id, "Q3", "c@a.org", priority=3, next_attempt_at=T0 - MINUTE)
    leased = lease(db, now=T0)
    assert [x.address for x in leased] == ["b@a.org", "c@a.org", "a@a.org", "b@b.org", "a@b.org"]
    assert leased == sorted(leased, key=lambda x: (x.domain, x.priority, x.next_attempt_at, x.id))


def test_lease_due_respects_the_limit(db: Database, account: Account) -> None:
    ids = enqueue(db, account.id, "Q1", *(f"u{i}@x.org" for i in range(7)))
    assert lease(db, limit=0) == []
    first = ids_of(lease(db, limit=3))
    second = ids_of(lease(db, limit=3))
    third = ids_of(lease(db, limit=3))
    assert (first, second, third) == (ids[:3], ids[3:6], ids[6:])
    assert lease(db, limit=3) == []


def test_priority_one_overtakes_ten_thousand_bulk_rows(db: Database, account: Account) -> None:
    bulk = [f"user{i}@bulk{i % 20}.example" for i in range(10_000)]
    enqueue(db, account.id, "BULK", *bulk, priority=3, next_attempt_at=T0 - timedelta(hours=1))
    (urgent,) = enqueue(db, account.id, "URGENT", "ceo@partner.example", priority=1)
    leased = lease(db, now=T0, limit=100)
    assert len(leased) == 100
    assert urgent in ids_of(leased)
    assert sum(x.priority == 1 for x in leased) == 1


def test_lease_due_refuses_bad_arguments(db: Database) -> None:
    other = "postgresql" if db.dialect_name == "sqlite" else "sqlite"
    good: dict[str, Any] = {
        "owner": "w1",
        "now": T0,
        "limit": 10,
        "lease_for": LEASE,
        "dialect": db.dialect_name,
    }
    bad: list[tuple[dict[str, Any], str]] = [
        ({"dialect": other}, "dialect"),
        ({"dialect": "mysql"}, "dialect"),
        ({"owner": ""}, "lease owner"),
        ({"now": datetime(2024, 5, 1)}, "aware"),
        ({"limit": -1}, "limit"),
        ({"limit": True}, "limit"),
        ({"lease_for": timedelta(0)}, "lease_for"),
    ]
    for change, message in bad:
        with pytest.raises(InvalidInput, match=message), db.begin() as conn:
            lease_due(conn, **{**good, **change})


# -- concurrency -----------------------------------------------------------------------------


def test_two_workers_leasing_at_once_never_share_a_row_and_take_all(
    db: Database, account: Account
) -> None:
    expected: set[int] = set()
    for m in range(6):
        expected.update(
            enqueue(
                db,
                account.id,
                f"Q{m}",
                *(f"u{i}@d{i % 4}.example" for i in range(50)),
                priority=1 + m % 5,
            )
        )
    got: dict[str, list[int]] = {"w1": [], "w2": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(owner: str) -> None:
        try:
            start.wait()
            while True:
                leased = lease(db, owner, limit=7)
                if not leased:
                    return
                got[owner].extend(ids_of(leased))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(owner,)) for owner in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert not set(got["w1"]) & set(got["w2"])
    assert len(got["w1"]) + len(got["w2"]) == len(expected)
    assert set(got["w1"]) | set(got["w2"]) == expected
    with db.connect() as conn:
        owners = dict(
            conn.execute(sa.select(recipients.c.id, recipients.c.lease_owner)).tuples().all()
        )
    assert all(owners[i] == "w1" for i in got["w1"])
    assert all(owners[i] == "w2" for i in got["w2"])


def test_postgresql_worker_skips_rows_a_peer_is_still_leasing(
    db: Database, account: Account
) -> None:
    if db.dialect_name != "postgresql":
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite serialises writers with BEGIN IMMEDIATE")
    ids = enqueue(db, account.id, "Q1", *(f"u{i}@x.org" for i in range(10)))
    with db.engine.connect() as first:
        with first.begin():
            mine = lease_due(
                first, owner="w1", now=T0, limit=4, lease_for=LEASE, dialect="postgresql"
            )
            # w1 has not committed; w2 must neither wait for its rows nor take them.
            with db.begin() as second:
                second.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
                theirs = lease_due(
                    second, owner="w2", now=T0, limit=4, lease_for=LEASE, dialect="postgresql"
                )
        assert sorted(ids_of(mine)) == ids[:4]
        assert sorted(ids_of(theirs)) == ids[4:8]
    assert sorted(ids_of(lease(db, "w3"))) == ids[8:]


# -- reclaiming expired leases -------------------------------------------------------------------


def test_reclaim_returns_a_dead_workers_rows(db: Database, account: Account) -> None:
    dead = enqueue(db, account.id, "Q1", "a@x.org", "b@x.org")
    assert sorted(ids_of(lease(db, "dead-worker", now=T0))) == dead
    (alive,) = enqueue(db, account.id, "Q2", "c@x.org", next_attempt_at=T0 + 2 * MINUTE)
    assert ids_of(lease(db, "live-worker", now=T0 + 2 * MINUTE)) == [alive]

    with db.begin() as conn:
        assert reclaim_expired_leases(conn, now=T0 + LEASE) == 0  # not yet: expiry is exclusive
    later = T0 + LEASE + MINUTE
    with db.begin() as conn:
        assert reclaim_expired_leases(conn, now=later) == 2

    for rid in dead:
        stored = row(db, rid)
        assert stored["status"] == "deferred"
        assert stored["next_attempt_at"] == later
        assert stored["lease_owner"] is None
        assert stored["lease_expires_at"] is None
        assert stored["attempts"] == 0  # the outcome is unknown: not counted
        assert queue_events(db, rid) == [
            (
                "lease_expired",
                {"owner": "dead-worker", "lease_expired_at": (T0 + LEASE).isoformat()},
            )
        ]
    assert row(db, alive)["lease_owner"] == "live-worker"
    assert sorted(ids_of(lease(db, "other", now=later))) == dead
    with db.begin() as conn:
        assert reclaim_expired_leases(conn, now=later) == 0


def test_a_sweeping_worker_keeps_its_own_rows_in_flight(db: Database, account: Account) -> None:
    # Its renewals failed for a while, so its lease ran out. Reclaimed by its
    # own sweep, the row was leased again by the same owner, and the owner
    # fence let the stale attempt's outcome overwrite the new one's.
    mine, done_with = enqueue(db, account.id, "Q1", "a@x.org", "b@x.org")
    (theirs,) = enqueue(db, account.id, "Q2", "c@x.org")
    assert sorted(ids_of(lease(db, "w1", now=T0))) == sorted([mine, done_with, theirs])
    with db.begin() as conn:  # c@ was leased by w1 too, but w1 lost track of it: stays fair game
        conn.execute(
            sa.update(recipients).where(recipients.c.id == theirs).values(lease_owner="w2")
        )
    later = T0 + LEASE + MINUTE
    with db.begin() as conn:
        reclaimed = reclaim_expired_leases(conn, now=later, owner="w1", in_flight={mine, theirs})
    assert reclaimed == 2  # done_with (not in flight) and theirs (another owner's)
    assert row(db, mine)["status"] == "sending"
    assert row(db, mine)["lease_owner"] == "w1"
    assert ids_of(lease(db, "w1", now=later)) == [done_with, theirs]  # mine is not leased twice
    with db.begin() as conn:
        assert mark_delivered(conn, mine, owner="w1", now=later, data={"mx": "a"})


def test_a_late_outcome_from_a_reclaimed_lease_changes_nothing(
    db: Database, account: Account
) -> None:
    (rid,) = enqueue(db, account.id, "Q1", "a@x.org")
    lease(db, "slow", now=T0)
    later = T0 + LEASE + MINUTE
    with db.begin() as conn:
        reclaim_expired_leases(conn, now=later)
    assert ids_of(lease(db, "fast", now=later)) == [rid]
    before = row(db, rid)
    before_events = queue_events(db, rid)

    with db.begin() as conn:
        assert not mark_delivered(conn, rid, owner="slow", now=later, data={"mx": "a"})
        assert not mark_deferred(
            conn, rid, owner="slow", now=later, next_attempt_at=later, reply="451", data={}
        )
        assert not mark_failed(conn, rid, owner="slow", now=later, reply="550", data={})
        assert not mark_expired(conn, rid, owner="slow", now=later, reply=None, data={})
        assert not mark_suppressed(conn, rid, owner="slow", now=later, reason="hard_bounce")
    assert row(db, rid) == before
    assert queue_events(db, rid) == before_events

    with db.begin() as conn:
        assert mark_delivered(conn, rid, owner="fast", now=later, data={"mx": "b"})
    with db.begin() as conn:  # a repeated report is fenced too
        assert not mark_delivered(conn, rid, owner="fast", now=later, data={"mx": "b"})
    assert row(db, rid)["status"] == "delivered"
    assert [t for t, _ in queue_events(db, rid)] == ["lease_expired", "delivered"]


def test_an_outcome_for_a_row_never_leased_is_refused(db: Database, account: Account) -> None:
    (rid,) = enqueue(db, account.id, "Q1", "a@x.org")
    with db.begin() as conn:
        assert not mark_delivered(conn, rid, owner="w1", now=T0, data={})
        assert not mark_delivered(conn, 999_999, owner="w1", now=T0, data={})
    assert row(db, rid)["status"] == "queued"
    assert queue_events(db) == []


# -- outcomes ------------------------------------------------------------------------------------


def leased_row(db: Database, account: Account, owner: str = "w1") -> int:
    (rid,) = enqueue(db, account.id, f"Q{owner}", "bob@example.org")
    assert ids_of(lease(db, owner, now=T0)) == [rid]
    return rid


def test_mark_delivered(db: Database, account: Account) -> None:
    rid = leased_row(db, account)
    done = T0 + MINUTE
    with db.begin() as conn:
        assert mark_delivered(
            conn, rid, owner="w1", now=done, data={"mx": "mx1.example.org"}, reply="250 2.0.0 ok"
        )
    stored = row(db, rid)
    assert stored["status"] == "delivered"
    assert stored["attempts"] == 1
    assert stored["last_reply"] == "250 2.0.0 ok"
    assert (stored["lease_owner"], stored["lease_expires_at"]) == (None, None)
    assert stored["updated_at"] == done
    assert queue_events(db, rid) == [
        ("delivered", {"mx": "mx1.example.org", "reply": "250 2.0.0 ok"})
    ]
    with db.connect() as conn:
        event = conn.execute(
            sa.select(events).where(events.c.recipient_id == rid, events.c.type == "delivered")
        ).one()
    assert (event.account_id, event.message_id, event.created_at) == (account.id, "Qw1", done)


def test_mark_delivered_many_writes_each_held_row_and_its_event(
    db: Database, account: Account
) -> None:
    ids = enqueue(db, account.id, "QM", "a@example.org", "b@example.org", "c@example.org")
    assert sorted(ids_of(lease(db, "w1", now=T0))) == sorted(ids)
    set_status(db, "cancelled", ids[2])  # an operator took this one away meanwhile
    done = T0 + MINUTE
    deliveries = [
        Delivery(ids[0], {"mx": "mx1"}, "250 2.0.0 ok a"),
        Delivery(ids[1], {"mx": "mx1", "reply": "own"}),
        Delivery(ids[2], {"mx": "mx1"}, "250 2.0.0 ok c"),
    ]
    with db.begin() as conn:
        assert mark_delivered_many(conn, deliveries, owner="w1", now=done) == [True, True, False]
    first, second, third = (row(db, rid) for rid in ids)
    assert (first["status"], first["attempts"], first["last_reply"]) == (
        "delivered",
        1,
        "250 2.0.0 ok a",
    )
    assert (second["status"], second["last_reply"]) == ("delivered", None)
    assert (first["lease_owner"], first["lease_expires_at"], first["updated_at"]) == (
        None,
        None,
        done,
    )
    assert third["status"] == "cancelled"
    assert queue_events(db, ids[0]) == [("delivered", {"mx": "mx1", "reply": "250 2.0.0 ok a"})]
    assert queue_events(db, ids[1]) == [("delivered", {"mx": "mx1", "reply": "own"})]
    assert queue_events(db, ids[2]) == []


def test_mark_delivered_many_is_fenced_on_the_owner(db: Database, account: Account) -> None:
    rid = leased_row(db, account, owner="w1")
    with db.begin() as conn:
        assert mark_delivered_many(conn, [Delivery(rid, {})], owner="w2", now=T0) == [False]
        assert mark_delivered_many(conn, [], owner="w1", now=T0) == []
    assert row(db, rid)["status"] == "sending"
    assert queue_events(db, rid) == []


def test_mark_delivered_many_checks_its_input(db: Database, account: Account) -> None:
    rid = leased_row(db, account)
    with db.begin() as conn, pytest.raises(InvalidInput, match="event data"):
        mark_delivered_many(conn, [Delivery(rid, {"x": object()})], owner="w1", now=T0)


def test_mark_deferred_schedules_the_next_attempt(db: Database, account: Account) -> None:
    rid = leased_row(db, account)
    retry_at = T0 + 10 * MINUTE
    with db.begin() as conn:
        assert mark_deferred(
            conn,
            rid,
            owner="w1",
            now=T0 + MINUTE,
            next_attempt_at=retry_at,
            reply="451 4.7.1 greylisted",
            data={"mx": "mx1", "reply": "451 4.7.1 greylisted, try later"},
        )
    stored = row(db, rid)
    assert stored["status"] == "deferred"
    assert stored["attempts"] == 1
    assert stored["next_attempt_at"] == retry_at
    assert stored["last_reply"] == "451 4.7.1 greylisted"
    assert stored["lease_owner"] is None
    # the caller's data wins over the reply added for it
    assert queue_events(db, rid) == [
        ("deferred", {"mx": "mx1", "reply": "451 4.7.1 greylisted, try later"})
    ]
    assert lease(db, "w2", now=retry_at - timedelta(seconds=1)) == []
    (again,) = lease(db, "w2", now=retry_at)
    assert (again.id, again.attempts) == (rid, 1)


def test_reschedule_defers_without_counting_an_attempt(db: Database, account: Account) -> None:
    rid = leased_row(db, account)
    later = T0 + MINUTE
    reason = "4.7.0 local rate limit for gmail: next slot in 60 s"
    with db.begin() as conn:
        assert queue.reschedule(
            conn,
            rid,
            owner="w1",
            now=T0,
            next_attempt_at=later,
            reason=reason,
            data={"local": True},
        )
        assert not queue.reschedule(  # the lease is gone: a second call changes nothing
            conn, rid, owner="w1", now=T0, next_attempt_at=later, reason=reason, data={}
        )
    stored = row(db, rid)
    assert (stored["status"], stored["attempts"]) == ("deferred", 0)
    assert (stored["next_attempt_at"], stored["last_reply"]) == (later, reason)
    assert queue_events(db, rid)[-1][0] == "deferred"
    (again,) = lease(db, "w2", now=later)
    assert (again.id, again.attempts) == (rid, 0)


def test_mark_failed_and_bounced(db: Database, account: Account) -> None:
    failed = leased_row(db, account, "w1")
    bounced = leased_row(db, account, "w2")
    with db.begin() as conn:
        assert mark_failed(conn, failed, owner="w1", now=T0, reply="554 no", data={"mx": "m"})
        assert mark_failed(
            conn, bounced, owner="w2", now=T0, reply="550 5.1.1 unknown", data={}, status="bounced"
        )
    assert (row(db, failed)["status"], row(db, failed)["attempts"]) == ("failed", 1)
    assert (row(db, bounced)["status"], row(db, bounced)["last_reply"]) == (
        "bounced",
        "550 5.1.1 unknown",
    )
    assert queue_events(db, failed) == [("failed", {"mx": "m", "reply": "554 no"})]
    assert queue_events(db, bounced) == [("bounced", {"reply": "550 5.1.1 unknown"})]
    rid = leased_row(db, account, "w3")
    with pytest.raises(InvalidInput, match="'failed' or 'bounced'"), db.begin() as conn:
        mark_failed(conn, rid, owner="w3", now=T0, reply=None, data={}, status="delivered")
    assert row(db, rid)["status"] == "sending"


def test_mark_expired_counts_an_attempt_only_if_one_was_made(
    db: Database, account: Account
) -> None:
    tried = leased_row(db, account, "w1")
    untried = leased_row(db, account, "w2")
    with db.begin() as conn:
        assert mark_expired(conn, tried, owner="w1", now=T0, reply="421 busy", data={})
        assert mark_expired(conn, untried, owner="w2", now=T0, reply=None, data={}, attempted=False)
    assert (row(db, tried)["status"], row(db, tried)["attempts"]) == ("expired", 1)
    assert (row(db, untried)["status"], row(db, untried)["attempts"]) == ("expired", 0)
    assert queue_events(db, tried) == [("expired", {"reply": "421 busy"})]
    assert queue_events(db, untried) == [("expired", {})]


def test_mark_suppressed(db: Database, account: Account) -> None:
    rid = leased_row(db, account)
    with db.begin() as conn:
        assert mark_suppressed(conn, rid, owner="w1", now=T0, reason="hard_bounce")
    stored = row(db, rid)
    assert (stored["status"], stored["attempts"], stored["lease_owner"]) == ("suppressed", 0, None)
    assert queue_events(db, rid) == [("suppressed", {"reason": "hard_bounce"})]


def test_mark_suppressed_with_facts_for_programs(db: Database, account: Account) -> None:
    rid = leased_row(db, account)
    with db.begin() as conn:
        assert mark_suppressed(
            conn,
            rid,
            owner="w1",
            now=T0,
            reason="address unsubscribed (X-ListOption 32)",
            data={"filter": "unsubscribe", "reason": "overridden"},
        )
    assert queue_events(db, rid) == [
        (
            "suppressed",
            {"reason": "address unsubscribed (X-ListOption 32)", "filter": "unsubscribe"},
        )
    ]


def listed_as(db: Database, account: Account) -> dict[str, tuple[str, str | None]]:
    with db.connect() as conn:
        found = list_suppressions(conn, account.id, 1000)
    return {s.address: (s.reason, s.detail) for s in found}


def test_an_expiry_after_a_try_lists_the_address_as_returned(
    db: Database, account: Account
) -> None:
    tried, untried, earlier, bounced = enqueue(
        db, account.id, "EXP", "t@x.org", "u@x.org", "e@x.org", "h@x.org"
    )
    with db.begin() as conn:
        conn.execute(
            sa.update(recipients)
            .where(recipients.c.id == earlier)
            .values(attempts=2, last_reply="451 try later")
        )
        add_suppression(conn, account.id, "h@x.org", "hard_bounce", "550 5.1.1", now=T0)
    assert len(lease(db, "w1")) == 4
    with db.begin() as conn:
        assert mark_expired(conn, tried, owner="w1", now=T0, reply="421 busy", data={})
        assert mark_expired(conn, untried, owner="w1", now=T0, reply=None, data={}, attempted=False)
        assert mark_expired(conn, earlier, owner="w1", now=T0, reply=None, data={}, attempted=False)
        assert mark_expired(conn, bounced, owner="w1", now=T0, reply="421 busy", data={})
        # a lost lease writes nothing, on the list either
        assert not mark_expired(conn, untried, owner="w1", now=T0, reply="421", data={})
    assert listed_as(db, account) == {
        "t@x.org": ("returned", "expired undelivered after 1 attempt; last reply: 421 busy"),
        "e@x.org": ("returned", "expired undelivered after 2 attempts"),
        "h@x.org": ("hard_bounce", "550 5.1.1"),  # a hard bounce is not weakened
    }


def test_expire_overdue_lists_tried_rows_as_returned(db: Database, account: Account) -> None:
    never, deferred, odd = enqueue(
        db, account.id, "OLD", "never@x.org", "deferred@x.org", "postmaster", expires_at=T0
    )
    with db.begin() as conn:
        conn.execute(
            sa.update(recipients)
            .where(recipients.c.id.in_([deferred, odd]))
            .values(status="deferred", attempts=3, last_reply="450 4.2.0 mailbox busy")
        )
    with db.begin() as conn:
        assert expire_overdue(conn, now=T0) == 3
    assert {row(db, rid)["status"] for rid in (never, deferred, odd)} == {"expired"}
    # never tried: nothing known about the address; "postmaster" cannot be listed: skipped
    assert listed_as(db, account) == {
        "deferred@x.org": (
            "returned",
            "expired undelivered after 3 attempts; last reply: 450 4.2.0 mailbox busy",
        )
    }


def test_outcome_data_must_be_json(db: Database, account: Account) -> None:
    rid = leased_row(db, account)
    with pytest.raises(InvalidInput, match="event data"), db.begin() as conn:
        mark_delivered(conn, rid, owner="w1", now=T0, data={"when": T0})
    assert row(db, rid)["status"] == "sending"


# -- the expiry sweep ----------------------------------------------------------------------------


def test_expire_overdue_ends_waiting_rows_past_their_expiry(db: Database, account: Account) -> None:
    end = T0 + timedelta(hours=1)
    queued, deferred, sending, held = enqueue(
        db, account.id, "OLD", "a@x.org", "b@x.org", "c@x.org", "d@x.org", expires_at=end
    )
    (fresh,) = enqueue(db, account.id, "NEW", "e@x.org", expires_at=end + MINUTE)
    set_status(db, "deferred", deferred)
    set_status(db, "held", held)
    with db.begin() as conn:
        conn.execute(
            sa.update(recipients)
            .where(recipients.c.id == sending)
            .values(status="sending", lease_owner="w1", lease_expires_at=T0 + LEASE)
        )

    with db.begin() as conn:
        assert expire_overdue(conn, now=end - timedelta(microseconds=1)) == 0
    with db.begin() as conn:
        assert expire_overdue(conn, now=end) == 2
    statuses = [row(db, rid)["status"] for rid in (queued, deferred, sending, held, fresh)]
    assert statuses == ["expired", "expired", "sending", "held", "queued"]
    assert row(db, queued)["updated_at"] == end
    for rid in (queued, deferred):
        assert queue_events(db, rid) == [("expired", {"expires_at": end.isoformat()})]
    with db.begin() as conn:
        assert expire_overdue(conn, now=end) == 0


def test_expire_overdue_in_batches(db: Database, account: Account) -> None:
    ids = enqueue(db, account.id, "Q1", *(f"u{i}@x.org" for i in range(5)), expires_at=T0)
    with db.begin() as conn:
        assert expire_overdue(conn, now=T0, limit=2) == 2
        assert expire_overdue(conn, now=T0, limit=0) == 0
    with db.begin() as conn:
        assert expire_overdue(conn, now=T0, limit=2) == 2
        assert expire_overdue(conn, now=T0, limit=2) == 1
        assert expire_overdue(conn, now=T0, limit=2) == 0
    assert {row(db, rid)["status"] for rid in ids} == {"expired"}
    assert len(queue_events(db)) == 5
    with pytest.raises(InvalidInput, match="limit"), db.begin() as conn:
        expire_overdue(conn, now=T0, limit=-1)


# -- operator views ------------------------------------------------------------------------------


def test_list_queue_filters_and_orders_newest_first(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
    a1, a2 = enqueue(db, account.id, "Q1", "a@X.org", "b@y.org", subject="First")
    (b1,) = enqueue(db, other.id, "Q2", "c@x.org", subject=None)
    set_status(db, "deferred", a2)
    with db.connect() as conn:
        everything = list_queue(conn)
        by_account = list_queue(conn, account_id=account.id)
        by_domain = list_queue(conn, domain="X.ORG")
        by_status = list_queue(conn, status="deferred")
        both = list_queue(conn, account_id=account.id, domain="x.org", status="queued")
        limited = list_queue(conn, limit=1)
        nothing = list_queue(conn, status="bounced")
    assert [r.id for r in everything] == [b1, a2, a1]
    assert [r.id for r in by_account] == [a2, a1]
    assert [r.id for r in by_domain] == [b1, a1]
    assert [r.id for r in by_status] == [a2]
    assert [r.id for r in both] == [a1]
    assert [r.id for r in limited] == [b1]
    assert nothing == []
    first = everything[-1]
    assert (first.mail_from, first.subject, first.message_id) == ("news@acme.com", "First", "Q1")
    assert (first.address, first.domain, first.status, first.priority) == (
        "a@X.org",
        "x.org",
        "queued",
        3,
    )
    assert everything[0].subject is None
    with pytest.raises(InvalidInput, match="status 'lost' is invalid"), db.connect() as conn:
        list_queue(conn, status="lost")
    with pytest.raises(InvalidInput, match="limit"), db.connect() as conn:
        list_queue(conn, limit=-5)


def test_get_recipient(db: Database, account: Account) -> None:
    (rid,) = enqueue(db, account.id, "Q1", "a@x.org")
    lease(db, "w1")
    with db.connect() as conn:
        found = get_recipient(conn, rid)
        assert (found.id, found.status, found.lease_owner) == (rid, "sending", "w1")
        assert found.lease_expires_at == T0 + LEASE
        assert found.created_at.tzinfo is UTC
        with pytest.raises(NotFound, match="recipient 424242 not found"):
            get_recipient(conn, 424242)


# -- operator actions ----------------------------------------------------------------------------

LATER = T0 + timedelta(hours=2)


def test_an_empty_filter_is_refused(db: Database, account: Account) -> None:
    (rid,) = enqueue(db, account.id, "Q1", "a@x.org")
    for action in (retry, hold, release, cancel):
        with pytest.raises(InvalidInput, match="name ids, --account or --domain"), db.begin() as c:
            action(c, now=LATER)
    with db.begin() as conn:
        assert cancel(conn, now=LATER, ids=[]) == 0  # naming no ids matches nothing
    assert row(db, rid)["status"] == "queued"
    with pytest.raises(InvalidInput, match="recipient id"), db.begin() as conn:
        cancel(conn, now=LATER, ids=["1"])  # type: ignore[list-item]


def test_hold_release_and_retry(db: Database, account: Account) -> None:
    queued, deferred, held, sending = enqueue(
        db, account.id, "Q1", "a@x.org", "b@x.org", "c@x.org", "d@x.org",
        next_attempt_at=T0 + timedelta(hours=5),
    )  # fmt: skip
    set_status(db, "deferred", deferred)
    set_status(db, "held", held)
    set_status(db, "sending", sending)
    everything = [queued, deferred, held, sending]

    with db.begin() as conn:
        assert retry(conn, now=LATER, ids=everything) == 2  # held and sending untouched
    assert [row(db, r)["next_attempt_at"] for r in everything] == [
        LATER,
        LATER,
        T0 + timedelta(hours=5),
        T0 + timedelta(hours=5),
    ]
    assert row(db, deferred)["status"] == "deferred"

    with db.begin() as conn:
        assert hold(conn, now=LATER, ids=everything) == 2
    assert [row(db, r)["status"] for r in everything] == ["held", "held", "held", "sending"]
    assert lease(db, now=LATER) == []

    with db.begin() as conn:
        assert release(conn, now=LATER + MINUTE, ids=everything) == 3
    for rid in (queued, deferred, held):
        assert row(db, rid)["status"] == "queued"
    # Released rows are due when they were due before the hold: the row held
    # before its launch time still waits for it (release once made it due now).
    assert [row(db, r)["next_attempt_at"] for r in (queued, deferred, held)] == [
        LATER,
        LATER,
        T0 + timedelta(hours=5),
    ]
    assert sorted(ids_of(lease(db, now=LATER + MINUTE))) == [queued, deferred]
    assert ids_of(lease(db, now=T0 + timedelta(hours=5))) == [held]

    assert [t for t, _ in queue_events(db, queued)] == ["retried", "held", "released"]
    assert [t for t, _ in queue_events(db, held)] == ["released"]
    assert queue_events(db, sending) == []
    assert queue_events(db, deferred)[0] == ("retried", {"by": "operator"})


def test_cancel_by_account_domain_ids_or_all(db: Database, account: Account) -> None:
    with db.begin() as conn:
        other = create_account(conn, "other")
    a_x, a_y, a_held, a_done = enqueue(
        db, account.id, "Q1", "a@x.org", "b@y.org", "c@y.org", "d@y.org"
    )
    b_x, b_y = enqueue(db, other.id, "Q2", "e@x.org", "f@y.org")
    set_status(db, "held", a_held)
    set_status(db, "delivered", a_done)

    with db.begin() as conn:
        assert cancel(conn, now=LATER, account_id=account.id, domain="Y.org") == 2
    assert [row(db, r)["status"] for r in (a_y, a_held, a_done)] == [
        "cancelled",
        "cancelled",
        "delivered",
    ]
    with db.begin() as conn:
        assert cancel(conn, now=LATER, domain="x.org") == 2
    assert row(db, a_x)["status"] == row(db, b_x)["status"] == "cancelled"
    with db.begin() as conn:
        assert cancel(conn, now=LATER, ids=[b_y, b_y, 999_999]) == 1
    with db.begin() as conn:
        assert cancel(conn, now=LATER, all_=True) == 0  # nothing cancellable is left
    assert [t for t, _ in queue_events(db, a_held)] == ["cancelled"]
    assert queue_events(db, a_done) == []

    (late,) = enqueue(db, other.id, "Q3", "g@z.org")
    with db.begin() as conn:
        assert hold(conn, now=LATER, all_=True) == 1
    assert row(db, late)["status"] == "held"


def test_renew_leases_extends_only_the_owners_rows_in_flight(
    db: Database, account: Account
) -> None:
    mine = leased_row(db, account, "w1")
    theirs = leased_row(db, account, "w2")
    (waiting,) = enqueue(db, account.id, "QW", "carl@example.org", next_attempt_at=T0 + MINUTE)
    later = T0 + 2 * MINUTE
    with db.begin() as conn:
        renewed = renew_leases(
            conn, [mine, theirs, waiting, 999_999], owner="w1", now=later, lease_for=LEASE
        )
    assert renewed == 1
    assert row(db, mine)["lease_expires_at"] == later + LEASE
    assert row(db, theirs)["lease_expires_at"] == T0 + LEASE
    assert row(db, waiting)["lease_expires_at"] is None
    with db.begin() as conn, pytest.raises(InvalidInput, match="lease_for must be positive"):
        renew_leases(conn, [mine], owner="w1", now=later, lease_for=timedelta(0))
