"""The delivery queue: leasing due recipients, recording outcomes, operator actions.

A queue entry is a ``recipients`` row; its life is::

    queued, deferred ──lease_due──▶ sending ──▶ delivered | failed | bounced | expired
      │                               │         | suppressed | deferred (4xx: try later)
      │                               └──reclaim (lease ran out)──▶ deferred
      ├──expire_overdue──▶ expired
      ├──hold──▶ held ──release──▶ queued
      └──cancel (also from held)──▶ cancelled

Workers take rows with :func:`lease_due`: the row becomes ``sending`` with a
``lease_owner`` and a ``lease_expires_at``. The worker reports what happened
with one of the ``mark_*`` functions, each *fenced* on (id, owner, status
``sending``): if the lease expired and :func:`reclaim_expired_leases` handed
the row to someone else in the meantime, the late report changes nothing and
returns False. A worker that dies simply stops reporting; its rows come back
when the lease expires. ``owner`` must therefore be unique per worker process
(host, pid and a random part), or a restarted worker could finish a row its
previous incarnation leased.

Every change of state writes its event row in the same transaction, except
the lease itself (``queued``/``deferred`` → ``sending``), which is internal to
delivery and followed by an outcome event or a ``lease_expired`` event. Event
types: ``delivered``, ``deferred``, ``failed``, ``bounced``, ``expired``,
``suppressed``, ``lease_expired``, and for operator actions (data
``{"by": "operator"}``) ``retried``, ``held``, ``released``, ``cancelled``.

All functions take the caller's :class:`~sqlalchemy.engine.Connection` and the
current time (an aware UTC datetime): there is no clock in here, so callers
compose transactions and tests control time.

The due query
-------------
"Due" is ``status IN ('queued', 'deferred') AND next_attempt_at <= now``,
taken in order ``priority, next_attempt_at, id``. Written with ``IN``, no
database can read that order off ``ix_recipients_due (status, priority,
next_attempt_at)``: it would read and sort every due row (tens of
milliseconds per 100,000). Written as one ordered, limited scan per status,
each scan *is* an index range read in the right order, and the two short
lists are merged::

    WITH due_queued AS (
        SELECT id, priority, next_attempt_at FROM recipients
        WHERE status = 'queued' AND next_attempt_at <= :now
        ORDER BY priority, next_attempt_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED              -- PostgreSQL only
    ),
    due_deferred AS (... the same with status = 'deferred' ...),
    picked AS (
        SELECT id FROM (SELECT * FROM due_queued UNION ALL SELECT * FROM due_deferred) AS due
        ORDER BY priority, next_attempt_at, id
        LIMIT :limit
    )
    UPDATE recipients
    SET status = 'sending', lease_owner = :owner, lease_expires_at = :until, updated_at = :now
    FROM picked WHERE recipients.id = picked.id
    RETURNING recipients.id, recipients.message_id, ...

On PostgreSQL ``SKIP LOCKED`` makes concurrent workers pass over each
other's rows instead of waiting for them or taking them twice; the rows a
scan locked but the merge did not pick stay locked until the caller commits
(at most ``limit`` of them), so keep the leasing transaction short. On SQLite
the caller's ``BEGIN IMMEDIATE`` (:meth:`Database.begin`) already makes the
statement the only writer.

PostgreSQL's index ends at ``next_attempt_at``, so the ``id`` tie-break costs
a sort of each group of rows sharing (priority, next_attempt_at), and all
recipients of one message share both: leasing from a 100,000-recipient
campaign sorts the whole remainder each time (about 35 ms instead of 1 ms).
Ending ``ix_recipients_due`` with ``id`` removes that sort; SQLite's indexes
end with the rowid already.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput, NotFound
from postlane.store import _sqlite_delivery, _values
from postlane.store.schema import RECIPIENT_STATUSES, events, messages, recipients
from postlane.store.suppressions import NewSuppression, add_suppressions, is_address

#: Statuses a row is due from (when its ``next_attempt_at`` has come).
WAITING = ("queued", "deferred")
#: Statuses an operator may cancel from: anything not yet final or in flight.
CANCELLABLE = ("queued", "deferred", "held")
FAILURE_STATUSES = ("failed", "bounced")
#: Bound parameters per ``IN (...)`` list; SQLite allows 32,766 per statement.
_CHUNK = 500
_DIALECTS = ("sqlite", "postgresql")


@dataclass(frozen=True, slots=True)
class Leased:
    """A recipient row leased to a worker: everything needed to send to it."""

    id: int
    message_id: str
    account_id: int
    address: str
    domain: str
    priority: int
    attempts: int
    expires_at: datetime
    next_attempt_at: datetime


@dataclass(frozen=True, slots=True)
class QueueRow:
    """A recipient row as an operator sees it, with its message's sender and subject."""

    id: int
    message_id: str
    account_id: int
    address: str
    domain: str
    status: str
    priority: int
    attempts: int
    next_attempt_at: datetime
    expires_at: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_reply: str | None
    created_at: datetime
    updated_at: datetime
    mail_from: str
    subject: str | None


