"""Leases and deliveries on SQLite's cursor are exactly what SQLAlchemy's path makes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from test_store_intake import new_message, write
from test_store_queue import MINUTE, T0, enqueue, lease

from postlane.store import Account, Database, _sqlite_delivery
from postlane.store import messages as message_store
from postlane.store.messages import _get_messages_core
from postlane.store.queue import _lease_core, _mark_delivered_core, lease_due


@pytest.fixture
def sqlite_db(db: Database) -> Database:
    """The fresh database of the shared fixture, when it is SQLite (this path is SQLite's)."""
    if db.dialect_name != "sqlite":
        pytest.skip("the cursor path is SQLite's; PostgreSQL uses SQLAlchemy's")
    return db


def _stored(db: Database, message_id: str) -> dict[str, list[dict[str, Any]]]:
    """One message's recipients and events as SQLite holds them, ids and message id left out."""
    with db.connect() as conn:
        found = {}
        for table, order in (("recipients", "id"), ("events", "id")):
            result = conn.exec_driver_sql(
                f"SELECT * FROM {table} WHERE message_id = ? ORDER BY {order}",  # noqa: S608
                (message_id,),
            )
            found[table] = [dict(row._mapping) for row in result]
    for rows in found.values():
        for row in rows:
            for key in ("id", "message_id", "recipient_id"):
                row.pop(key, None)
    return found


@pytest.mark.parametrize(
    "now",
    [T0 + MINUTE, datetime(2024, 5, 1, 10, 0, 0, 7, tzinfo=timezone(timedelta(hours=2)))],
    ids=str,
)
def test_both_paths_write_identical_rows(
    sqlite_db: Database, account: Account, now: datetime
) -> None:
    addresses = ("a@example.org", "b@example.org", "c@example.org", "d@example.org")
    ours = enqueue(sqlite_db, account.id, "OURS", *addresses)
    theirs = enqueue(sqlite_db, account.id, "THEIRS", *addresses)
    lease(sqlite_db, "w1")
    with sqlite_db.begin() as conn:  # the last of each set is no longer w1's
        conn.exec_driver_sql(
            "UPDATE recipients SET lease_owner = 'w2' WHERE id IN (?, ?)", (ours[3], theirs[3])
        )

    def deliveries(ids: list[int]) -> dict[int, tuple[str | None, dict[str, Any]]]:
        return {
            ids[0]: ("250 2.0.0 ok", {"mx": "mx1", "tls": None, "reply": "250 2.0.0 ok"}),
            ids[1]: (None, {"mx": "mx1", "port": 25, "é": ["ü", 1.5]}),
            ids[2]: ("250 ok", {"reply": "own"}),
            ids[3]: ("250 late", {"mx": "mx1"}),
        }

    with sqlite_db.begin() as conn:
        written = _sqlite_delivery.mark_delivered(conn, deliveries(ours), owner="w1", now=now)
        assert written == set(ours[:3])
        assert _mark_delivered_core(conn, deliveries(theirs), owner="w1", now=now) == set(
            theirs[:3]
        )
    assert _stored(sqlite_db, "OURS") == _stored(sqlite_db, "THEIRS")
    assert [r["status"] for r in _stored(sqlite_db, "OURS")["recipients"]] == [
        "delivered",
        "delivered",
        "delivered",
        "sending",
    ]


def test_nothing_held_writes_nothing(sqlite_db: Database, account: Account) -> None:
    (rid,) = enqueue(sqlite_db, account.id, "Q1", "a@example.org")
    lease(sqlite_db, "w1")
    with sqlite_db.begin() as conn:
        assert _sqlite_delivery.mark_delivered(conn, {rid: (None, {})}, owner="w9", now=T0) == set()
        assert _sqlite_delivery.mark_delivered(conn, {}, owner="w1", now=T0) == set()
    stored = _stored(sqlite_db, "Q1")
    assert [r["status"] for r in stored["recipients"]] == ["sending"]
    assert [e["type"] for e in stored["events"]] == ["accepted", "queued"]


def test_more_ids_than_one_select_holds(sqlite_db: Database, account: Account) -> None:
    count = _sqlite_delivery._CHUNK + 3
    ids = enqueue(sqlite_db, account.id, "BIG", *(f"r{n}@example.org" for n in range(count)))
    lease(sqlite_db, "w1", limit=count)
    with sqlite_db.begin() as conn:
        deliveries = {rid: ("250 ok", {}) for rid in ids}
        assert _sqlite_delivery.mark_delivered(conn, deliveries, owner="w1", now=T0) == set(ids)


def test_the_instant_must_be_aware(sqlite_db: Database, account: Account) -> None:
    (rid,) = enqueue(sqlite_db, account.id, "Q2", "a@example.org")
    lease(sqlite_db, "w1")
    with sqlite_db.begin() as conn, pytest.raises(ValueError, match="naive datetime"):
        _sqlite_delivery.mark_delivered(
            conn, {rid: (None, {})}, owner="w1", now=datetime(2024, 5, 1, 8, 0)
        )


def _recipient_rows(db: Database) -> list[dict[str, Any]]:
    with db.connect() as conn:
        result = conn.exec_driver_sql("SELECT * FROM recipients ORDER BY id")
        return [dict(row._mapping) for row in result]


def _restore(db: Database, rows: list[dict[str, Any]]) -> None:
    with db.begin() as conn:
        for row in rows:
            conn.exec_driver_sql(
                "UPDATE recipients SET status = ?, lease_owner = ?, lease_expires_at = ?, "
                "updated_at = ? WHERE id = ?",
                (
                    row["status"],
                    row["lease_owner"],
                    row["lease_expires_at"],
                    row["updated_at"],
                    row["id"],
                ),
            )


@pytest.mark.parametrize("limit", [1, 4, 7, 100])
def test_both_paths_lease_the_same_rows_the_same_way(
    sqlite_db: Database, account: Account, limit: int
) -> None:
    soon, later = T0 + MINUTE, T0 + 60 * MINUTE
    enqueue(sqlite_db, account.id, "P3", "a@b.example", "b@a.example", priority=3)
    enqueue(sqlite_db, account.id, "P1", "c@a.example", priority=1, next_attempt_at=soon)
    enqueue(sqlite_db, account.id, "LATER", "d@a.example", priority=1, next_attempt_at=later)
    deferred = enqueue(sqlite_db, account.id, "DEF", "e@c.example", "f@c.example", priority=2)
    with sqlite_db.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE recipients SET status = 'deferred' WHERE id IN (?, ?)", tuple(deferred)
        )
    before = _recipient_rows(sqlite_db)
    now = T0 + 2 * MINUTE
    with sqlite_db.begin() as conn:
        theirs = _lease_core(conn, owner="w1", now=now, limit=limit, lease_for=5 * MINUTE)
    after_theirs = _recipient_rows(sqlite_db)
    _restore(sqlite_db, before)
    assert _recipient_rows(sqlite_db) == before
    with sqlite_db.begin() as conn:
        ours = lease_due(
            conn, owner="w1", now=now, limit=limit, lease_for=5 * MINUTE, dialect="sqlite"
        )
    assert _recipient_rows(sqlite_db) == after_theirs
    assert ours == sorted(theirs, key=lambda x: (x.domain, x.priority, x.next_attempt_at, x.id))
    assert len(ours) == min(limit, 5)  # LATER is not due
    assert all(x.next_attempt_at.tzinfo is UTC and x.expires_at.tzinfo is UTC for x in ours)


def test_messages_read_on_the_cursor_are_what_sqlalchemy_reads(
    sqlite_db: Database, account: Account
) -> None:
    whole = datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC)  # no microseconds
    write(
        sqlite_db,
        new_message(account.id, "M1", options={"tags": ["ä"], "variables": {"a": [1]}}),
        new_message(
            account.id,
            "M2",
            received_at=whole,
            options={},
            subject=None,
            client_ip=None,
            tls=None,
            raw=b"\x00\xff bytes\r\n",
        ),
        *(new_message(account.id, f"N{n:04d}") for n in range(600)),  # two chunks of ids
    )
    ids = ["M1", "M2", "MISSING", "M1", *(f"N{n:04d}" for n in range(600))]
    with sqlite_db.connect() as conn:
        fast = message_store.get_messages(conn, ids)
        core = _get_messages_core(conn, ids)
    assert fast == core
    assert len(fast) == 602
    assert fast["M2"].received_at == whole and fast["M2"].received_at.tzinfo is not None
    assert fast["M2"].raw == b"\x00\xff bytes\r\n" and fast["M2"].options == {}
    assert fast["M1"].options == {"tags": ["ä"], "variables": {"a": [1]}}
