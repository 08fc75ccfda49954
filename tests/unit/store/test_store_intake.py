"""Writing accepted messages: messages, recipients, events, alerts and duplicates."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from postlane.errors import StoreError
from postlane.store import Account, Database, SmtpUser, create_smtp_user, list_alerts
from postlane.store.intake import (
    NewMessage,
    NewRecipient,
    find_duplicates,
    insert_messages,
    record_duplicates,
)
from postlane.store.schema import events, messages, recipients

T0 = datetime(2024, 5, 1, 8, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def user(db: Database, account: Account) -> SmtpUser:
    with db.begin() as conn:
        return create_smtp_user(conn, account.id, "mailer", "$argon2id$x")


def new_message(
    account_id: int,
    queue_id: str,
    *,
    received_at: datetime = T0,
    dedupe_key: str | None = None,
    addresses: tuple[str, ...] = ("bob@example.org",),
    **changes: Any,
) -> NewMessage:
    message = NewMessage(
        id=queue_id,
        account_id=account_id,
        smtp_user_id=None,
        mail_from="news@acme.com",
        header_from="news@acme.com",
        message_id_header=f"<{queue_id}@acme.com>",
        subject="Spring news",
        raw=b"From: news@acme.com\r\n\r\nbody \xff\x00 bytes\r\n",
        options={"tags": ["spring"], "track_opens": True},
        client_ip="192.0.2.10",
        tls="TLSv1.3",
        received_at=received_at,
        dedupe_key=dedupe_key,
        recipients=tuple(
            NewRecipient(
                address=address,
                domain=address.rpartition("@")[2],
                priority=2,
                next_attempt_at=received_at + timedelta(minutes=5),
                expires_at=received_at + timedelta(days=3),
            )
            for address in addresses
        ),
        event_data={"session": "s-1", "size": 40},
    )
    return replace(message, **changes)


def rows(db: Database, table: sa.Table, *order: sa.ColumnElement[Any]) -> list[dict[str, Any]]:
    with db.connect() as conn:
        result = conn.execute(sa.select(table).order_by(*order))
        return [dict(row._mapping) for row in result]


def write(db: Database, *batch: NewMessage) -> None:
    with db.begin() as conn:
        insert_messages(conn, list(batch))


# -- insert_messages -----------------------------------------------------------------------


def test_insert_messages_writes_the_message(db: Database, account: Account, user: SmtpUser) -> None:
    message = new_message(account.id, "Q1", smtp_user_id=user.id, dedupe_key="k1")
    write(db, message)
    (row,) = rows(db, messages, messages.c.id)
    assert row == {
        "id": "Q1",
        "account_id": account.id,
        "smtp_user_id": user.id,
        "mail_from": "news@acme.com",
        "header_from": "news@acme.com",
        "message_id_header": "<Q1@acme.com>",
        "subject": "Spring news",
        "size": len(message.raw),
        "raw": message.raw,
        "options": {"tags": ["spring"], "track_opens": True},
        "client_ip": "192.0.2.10",
        "tls": "TLSv1.3",
        "received_at": T0,
        "dedupe_key": "k1",
        "duplicate_of": None,
    }


def test_insert_messages_writes_one_queued_row_per_recipient(
    db: Database, account: Account
) -> None:
    write(db, new_message(account.id, "Q1", addresses=("a@example.org", "b@mail.example.net")))
    found = rows(db, recipients, recipients.c.id)
    assert [(r["address"], r["domain"]) for r in found] == [
        ("a@example.org", "example.org"),
        ("b@mail.example.net", "mail.example.net"),
    ]
    for row in found:
        assert row["message_id"] == "Q1"
        assert row["account_id"] == account.id
        assert row["status"] == "queued"
        assert row["priority"] == 2
        assert row["next_attempt_at"] == T0 + timedelta(minutes=5)
        assert row["expires_at"] == T0 + timedelta(days=3)
        assert row["created_at"] == T0
        assert row["updated_at"] == T0
        assert row["attempts"] == 0
        assert row["lease_owner"] is None


def test_insert_messages_writes_one_event_per_message(db: Database, account: Account) -> None:
    write(
        db,
        new_message(account.id, "Q1"),
        new_message(account.id, "Q2", addresses=("a@x.example", "b@x.example")),
    )
    found = [e for e in rows(db, events, events.c.id) if e["type"] != "queued"]
    assert [(e["message_id"], e["type"]) for e in found] == [("Q1", "accepted"), ("Q2", "accepted")]
    assert all(e["account_id"] == account.id for e in found)
    assert all(e["recipient_id"] is None for e in found)
    assert found[0]["created_at"] == T0
    assert found[0]["data"] == {"session": "s-1", "size": 40}
    assert len(rows(db, recipients, recipients.c.id)) == 3


def test_insert_messages_writes_a_queued_event_per_recipient(
    db: Database, account: Account
) -> None:
    write(
        db,
        new_message(account.id, "Q1"),
        new_message(account.id, "Q2", addresses=("a@x.example", "b@x.example")),
    )
    queued = [e for e in rows(db, events, events.c.id) if e["type"] == "queued"]
    stored = rows(db, recipients, recipients.c.id)
    assert [(e["message_id"], e["recipient_id"]) for e in queued] == [
        (r["message_id"], r["id"]) for r in stored
    ]
    assert [e["data"]["recipient"] for e in queued] == [
        "bob@example.org",
        "a@x.example",
        "b@x.example",
    ]
    first = queued[0]
    assert first["account_id"] == account.id and first["created_at"] == T0
    assert first["data"] == {
        "recipient": "bob@example.org",
        "priority": 2,
        "scheduled_for": (T0 + timedelta(minutes=5)).isoformat(),  # later than received
    }


def test_queued_events_of_repeated_addresses_name_each_row(db: Database, account: Account) -> None:
    write(db, new_message(account.id, "Q1", addresses=("a@x.example", "a@x.example")))
    queued = [e for e in rows(db, events, events.c.id) if e["type"] == "queued"]
    stored = rows(db, recipients, recipients.c.id)
    assert sorted(e["recipient_id"] for e in queued) == [r["id"] for r in stored]
    assert all("scheduled_for" in e["data"] for e in queued)


def test_insert_inbound_message_writes_no_recipients(db: Database, account: Account) -> None:
    write(db, new_message(account.id, "Q1", addresses=(), event_type="inbound"))
    assert [m["id"] for m in rows(db, messages, messages.c.id)] == ["Q1"]
    assert rows(db, recipients, recipients.c.id) == []
    assert [e["type"] for e in rows(db, events, events.c.id)] == ["inbound"]


def test_insert_messages_writes_alert_rows(db: Database, account: Account, user: SmtpUser) -> None:
    write(
        db,
        new_message(
            account.id,
            "Q1",
            smtp_user_id=user.id,
            alerts=("From <a@x.example> is not aligned", "envelope sender <b@x.example> is not"),
        ),
        new_message(account.id, "Q2"),
    )
    with db.connect() as conn:
        alerts = list_alerts(conn, account.id)
    assert sorted(a.message for a in alerts) == [
        "From <a@x.example> is not aligned",
        "envelope sender <b@x.example> is not",
    ]
    for alert in alerts:
        assert alert.kind == "unauthorised_sender"
        assert alert.message_id == "Q1"
        assert alert.smtp_user_id == user.id
        assert alert.account_id == account.id
        assert alert.created_at == T0
        assert alert.acknowledged_at is None


def test_insert_messages_without_alerts_writes_none(db: Database, account: Account) -> None:
    write(db, new_message(account.id, "Q1"))
    with db.connect() as conn:
        assert list_alerts(conn, account.id) == []


def test_insert_nothing_writes_nothing(db: Database, account: Account) -> None:
    write(db)
    assert rows(db, messages, messages.c.id) == []
    assert rows(db, events, events.c.id) == []


def test_a_failed_batch_leaves_nothing(db: Database, account: Account) -> None:
    good = new_message(account.id, "Q1")
    orphan = new_message(account.id + 1000, "Q2")  # no such account
    with pytest.raises(StoreError):
        write(db, good, orphan)
    assert rows(db, messages, messages.c.id) == []
    assert rows(db, recipients, recipients.c.id) == []
    assert rows(db, events, events.c.id) == []


def test_queue_ids_are_unique(db: Database, account: Account) -> None:
    write(db, new_message(account.id, "Q1"))
    with pytest.raises(StoreError):
        write(db, new_message(account.id, "Q1"))
    assert len(rows(db, recipients, recipients.c.id)) == 1


# -- find_duplicates -----------------------------------------------------------------------


def test_find_duplicates_maps_keys_to_the_original(db: Database, account: Account) -> None:
    write(
        db,
        new_message(account.id, "Q1", dedupe_key="k1"),
        new_message(account.id, "Q2", dedupe_key="k2"),
        new_message(account.id, "Q3"),
    )
    with db.connect() as conn:
        found = find_duplicates(conn, ["k1", "k2", "k3", "k1"], T0 - timedelta(hours=1))
    assert found == {"k1": "Q1", "k2": "Q2"}


def test_two_committers_cannot_both_miss_a_duplicate(
    db: Database, account: Account, database_url: str
) -> None:
    """Each checks, then inserts: on PostgreSQL both once found nothing and both queued.

    The first committer checks and holds its transaction open; the second,
    on another connection, checks while the first is still open. It must wait
    for the first's commit and find its message (SQLite: the writer lock).
    """
    other = Database.from_url(database_url)
    checked = threading.Event()
    second: list[dict[str, str]] = []

    def later_committer() -> None:
        checked.wait(5)
        with other.begin() as conn:
            second.append(find_duplicates(conn, ["k1"], T0 - timedelta(hours=1)))
            if not second[0]:
                insert_messages(conn, [new_message(account.id, "Q2", dedupe_key="k1")])

    thread = threading.Thread(target=later_committer)
    thread.start()
    try:
        with db.begin() as conn:
            assert find_duplicates(conn, ["k1"], T0 - timedelta(hours=1)) == {}
            checked.set()
            time.sleep(0.3)  # the other committer checks now, or waits to
            insert_messages(conn, [new_message(account.id, "Q1", dedupe_key="k1")])
        thread.join(10)
    finally:
        other.dispose()
    assert second == [{"k1": "Q1"}]
    assert [m["id"] for m in rows(db, messages, messages.c.id)] == ["Q1"]


def test_find_duplicates_without_keys_is_empty(db: Database, account: Account) -> None:
    write(db, new_message(account.id, "Q1", dedupe_key="k1"))
    with db.connect() as conn:
        assert find_duplicates(conn, [], T0 - timedelta(days=1)) == {}


def test_find_duplicates_honours_the_window(db: Database, account: Account) -> None:
    write(
        db,
        new_message(account.id, "Q1", dedupe_key="old", received_at=T0 - timedelta(hours=2)),
        new_message(account.id, "Q2", dedupe_key="new", received_at=T0 - timedelta(minutes=10)),
        new_message(account.id, "Q3", dedupe_key="edge", received_at=T0 - timedelta(hours=1)),
    )
    with db.connect() as conn:
        found = find_duplicates(conn, ["old", "new", "edge"], T0 - timedelta(hours=1))
    assert found == {"new": "Q2", "edge": "Q3"}


def test_find_duplicates_takes_the_first_original_in_the_window(
    db: Database, account: Account
) -> None:
    write(
        db,
        new_message(account.id, "Q1", dedupe_key="k", received_at=T0 - timedelta(days=2)),
        new_message(account.id, "Q2", dedupe_key="k", received_at=T0 - timedelta(minutes=5)),
        new_message(account.id, "Q3", dedupe_key="k", received_at=T0),
    )
    with db.connect() as conn:
        assert find_duplicates(conn, ["k"], T0 - timedelta(days=1)) == {"k": "Q2"}
        assert find_duplicates(conn, ["k"], T0 - timedelta(days=3)) == {"k": "Q1"}


def test_find_duplicates_ignores_copies_marked_duplicate_of(db: Database, account: Account) -> None:
    write(
        db,
        new_message(account.id, "Q1", dedupe_key="k"),
        new_message(account.id, "Q2", dedupe_key="only-copy"),
    )
    with db.begin() as conn:
        conn.execute(sa.update(messages).where(messages.c.id == "Q1").values(duplicate_of="Q0"))
        conn.execute(sa.update(messages).where(messages.c.id == "Q2").values(duplicate_of="Q0"))
    write(db, new_message(account.id, "Q3", dedupe_key="k"))
    with db.connect() as conn:
        found = find_duplicates(conn, ["k", "only-copy"], T0 - timedelta(hours=1))
    assert found == {"k": "Q3"}


# -- record_duplicates ---------------------------------------------------------------------


def test_record_duplicates_writes_an_event_on_the_original(db: Database, account: Account) -> None:
    write(db, new_message(account.id, "Q1", dedupe_key="k"))
    again = new_message(account.id, "Q9", dedupe_key="k", received_at=T0 + timedelta(minutes=1))
    with db.begin() as conn:
        record_duplicates(conn, [(again, "Q1")])
    found = [e for e in rows(db, events, events.c.id) if e["type"] != "queued"]
    assert [(e["message_id"], e["type"]) for e in found] == [
        ("Q1", "accepted"),
        ("Q1", "duplicate"),
    ]
    duplicate = found[1]
    assert duplicate["account_id"] == account.id
    assert duplicate["created_at"] == T0 + timedelta(minutes=1)
    assert duplicate["data"] == {"session": "s-1", "size": 40, "resubmitted_as": "Q9"}
    # The resubmission is not queued again.
    assert [m["id"] for m in rows(db, messages, messages.c.id)] == ["Q1"]
    assert len(rows(db, recipients, recipients.c.id)) == 1


def test_record_no_duplicates_writes_nothing(db: Database, account: Account) -> None:
    with db.begin() as conn:
        record_duplicates(conn, [])
    assert rows(db, events, events.c.id) == []