# -- leasing -----------------------------------------------------------------------------


def lease_due(
    conn: Connection,
    *,
    owner: str,
    now: datetime,
    limit: int,
    lease_for: timedelta,
    dialect: str,
) -> list[Leased]:
    """Lease up to ``limit`` due rows to ``owner`` until ``now + lease_for``.

    Rows are taken highest priority first (1 before 5), then oldest
    ``next_attempt_at``, then lowest id, and returned sorted by (domain,
    priority, next_attempt_at, id), so the worker can send per destination.
    ``dialect`` must name the database of ``conn``: it decides whether rows
    are locked with ``FOR UPDATE SKIP LOCKED`` (see the module docstring).
    """
    owner = _values.name("lease owner", owner)
    _aware("now", now)
    _count("limit", limit)
    if lease_for <= timedelta(0):
        raise InvalidInput(f"lease_for must be positive, got {lease_for}")
    if dialect not in _DIALECTS or dialect != conn.dialect.name:
        raise InvalidInput(f"dialect {dialect!r} given for a {conn.dialect.name} connection")
    if limit == 0:
        return []
    if dialect == "sqlite":  # the same statement, without SQLAlchemy's overhead
        rows = _sqlite_delivery.lease(
            conn, owner=owner, now=now, until=now + lease_for, limit=limit
        )
        leased = [Leased(*row) for row in rows]
    else:
        leased = _lease_core(conn, owner=owner, now=now, limit=limit, lease_for=lease_for)
    leased.sort(key=lambda x: (x.domain, x.priority, x.next_attempt_at, x.id))
    return leased


def _lease_core(
    conn: Connection, *, owner: str, now: datetime, limit: int, lease_for: timedelta
) -> list[Leased]:
    """:func:`lease_due`'s statement through SQLAlchemy, unsorted; rows locked on PostgreSQL."""
    dialect = conn.dialect.name
    r = recipients.c
    order = (r.priority, r.next_attempt_at, r.id)

    def scan(status: str) -> sa.CTE:
        query = (
            sa.select(r.id, r.priority, r.next_attempt_at)
            .where(r.status == status, r.next_attempt_at <= now)
            .order_by(*order)
            .limit(limit)
        )
        if dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        return query.cte(f"due_{status}")

    queued, deferred = scan("queued"), scan("deferred")
    due = sa.union_all(sa.select(queued), sa.select(deferred)).subquery("due")
    picked = (
        sa.select(due.c.id)
        .order_by(due.c.priority, due.c.next_attempt_at, due.c.id)
        .limit(limit)
        .cte("picked")
    )
    statement = (
        sa.update(recipients)
        .where(r.id == picked.c.id)
        .values(
            status="sending",
            lease_owner=owner,
            lease_expires_at=now + lease_for,
            updated_at=now,
        )
        .returning(
            r.id,
            r.message_id,
            r.account_id,
            r.address,
            r.domain,
            r.priority,
            r.attempts,
            r.expires_at,
            r.next_attempt_at,
        )
    )
    return [Leased(**row._mapping) for row in conn.execute(statement)]


