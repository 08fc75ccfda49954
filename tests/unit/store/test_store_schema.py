"""Schema: UTCDateTime round trips and CHECK constraints in the database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from postlane.store import Account, Database
from postlane.store.schema import accounts, api_keys, messages, recipients

ROME_SUMMER = timezone(timedelta(hours=2))


def _add_key(db: Database, account_id: int, prefix: str, last_used_at: datetime | None) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.insert(api_keys).values(
                account_id=account_id,
                name=prefix,
                prefix=prefix,
                key_hash="x",
                last_used_at=last_used_at,
            )
        )


def test_utc_datetime_round_trips_aware_values(db: Database, account: Account) -> None:
    moment = datetime(2024, 7, 1, 14, 30, 15, 123456, tzinfo=ROME_SUMMER)
    _add_key(db, account.id, "k1", moment)
    with db.connect() as conn:
        stored = conn.execute(sa.select(api_keys.c.last_used_at)).scalar_one()
    assert stored == moment
    assert stored.tzinfo is UTC
    assert stored.hour == 12


def test_utc_datetime_orders_by_instant_not_by_local_time(db: Database, account: Account) -> None:
    # 10:00+02:00 is earlier than 09:00+00:00, though "10" sorts after "09".
    _add_key(db, account.id, "later", datetime(2024, 7, 1, 9, 0, tzinfo=UTC))
    _add_key(db, account.id, "earlier", datetime(2024, 7, 1, 10, 0, tzinfo=ROME_SUMMER))
    with db.connect() as conn:
        order = conn.execute(
            sa.select(api_keys.c.prefix).order_by(api_keys.c.last_used_at)
        ).scalars()
        assert list(order) == ["earlier", "later"]
        cutoff = datetime(2024, 7, 1, 8, 30, tzinfo=UTC)
        due = conn.execute(
            sa.select(api_keys.c.prefix).where(api_keys.c.last_used_at <= cutoff)
        ).scalars()
        assert list(due) == ["earlier"]


def test_utc_datetime_refuses_naive_values(db: Database, account: Account) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        _add_key(db, account.id, "naive", datetime(2024, 7, 1, 9, 0))


def test_server_default_timestamps_read_back_as_utc(db: Database) -> None:
    with db.begin() as conn:
        conn.execute(sa.insert(accounts).values(name="raw"))
        created = conn.execute(sa.select(accounts.c.created_at)).scalar_one()
    assert created.tzinfo is UTC
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)


@pytest.mark.parametrize(
    ("column", "value"),
    [("attachment_policy", "rar"), ("unauthorised_sender_policy", "ignore")],
)
def test_account_check_constraints_hold_in_the_database(
    db: Database, column: str, value: str
) -> None:
    with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:
        conn.execute(sa.insert(accounts).values(name="bad", **{column: value}))


@pytest.mark.parametrize(("status", "priority"), [("lost", 3), ("queued", 0), ("queued", 6)])
def test_recipient_check_constraints_hold_in_the_database(
    db: Database, account: Account, status: str, priority: int
) -> None:
    now = datetime.now(UTC)
    with db.begin() as conn:
        conn.execute(
            sa.insert(messages).values(
                id="q1",
                account_id=account.id,
                mail_from="a@example.com",
                header_from="a@example.com",
                size=3,
                raw=b"x\r\n",
                received_at=now,
            )
        )
    with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:
        conn.execute(
            sa.insert(recipients).values(
                message_id="q1",
                account_id=account.id,
                address="b@example.org",
                domain="example.org",
                status=status,
                priority=priority,
                next_attempt_at=now,
                expires_at=now + timedelta(days=5),
            )
        )


def test_deleting_a_message_deletes_its_recipients(db: Database, account: Account) -> None:
    now = datetime.now(UTC)
    with db.begin() as conn:
        conn.execute(
            sa.insert(messages).values(
                id="q2",
                account_id=account.id,
                mail_from="a@example.com",
                header_from="a@example.com",
                size=3,
                raw=b"x\r\n",
                options={"tags": ["t"]},
                received_at=now,
            )
        )
        conn.execute(
            sa.insert(recipients).values(
                message_id="q2",
                account_id=account.id,
                address="b@example.org",
                domain="example.org",
                next_attempt_at=now,
                expires_at=now + timedelta(days=5),
            )
        )
        row = conn.execute(sa.select(recipients.c.status, recipients.c.priority)).one()
        assert tuple(row) == ("queued", 3)
        conn.execute(sa.delete(messages).where(messages.c.id == "q2"))
        assert conn.execute(sa.select(sa.func.count()).select_from(recipients)).scalar() == 0
