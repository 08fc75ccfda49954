"""Archived copies (X-JobOption 128): one per recipient, read back by message and address."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postlane.errors import InvalidInput
from postlane.store import Account, Database
from postlane.store.archive import archive_copy, archived_copies_of

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def keep(db: Database, account: Account, recipient_id: int, address: str, data: bytes) -> bool:
    with db.begin() as conn:
        return archive_copy(
            conn,
            account_id=account.id,
            message_id="Q1",
            recipient_id=recipient_id,
            address=address,
            data=data,
            now=T0 + timedelta(seconds=recipient_id),
        )


def test_one_copy_per_recipient_the_first_stays(db: Database, account: Account) -> None:
    assert keep(db, account, 2, "Bob@Example.org", b"copy for bob")
    assert keep(db, account, 1, "ann@example.org", b"copy for ann")
    assert not keep(db, account, 2, "Bob@Example.org", b"second attempt")
    with db.connect() as conn:
        copies = archived_copies_of(conn, "Q1")
        bobs = archived_copies_of(conn, "Q1", address="bob@example.ORG")
        none = archived_copies_of(conn, "OTHER")
    assert [(c.recipient_id, c.data) for c in copies] == [
        (1, b"copy for ann"),
        (2, b"copy for bob"),
    ]
    assert [(c.address, c.created_at) for c in bobs] == [
        ("Bob@Example.org", T0 + timedelta(seconds=2))
    ]
    assert none == []


def test_an_empty_copy_is_refused(db: Database, account: Account) -> None:
    with pytest.raises(InvalidInput, match="non-empty bytes"):
        keep(db, account, 1, "ann@example.org", b"")
