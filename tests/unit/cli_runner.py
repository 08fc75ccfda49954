"""Running the postlane command in-process, and storing what it should show, for the CLI tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from postlane.store import Database
from postlane.store import accounts as account_store
from postlane.store.intake import NewMessage, NewRecipient, insert_messages
from postlane.store.schema import recipients

Run = Callable[..., tuple[int, str, str]]


def ok(result: tuple[int, str, str]) -> str:
    """The output of a command that must succeed."""
    code, out, err = result
    assert code == 0, err
    return out


def fails(result: tuple[int, str, str], message: str) -> None:
    """A command that must fail with exactly one line naming the problem, exit 1."""
    code, out, err = result
    assert code == 1, (code, out, err)
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err


def enqueue(
    database_url: str, account: str, queue_id: str, *addresses: str, **changes: Any
) -> list[int]:
    """Store one message from ``account`` for ``addresses``; the recipient ids.

    ``changes`` replace fields of the stored message (a subject, say).
    """
    now = datetime.now(UTC)
    db = Database.from_url(database_url)
    try:
        with db.begin() as conn:
            account_id = account_store.get_account(conn, account).id
            message = NewMessage(
                id=queue_id,
                account_id=account_id,
                smtp_user_id=None,
                mail_from="info@acme.com",
                header_from="info@acme.com",
                message_id_header=None,
                subject=f"Subject of {queue_id}",
                raw=b"From: info@acme.com\r\n\r\nhi\r\n",
                options={},
                client_ip=None,
                tls=None,
                received_at=now,
                dedupe_key=None,
                recipients=tuple(
                    NewRecipient(
                        a, a.rpartition("@")[2], 3, now + timedelta(hours=1), now + timedelta(1)
                    )
                    for a in addresses
                ),
            )
            insert_messages(conn, [replace(message, **changes)])
            query = sa.select(recipients.c.id).where(recipients.c.message_id == queue_id)
            return sorted(conn.execute(query).scalars())
    finally:
        db.dispose()
