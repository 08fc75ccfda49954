"""Suppression addresses in their canonical form: one row per mailbox, however spelled.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25

Until now an address was stored lower-cased only, so ``user@bücher.example``
and ``user@xn--bcher-kva.example``, or ``user@example.com.`` and
``user@example.com``, were different entries, and a lookup in one spelling
missed an entry made in the other. :mod:`postlane.store.suppressions` now
folds the domain too (trailing dots dropped, IDNA A-labels); this rewrites the
stored rows to that form, or lookups would miss every row whose old form
differs from its new one.

Where several rows fold to one address of an account, one row stays, chosen
as adding them one after the other would have: an always-applied reason beats
an optional one, and within a group the earliest entry (by ``created_at``,
then id) stays, its detail being the earlier evidence. The others are deleted.

The fold and the precedence rule are copied here, not imported: a migration
must keep producing the form of its own revision whatever later code does.
The address is folded in Python because neither database has Python's full
Unicode lower-casing or IDNA; rows are read in id order a batch at a time,
and only those that change are kept in memory.

Downgrade changes nothing: the new form is lower-cased as the old one was,
and merged rows cannot be split again.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Rows read per query.
_BATCH = 5000
#: Bound values per ``IN (...)``; SQLite allows 32,766.
_CHUNK = 500
#: The optional lists of revision 0004; any other reason applies always.
_OPTIONAL = frozenset({"unsubscribe", "blocklist", "returned"})

_suppressions = sa.table(
    "suppressions",
    sa.column("id", sa.BigInteger()),
    sa.column("account_id", sa.BigInteger()),
    sa.column("address", sa.Text()),
    sa.column("reason", sa.Text()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def fold(address: str) -> str:
    """The stored form of revision 0004 (see ``postlane.store.suppressions.fold``)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    name = domain.lower().rstrip(".")
    if not name.isascii():
        with contextlib.suppress(UnicodeError):  # kept lower-cased, as the store does
            name = name.encode("idna").decode("ascii").rstrip(".")
    return f"{local.lower()}@{name}"


def keeper(rows: Sequence[Any]) -> Any:
    """The row that stays of ``rows``, which fold to one address of one account."""
    ordered = sorted(rows, key=lambda row: (row.created_at, row.id))
    kept = ordered[0]
    for row in ordered[1:]:
        if row.reason not in _OPTIONAL and kept.reason in _OPTIONAL:
            kept = row
    return kept


def upgrade() -> None:
    conn = op.get_bind()
    t = _suppressions
    columns = (t.c.id, t.c.account_id, t.c.address, t.c.reason, t.c.created_at)
    groups: dict[tuple[int, str], list[Any]] = defaultdict(list)
    last: int | None = None
    while True:
        query = sa.select(*columns).order_by(t.c.id).limit(_BATCH)
        if last is not None:
            query = query.where(t.c.id > last)
        rows = conn.execute(query).all()
        if not rows:
            break
        for row in rows:
            folded = fold(row.address)
            if folded != row.address:
                groups[(row.account_id, folded)].append(row)
        last = rows[-1].id
    if not groups:
        return
    # Rows already stored in a form another row now folds to.
    moved = {row.id for rows in groups.values() for row in rows}
    wanted: dict[int, list[str]] = defaultdict(list)
    for account_id, address in groups:
        wanted[account_id].append(address)
    for account_id, addresses in wanted.items():
        for start in range(0, len(addresses), _CHUNK):
            query = sa.select(*columns).where(
                t.c.account_id == account_id,
                t.c.address.in_(addresses[start : start + _CHUNK]),
            )
            for row in conn.execute(query):
                if row.id not in moved:
                    groups[(account_id, row.address)].append(row)
    doomed: list[int] = []
    renamed: list[dict[str, Any]] = []
    for (_, address), rows in groups.items():
        kept = keeper(rows)
        doomed.extend(row.id for row in rows if row.id != kept.id)
        if kept.address != address:
            renamed.append({"row_id": kept.id, "new_address": address})
    # Deletions first: a renamed row takes an address a deleted row may hold.
    for start in range(0, len(doomed), _CHUNK):
        conn.execute(sa.delete(t).where(t.c.id.in_(doomed[start : start + _CHUNK])))
    if renamed:
        conn.execute(
            sa.update(t)
            .where(t.c.id == sa.bindparam("row_id"))
            .values(address=sa.bindparam("new_address")),
            renamed,
        )


def downgrade() -> None:
    pass
