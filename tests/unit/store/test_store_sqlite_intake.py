"""Intake's inserts on SQLite's cursor store exactly what SQLAlchemy's path stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from test_store_intake import new_message, rows, write

from postlane.store import Account, Database
from postlane.store._sqlite_intake import when
from postlane.store.intake import _insert_core
from postlane.store.schema import UTCDateTime, events, messages, recipients

INSTANTS = [
    datetime(2024, 5, 1, 8, 0, 0, 123456, tzinfo=UTC),
    datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC),  # no microseconds: still six digits
    datetime(2024, 5, 1, 10, 30, 5, 7, tzinfo=timezone(timedelta(hours=2, minutes=30))),
    datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC),  # a four-digit year, zero-padded
]


@pytest.fixture
def sqlite_db(db: Database) -> Database:
    """The fresh database of the shared fixture, when it is SQLite (this path is SQLite's)."""
    if db.dialect_name != "sqlite":
        pytest.skip("the cursor path is SQLite's; PostgreSQL uses SQLAlchemy's")
    return db


@pytest.mark.parametrize("instant", INSTANTS, ids=str)
def test_when_stores_what_utcdatetime_stores(instant: datetime) -> None:
    dialect = sa.create_engine("sqlite://").dialect
    processor = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert processor is not None  # UTCDateTime's conversion, then SQLite's DATETIME format
    assert when(instant) == processor(instant)


def test_when_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        when(datetime(2024, 5, 1, 8, 0))


def _stored(db: Database, table: sa.Table, order: str) -> list[dict[str, Any]]:
    """Every column as SQLite holds it (strings, not Python values), ids left out."""
    with db.connect() as conn:
        result = conn.exec_driver_sql(f"SELECT * FROM {table.name} ORDER BY {order}")  # noqa: S608
        found = [dict(row._mapping) for row in result]
    for row in found:
        for key in ("id", "message_id", "recipient_id", "dedupe_key", "message_id_header"):
            row.pop(key, None)
    return found


def test_both_paths_store_identical_rows(sqlite_db: Database, account: Account) -> None:
    later = datetime(2024, 5, 1, 9, 0, 0, 5, tzinfo=timezone(timedelta(hours=-4)))
    batch = [
        new_message(account.id, "C1", addresses=("a@x.example", "b@y.example")),
        new_message(account.id, "C2", received_at=later, dedupe_key="k", options={}),
        new_message(account.id, "C3", addresses=(), event_type="inbound"),
    ]
    with sqlite_db.begin() as conn:
        _insert_core(conn, batch)
    core = {t.name: _stored(sqlite_db, t, "id") for t in (messages, recipients, events)}
    with sqlite_db.begin() as conn:
        for table in (events, recipients, messages):
            conn.execute(table.delete())
    write(sqlite_db, *(m.__class__(**{**_fields(m), "id": "F" + m.id[1:]}) for m in batch))
    fast = {t.name: _stored(sqlite_db, t, "id") for t in (messages, recipients, events)}
    assert fast == core
    assert len(fast["recipients"]) == 3 and len(fast["events"]) == 6


def _fields(message: Any) -> dict[str, Any]:
    return {name: getattr(message, name) for name in message.__dataclass_fields__}


def test_queued_events_name_their_rows_after_deleted_ids(
    sqlite_db: Database, account: Account
) -> None:
    """Consecutive ids end at max(id), whatever was deleted before."""
    write(sqlite_db, new_message(account.id, "Q1", addresses=("1@x", "2@x", "3@x")))
    with sqlite_db.begin() as conn:
        top = conn.scalar(sa.select(sa.func.max(recipients.c.id)))
        conn.execute(recipients.delete().where(recipients.c.id == top))
    write(
        sqlite_db,
        new_message(account.id, "Q2", addresses=("4@x", "5@x")),
        new_message(account.id, "Q3", addresses=("6@x",)),
    )
    by_id = {r["id"]: r for r in rows(sqlite_db, recipients, recipients.c.id)}
    queued = [
        e
        for e in rows(sqlite_db, events, events.c.id)
        if e["type"] == "queued" and e["message_id"] != "Q1"
    ]
    assert len(queued) == 3
    for event in queued:
        row = by_id[event["recipient_id"]]
        assert (row["message_id"], row["address"]) == (
            event["message_id"],
            event["data"]["recipient"],
        )
