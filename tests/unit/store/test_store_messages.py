"""Reading messages back in bulk, as the delivery worker does for a leased batch."""

from __future__ import annotations

import pytest
from test_store_intake import new_message, write

from postlane.errors import NotFound
from postlane.store import Account, Database
from postlane.store import messages as message_store


def test_get_messages_returns_those_that_exist(db: Database, account: Account) -> None:
    write(db, new_message(account.id, "Q1"), new_message(account.id, "Q2"))
    with db.connect() as conn:
        found = message_store.get_messages(conn, ["Q1", "Q2", "Q1", "MISSING"])
        single = message_store.get_message(conn, "Q2")
    assert sorted(found) == ["Q1", "Q2"]
    assert found["Q2"] == single
    assert found["Q1"].raw == b"From: news@acme.com\r\n\r\nbody \xff\x00 bytes\r\n"


def test_get_messages_reads_more_ids_than_one_query_takes(db: Database, account: Account) -> None:
    write(db, *(new_message(account.id, f"M{n:04d}") for n in range(1201)))
    ids = [f"M{n:04d}" for n in range(1201)]
    with db.connect() as conn:
        found = message_store.get_messages(conn, ids)
        counts = message_store.recipient_counts(conn, ids)
    assert len(found) == 1201 and len(counts) == 1201


def test_recipient_counts(db: Database, account: Account) -> None:
    write(
        db,
        new_message(account.id, "ONE"),
        new_message(account.id, "THREE", addresses=("a@x.org", "b@x.org", "a@x.org")),
    )
    with db.connect() as conn:
        assert message_store.recipient_counts(conn, ["ONE", "THREE", "NONE"]) == {
            "ONE": 1,
            "THREE": 3,
        }
        assert message_store.recipient_counts(conn, []) == {}


def test_get_message_names_what_is_missing(db: Database) -> None:
    with db.connect() as conn, pytest.raises(NotFound, match="message 'NOPE' not found"):
        message_store.get_message(conn, "NOPE")


def test_options_come_as_their_stored_text_and_parse_back(db: Database, account: Account) -> None:
    options = {"tags": ["spring", "ünï"], "track_opens": True, "variables": {"a": [1, 2]}}
    write(
        db,
        new_message(account.id, "O1", options=options),
        new_message(account.id, "O2", options=options),
        new_message(account.id, "O3", options={}),
    )
    with db.connect() as conn:
        found = message_store.get_messages(conn, ["O1", "O2", "O3"])
        single = message_store.get_message(conn, "O1")
    assert isinstance(found["O1"].options_json, str)
    assert found["O1"].options_json == found["O2"].options_json == single.options_json
    assert found["O1"].options == options and single.options == options
    assert found["O3"].options == {}
    assert found["O1"].options is not found["O1"].options  # a new dict each time: never shared
