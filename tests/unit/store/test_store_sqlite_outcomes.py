"""Delivered recipients written on SQLite's cursor are exactly what SQLAlchemy's path writes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from test_store_queue import MINUTE, T0, enqueue, lease

from postlane.store import Account, Database, _sqlite_outcomes
from postlane.store.queue import _mark_delivered_core


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
        written = _sqlite_outcomes.mark_delivered(conn, deliveries(ours), owner="w1", now=now)
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
        assert _sqlite_outcomes.mark_delivered(conn, {rid: (None, {})}, owner="w9", now=T0) == set()
        assert _sqlite_outcomes.mark_delivered(conn, {}, owner="w1", now=T0) == set()
    stored = _stored(sqlite_db, "Q1")
    assert [r["status"] for r in stored["recipients"]] == ["sending"]
    assert [e["type"] for e in stored["events"]] == ["accepted", "queued"]


def test_more_ids_than_one_select_holds(sqlite_db: Database, account: Account) -> None:
    count = _sqlite_outcomes._CHUNK + 3
    ids = enqueue(sqlite_db, account.id, "BIG", *(f"r{n}@example.org" for n in range(count)))
    lease(sqlite_db, "w1", limit=count)
    with sqlite_db.begin() as conn:
        deliveries = {rid: ("250 ok", {}) for rid in ids}
        assert _sqlite_outcomes.mark_delivered(conn, deliveries, owner="w1", now=T0) == set(ids)


def test_the_instant_must_be_aware(sqlite_db: Database, account: Account) -> None:
    (rid,) = enqueue(sqlite_db, account.id, "Q2", "a@example.org")
    lease(sqlite_db, "w1")
    with sqlite_db.begin() as conn, pytest.raises(ValueError, match="naive datetime"):
        _sqlite_outcomes.mark_delivered(
            conn, {rid: (None, {})}, owner="w1", now=datetime(2024, 5, 1, 8, 0)
        )
