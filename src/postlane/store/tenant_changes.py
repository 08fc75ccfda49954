"""A cheap test for "did any tenant change?", so readers can cache tenants in memory.

The SMTP server answers AUTH and checks senders from an in-memory copy of the
tenant tables; other processes (the CLI, another node) change those tables.
Comparing this fingerprint every second costs three index lookups and tells
when to reload, so a password reset or a disabled user takes effect within
the refresh interval on every node, with no messaging between processes.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.store.schema import accounts, sending_domains, smtp_users, utc_now

# A transaction-scoped advisory lock, released at commit or rollback; the key
# is arbitrary but fixed ("tenants" in ASCII).
_TAKE_TURNS = sa.text("SELECT pg_advisory_xact_lock(32762622053872755)")


def tenants_fingerprint(conn: Connection) -> tuple[Any, ...]:
    """Counts and latest change times of accounts, SMTP users and sending domains."""
    parts = []
    for table in (accounts, smtp_users, sending_domains):
        parts.append(sa.select(sa.func.count(), sa.func.max(table.c.updated_at)).select_from(table))
    row: list[Any] = []
    for query in parts:
        count, latest = conn.execute(query).one()
        row += [count, latest]
    return tuple(row)


def change_stamp(conn: Connection, table: sa.Table) -> datetime:
    """The ``updated_at`` for a change: now, or just after the table's latest change.

    The fingerprint only sees an update if it moves the table's latest
    ``updated_at``; a writer whose clock is behind (another node, the CLI on
    another machine) would otherwise change a password unseen.
    """
    if conn.dialect.name == "postgresql":
        # Tenant changes take turns until they commit, so they commit in the
        # order of their stamps. Otherwise a change stamped first but committed
        # last (a user disabled while another was edited) would not move the
        # latest ``updated_at`` a reader had already seen, and running servers
        # would never reload it. SQLite's writers take turns already.
        conn.execute(_TAKE_TURNS)
    latest = conn.execute(sa.select(sa.func.max(table.c.updated_at))).scalar()
    now = utc_now()
    if latest is not None and latest >= now:
        return latest + timedelta(microseconds=1)  # type: ignore[no-any-return]
    return now