def renew_leases(
    conn: Connection, ids: Sequence[int], *, owner: str, now: datetime, lease_for: timedelta
) -> int:
    """Extend ``owner``'s leases on ``ids`` to ``now + lease_for``; the number renewed.

    For a worker whose rows take longer than a lease (a slow or tarpitting
    receiver, many copies on one connection): without renewal another
    worker's sweep would reclaim rows still being sent, and they would be
    sent twice. Rows no longer ``sending`` for ``owner`` are left alone.
    """
    owner = _values.name("lease owner", owner)
    _aware("now", now)
    if lease_for <= timedelta(0):
        raise InvalidInput(f"lease_for must be positive, got {lease_for}")
    r = recipients.c
    renewed = 0
    for chunk in _chunks(list(ids)):
        result = conn.execute(
            sa.update(recipients)
            .where(r.id.in_(chunk), r.lease_owner == owner, r.status == "sending")
            .values(lease_expires_at=now + lease_for)
        )
        renewed += result.rowcount
    return renewed


def reclaim_expired_leases(
    conn: Connection,
    *,
    now: datetime,
    owner: str | None = None,
    in_flight: Collection[int] = (),
) -> int:
    """Return rows whose lease ran out before ``now`` to ``deferred``, due at once.

    Their worker is presumed dead. Whether the message went out is unknown,
    so ``attempts`` is not increased; each row gets a ``lease_expired`` event
    naming the lost owner. On PostgreSQL a row whose worker is writing its
    outcome at this moment (and so holds its lock) is skipped: it is alive.

    The sweeping worker (``owner``) is alive too, so its rows still in flight
    (``in_flight``) are skipped even if their lease ran out (renewal failed
    for a while): reclaimed, they could be leased again by the same owner,
    and the outcome fence, which compares owners, could not tell the stale
    attempt's outcome from the new one's.
    """
    _aware("now", now)
    alive = frozenset(in_flight) if owner is not None else frozenset()
    r = recipients.c
    expired = (
        sa.select(r.id, r.lease_owner, r.lease_expires_at)
        .where(r.status == "sending", r.lease_expires_at < now)
        .order_by(r.id)
    )
    if conn.dialect.name == "postgresql":
        expired = expired.with_for_update(skip_locked=True)
    lost = {
        row.id: row
        for row in conn.execute(expired)
        if not (row.id in alive and row.lease_owner == owner)
    }
    changed: list[sa.Row[Any]] = []
    for chunk in _chunks(list(lost)):
        statement = (
            sa.update(recipients)
            .where(r.id.in_(chunk), r.status == "sending", r.lease_expires_at < now)
            .values(
                status="deferred",
                next_attempt_at=now,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
            .returning(r.id, r.account_id, r.message_id)
        )
        changed += conn.execute(statement).all()
    _record(
        conn,
        changed,
        "lease_expired",
        now,
        lambda row: {
            "owner": lost[row.id].lease_owner,
            "lease_expired_at": lost[row.id].lease_expires_at.isoformat(),
        },
    )
    return len(changed)


# -- outcomes, fenced on the lease ---------------------------------------------------------


def mark_delivered(
    conn: Connection,
    id: int,
    *,
    owner: str,
    now: datetime,
    data: Mapping[str, Any],
    reply: str | None = None,
) -> bool:
    """The receiving server accepted the message: ``delivered``, one more attempt.

    ``reply`` (optional) is the server's final reply, kept as ``last_reply``
    and added to the event data unless ``data`` has a ``reply`` of its own.
    False, and nothing written, if ``owner`` no longer holds the lease.
    """
    return mark_delivered_many(conn, [Delivery(id, data, reply)], owner=owner, now=now)[0]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered recipient for :func:`mark_delivered_many`."""

    id: int
    data: Mapping[str, Any]
    reply: str | None = None


def mark_delivered_many(
    conn: Connection, deliveries: Sequence[Delivery], *, owner: str, now: datetime
) -> list[bool]:
    """:func:`mark_delivered` for many rows in a few statements; True for each row written.

    Measured under bench/relay: two statements per delivered recipient
    (the fenced UPDATE ... RETURNING and its event) were a quarter of the
    delivery role's time with the GIL. Here: one SELECT of the rows
    ``owner`` still holds (locked on PostgreSQL, so the fence cannot move
    before the UPDATE; SQLite's writer already holds the database), one
    executemany UPDATE and one multi-row event INSERT, per 500 rows. On
    SQLite they run on the driver's cursor (:mod:`._sqlite_delivery`).
    """
    owner = _values.name("lease owner", owner)
    _aware("now", now)
    by_id: dict[int, tuple[str | None, dict[str, Any]]] = {}  # id: (reply, event data)
    for delivery in deliveries:
        _values.integer("recipient id", delivery.id)
        event_data = _values.json_object("event data", delivery.data)
        if delivery.reply is not None:
            event_data.setdefault("reply", delivery.reply)
        by_id[delivery.id] = (delivery.reply, event_data)
    if conn.dialect.name == "sqlite":  # the same statements, without SQLAlchemy's overhead
        written = _sqlite_delivery.mark_delivered(conn, by_id, owner=owner, now=now)
    else:
        written = _mark_delivered_core(conn, by_id, owner=owner, now=now)
    return [delivery.id in written for delivery in deliveries]


def _mark_delivered_core(
    conn: Connection,
    deliveries: Mapping[int, tuple[str | None, dict[str, Any]]],
    *,
    owner: str,
    now: datetime,
) -> set[int]:
    """:func:`mark_delivered_many`'s statements through SQLAlchemy; the ids written."""
    r = recipients.c
    held: list[sa.Row[Any]] = []
    for chunk in _chunks(list(deliveries)):
        query = (
            sa.select(r.id, r.account_id, r.message_id)
            .where(r.id.in_(chunk), r.lease_owner == owner, r.status == "sending")
            .with_for_update()
        )
        held.extend(conn.execute(query))
    if held:
        with_reply = [row for row in held if deliveries[row.id][0] is not None]
        without = [row for row in held if deliveries[row.id][0] is None]
        base = sa.update(recipients).where(r.id == sa.bindparam("b_id"))
        common = {
            "status": "delivered",
            "attempts": r.attempts + 1,
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if with_reply:
            conn.execute(
                base.values(**common, last_reply=sa.bindparam("b_reply")),
                [{"b_id": row.id, "b_reply": deliveries[row.id][0]} for row in with_reply],
            )
        if without:
            conn.execute(base.values(**common), [{"b_id": row.id} for row in without])
        _record(conn, held, "delivered", now, lambda row: deliveries[row.id][1])
    return {row.id for row in held}


def mark_deferred(
    conn: Connection,
    id: int,
    *,
    owner: str,
    now: datetime,
    next_attempt_at: datetime,
    reply: str | None,
    data: Mapping[str, Any],
) -> bool:
    """A temporary failure (4xx, no answer): ``deferred`` until ``next_attempt_at``.

    Counts an attempt and keeps ``reply`` as ``last_reply``. The backoff (at
    least a minute, never past the expiry) is the caller's decision. False,
    and nothing written, if ``owner`` no longer holds the lease.
    """
    _aware("next_attempt_at", next_attempt_at)
    values = {
        "attempts": recipients.c.attempts + 1,
        "last_reply": reply,
        "next_attempt_at": next_attempt_at,
    }
    return _finish(conn, id, owner, now, "deferred", values, "deferred", data, reply)


def reschedule(
    conn: Connection,
    id: int,
    *,
    owner: str,
    now: datetime,
    next_attempt_at: datetime,
    reason: str,
    data: Mapping[str, Any],
) -> bool:
    """Our own decision to send later (a local rate limit): ``deferred`` with no attempt.

    Unlike :func:`mark_deferred` nothing was tried, so the attempt count (and
    with it the remote backoff) stays as it was. False, and nothing written,
    if ``owner`` no longer holds the lease.
    """
    _aware("next_attempt_at", next_attempt_at)
    values = {"last_reply": reason, "next_attempt_at": next_attempt_at}
    return _finish(conn, id, owner, now, "deferred", values, "deferred", data, reason)


def mark_failed(
    conn: Connection,
    id: int,
    *,
    owner: str,
    now: datetime,
    reply: str | None,
    data: Mapping[str, Any],
    status: str = "failed",
) -> bool:
    """A permanent failure: ``failed`` (or ``bounced``), never retried.

    The event's type is the status. Counts an attempt and keeps ``reply``.
    False, and nothing written, if ``owner`` no longer holds the lease.
    """
    if status not in FAILURE_STATUSES:
        raise InvalidInput(f"failure status {status!r} is invalid: use 'failed' or 'bounced'")
    values = {"attempts": recipients.c.attempts + 1, "last_reply": reply}
    return _finish(conn, id, owner, now, status, values, status, data, reply)


def mark_expired(
    conn: Connection,
    id: int,
    *,
    owner: str,
    now: datetime,
    reply: str | None,
    data: Mapping[str, Any],
    attempted: bool = True,
) -> bool:
    """The row's ``expires_at`` passed while it was leased: ``expired``, never retried.

    Usually the final 4xx after the expiry, which counts as an attempt; pass
    ``attempted=False`` when the worker gave up without trying (it leased a
    row that had expired already). A row tried at least once also puts its
    address on the account's ``returned`` list (see :func:`_list_returned`).
    False, and nothing written, if ``owner`` no longer holds the lease.
    """
    values: dict[str, Any] = {"last_reply": reply}
    if attempted:
        values["attempts"] = recipients.c.attempts + 1
    row = _finish_row(conn, id, owner, now, "expired", values, "expired", data, reply)
    if row is None:
        return False
    _list_returned(conn, [row], now)
    return True


def mark_suppressed(
    conn: Connection,
    id: int,
    *,
    owner: str,
    now: datetime,
    reason: str,
    data: Mapping[str, Any] | None = None,
) -> bool:
    """A list filter keeps the row from being sent: ``suppressed``, not sent.

    ``reason`` (the event's ``reason``) says which filter, for people;
    ``data`` adds facts for programs (the delivery worker names the list).
    No attempt is counted. False, and nothing written, if ``owner`` no
    longer holds the lease.
    """
    payload = {**(data or {}), "reason": _values.name("reason", reason)}
    return _finish(conn, id, owner, now, "suppressed", {}, "suppressed", payload, None)


def _finish(
    conn: Connection,
    id: int,
    owner: str,
    now: datetime,
    status: str,
    values: Mapping[str, Any],
    event_type: str,
    data: Mapping[str, Any],
    reply: str | None,
) -> bool:
    """Move a leased row to ``status`` if ``owner`` still holds it, with its event."""
    row = _finish_row(conn, id, owner, now, status, values, event_type, data, reply)
    return row is not None


def _finish_row(
    conn: Connection,
    id: int,
    owner: str,
    now: datetime,
    status: str,
    values: Mapping[str, Any],
    event_type: str,
    data: Mapping[str, Any],
    reply: str | None,
) -> sa.Row[Any] | None:
    """:func:`_finish`, returning the changed row (None if the lease was lost)."""
    _values.integer("recipient id", id)
    owner = _values.name("lease owner", owner)
    _aware("now", now)
    event_data = _values.json_object("event data", data)
    if reply is not None:
        event_data.setdefault("reply", reply)
    r = recipients.c
    statement = (
        sa.update(recipients)
        .where(r.id == id, r.lease_owner == owner, r.status == "sending")
        .values(
            **values,
            status=status,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(r.id, r.account_id, r.message_id, r.address, r.attempts, r.last_reply)
    )
    row = conn.execute(statement).one_or_none()
    if row is None:
        return None
    _record(conn, [row], event_type, now, lambda _: event_data)
    return row


# -- the sweeper ---------------------------------------------------------------------------


def expire_overdue(conn: Connection, *, now: datetime, limit: int | None = None) -> int:
    """Give up on waiting rows whose ``expires_at`` has come: ``expired``, with an event.

    Only ``queued`` and ``deferred`` rows: a ``sending`` row is its worker's
    to finish (see :func:`mark_expired`), and a ``held`` one waits for the
    operator, who may release it (it then expires at the next sweep) or
    cancel it. ``limit`` caps the rows changed in this call: a campaign's
    rows share one expiry, and on SQLite every writer waits while a sweep of
    100,000 rows runs (about two seconds), so a sweeper should take batches
    and commit between them. Rows that had been tried put their addresses on
    the ``returned`` list, as in :func:`mark_expired`.
    """
    _aware("now", now)
    r = recipients.c
    overdue = [r.status.in_(WAITING), r.expires_at <= now]
    if limit is not None:
        batch = sa.select(r.id).where(*overdue).limit(_count("limit", limit))
        overdue.append(r.id.in_(batch.scalar_subquery()))
    statement = (
        sa.update(recipients)
        .where(*overdue)
        .values(status="expired", updated_at=now)
        .returning(
            r.id, r.account_id, r.message_id, r.expires_at, r.address, r.attempts, r.last_reply
        )
    )
    changed = conn.execute(statement).all()
    _record(conn, changed, "expired", now, lambda row: {"expires_at": row.expires_at.isoformat()})
    _list_returned(conn, changed, now)
    return len(changed)


def _list_returned(conn: Connection, rows: Sequence[sa.Row[Any]], now: datetime) -> None:
    """Put the addresses of expired rows that had been tried on the ``returned`` list.

    Mail that was tried and never accepted before its expiry "came back"
    as far as X-ListOption 512 is concerned; a row never tried (a backlog,
    a hold, local rate limits only) says nothing about its address and is
    not listed. The same transaction as the expiry, so a crash never keeps
    one without the other. An address that cannot be listed is skipped:
    the expiry matters more than the list.
    """
    entries = [
        NewSuppression(
            row.account_id,
            row.address,
            "returned",
            _returned_detail(row.attempts, row.last_reply),
        )
        for row in rows
        if row.attempts > 0 and is_address(row.address)
    ]
    if entries:
        add_suppressions(conn, entries, now=now)


def _returned_detail(attempts: int, last_reply: str | None) -> str:
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    if last_reply:
        return f"expired undelivered after {tries}; last reply: {last_reply}"
    return f"expired undelivered after {tries}"


# -- operator views ------------------------------------------------------------------------


def list_queue(
    conn: Connection,
    *,
    account_id: int | None = None,
    domain: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[QueueRow]:
    """Recipient rows, newest first (by id, which grows with arrival), filtered.

    ``domain`` is the recipient's domain (any case); ``status`` one of
    :data:`~postlane.store.schema.RECIPIENT_STATUSES`.
    """
    _count("limit", limit)
    query = _queue_rows().order_by(recipients.c.id.desc()).limit(limit)
    if account_id is not None:
        query = query.where(recipients.c.account_id == _values.integer("account_id", account_id))
    if domain is not None:
        query = query.where(recipients.c.domain == _values.domain("domain", domain))
    if status is not None:
        query = query.where(recipients.c.status == _status(status))
    return [QueueRow(**row._mapping) for row in conn.execute(query)]


def get_recipient(conn: Connection, id: int) -> QueueRow:
    """One recipient row; :class:`NotFound` if there is none with that id."""
    query = _queue_rows().where(recipients.c.id == _values.integer("recipient id", id))
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound(f"recipient {id} not found")
    return QueueRow(**row._mapping)


def _queue_rows() -> sa.Select[Any]:
    return sa.select(
        *(recipients.c[name] for name in QueueRow.__dataclass_fields__ if name in recipients.c),
        messages.c.mail_from,
        messages.c.subject,
    ).join_from(recipients, messages, recipients.c.message_id == messages.c.id)


# -- operator actions ------------------------------------------------------------------------
#
# Each takes ids, an account, a domain (combined with AND) or all_=True, and
# touches only rows in the statuses it applies to: a row being sent
# ('sending') or finished is never changed. An empty filter is refused, so a
# bare `postlane queue cancel` cannot empty the queue by accident.


def retry(
    conn: Connection,
    *,
    now: datetime,
    ids: Sequence[int] | None = None,
    account_id: int | None = None,
    domain: str | None = None,
    all_: bool = False,
) -> int:
    """Make waiting (queued or deferred) rows due now; held rows are not touched."""
    return _act(
        conn, now, ids, account_id, domain, all_, WAITING, {"next_attempt_at": now}, "retried"
    )


def hold(
    conn: Connection,
    *,
    now: datetime,
    ids: Sequence[int] | None = None,
    account_id: int | None = None,
    domain: str | None = None,
    all_: bool = False,
) -> int:
    """Stop waiting rows from being sent until released: ``held``."""
    return _act(conn, now, ids, account_id, domain, all_, WAITING, {"status": "held"}, "held")


def release(
    conn: Connection,
    *,
    now: datetime,
    ids: Sequence[int] | None = None,
    account_id: int | None = None,
    domain: str | None = None,
    all_: bool = False,
) -> int:
    """Put held rows back in the queue, ``queued``, due when they were due before the hold.

    A scheduled message keeps its launch time and a deferred row its backoff;
    a row whose time passed while it was held is due at once. ``retry`` is
    the command that makes a row due now.
    """
    values = {"status": "queued"}
    return _act(conn, now, ids, account_id, domain, all_, ("held",), values, "released")


def cancel(
    conn: Connection,
    *,
    now: datetime,
    ids: Sequence[int] | None = None,
    account_id: int | None = None,
    domain: str | None = None,
    all_: bool = False,
) -> int:
    """Never send these rows (queued, deferred or held): ``cancelled``."""
    values = {"status": "cancelled"}
    return _act(conn, now, ids, account_id, domain, all_, CANCELLABLE, values, "cancelled")


def _act(
    conn: Connection,
    now: datetime,
    ids: Sequence[int] | None,
    account_id: int | None,
    domain: str | None,
    all_: bool,
    from_statuses: tuple[str, ...],
    values: Mapping[str, Any],
    event_type: str,
) -> int:
    """Change every row matching the filter and in ``from_statuses``; one event each."""
    _aware("now", now)
    if ids is None and account_id is None and domain is None and not all_:
        raise InvalidInput("name ids, --account or --domain (or --all for every row)")
    r = recipients.c
    conditions: list[sa.ColumnElement[bool]] = [r.status.in_(from_statuses)]
    if account_id is not None:
        conditions.append(r.account_id == _values.integer("account_id", account_id))
    if domain is not None:
        conditions.append(r.domain == _values.domain("domain", domain))
    chunks: Iterable[list[int] | None] = [None]
    if ids is not None:
        chunks = _chunks(sorted({_values.integer("recipient id", i) for i in ids}))
    changed: list[sa.Row[Any]] = []
    for chunk in chunks:
        where = conditions if chunk is None else [*conditions, r.id.in_(chunk)]
        statement = (
            sa.update(recipients)
            .where(*where)
            .values(**values, updated_at=now)
            .returning(r.id, r.account_id, r.message_id)
        )
        changed += conn.execute(statement).all()
    _record(conn, changed, event_type, now, lambda _: {"by": "operator"})
    return len(changed)


# -- helpers ---------------------------------------------------------------------------------


def _record(
    conn: Connection,
    rows: Sequence[sa.Row[Any]],
    event_type: str,
    now: datetime,
    data: Callable[[sa.Row[Any]], dict[str, Any]],
) -> None:
    """One ``event_type`` event per changed row (``data(row)`` its data), in one round trip."""
    if not rows:
        return
    conn.execute(
        events.insert(),
        [
            {
                "account_id": row.account_id,
                "message_id": row.message_id,
                "recipient_id": row.id,
                "type": event_type,
                "created_at": now,
                "data": data(row),
            }
            for row in rows
        ],
    )


def _chunks(ids: list[int]) -> Iterable[list[int]]:
    return (ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK))


def _status(value: str) -> str:
    if value not in RECIPIENT_STATUSES:
        raise InvalidInput(
            f"status {value!r} is invalid: must be one of {', '.join(RECIPIENT_STATUSES)}"
        )
    return value


def _count(field: str, value: int) -> int:
    if _values.integer(field, value) < 0:
        raise InvalidInput(f"{field} must not be negative, got {value}")
    return value


def _aware(field: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidInput(f"{field} must be an aware UTC datetime, got {value!r}")
    return value
