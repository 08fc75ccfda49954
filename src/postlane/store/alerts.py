"""Alerts: things an account's people should look at, such as a blocked sender."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.store import _values
from postlane.store._constraints import explained
from postlane.store.schema import alerts, utc_now


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    account_id: int
    smtp_user_id: int | None
    kind: str
    message: str
    message_id: str | None
    created_at: datetime
    acknowledged_at: datetime | None


def add_alert(
    conn: Connection,
    account_id: int,
    kind: str,
    message: str,
    *,
    smtp_user_id: int | None = None,
    message_id: str | None = None,
) -> int:
    """Record an alert and return its id; :class:`NotFound` if the account or user is gone."""
    values = {
        "account_id": _values.integer("account_id", account_id),
        "kind": _values.name("kind", kind),
        "message": _values.text("message", message),
        "smtp_user_id": None
        if smtp_user_id is None
        else _values.integer("smtp_user_id", smtp_user_id),
        "message_id": _values.optional_name("message_id", message_id),
        "created_at": utc_now(),
    }
    statement = sa.insert(alerts).values(**values).returning(alerts.c.id)
    missing = f"account {account_id} not found"
    if smtp_user_id is not None:
        missing = f"account {account_id} or SMTP user {smtp_user_id} not found"
    with explained(conn, missing_parent=missing):
        alert_id: int = conn.execute(statement).scalar_one()
    return alert_id


def list_alerts(conn: Connection, account_id: int) -> list[Alert]:
    """The account's alerts, newest first."""
    statement = (
        sa.select(alerts)
        .where(alerts.c.account_id == account_id)
        .order_by(alerts.c.created_at.desc(), alerts.c.id.desc())
    )
    return [_alert(row) for row in conn.execute(statement)]


def _alert(row: sa.Row[Any]) -> Alert:
    return Alert(**row._mapping)
