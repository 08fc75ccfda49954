"""Constraint violations explained as Postlane errors.

The database, not a read-before-write, decides whether a name is taken or a
value allowed: only it sees concurrent writers. What it says is then turned
into :class:`AlreadyExists`, :class:`NotFound` or :class:`InvalidInput` with a
message a person can act on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psycopg
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from postlane.errors import AlreadyExists, InvalidInput, NotFound, PostlaneError, StoreError
from postlane.store.schema import CHECK_RULES

_BY_SQLSTATE = {
    "23505": "unique",
    "23503": "foreign_key",
    "23514": "check",
    "23502": "not_null",
}
_BY_SQLITE_NAME = {
    "SQLITE_CONSTRAINT_UNIQUE": "unique",
    "SQLITE_CONSTRAINT_PRIMARYKEY": "unique",
    "SQLITE_CONSTRAINT_FOREIGNKEY": "foreign_key",
    "SQLITE_CONSTRAINT_CHECK": "check",
    "SQLITE_CONSTRAINT_NOTNULL": "not_null",
}
_SQLITE_CHECK_PREFIX = "CHECK constraint failed: "


@contextmanager
def explained(
    conn: Connection,
    *,
    duplicate: str | None = None,
    missing_parent: str | None = None,
    values: Mapping[str, object] | None = None,
) -> Iterator[None]:
    """Run the enclosed write in a savepoint and explain a constraint violation.

    ``duplicate`` is the message for a unique violation, ``missing_parent``
    for a foreign key naming no row, ``values`` what was written (to quote a
    value a CHECK refused). The savepoint matters on PostgreSQL, where a
    failed statement would otherwise poison the caller's whole transaction:
    callers compose several repository calls in one and may carry on.
    """
    try:
        with conn.begin_nested():
            yield
    except IntegrityError as e:
        raise _explain(e, duplicate, missing_parent, values or {}) from e


def _explain(
    error: IntegrityError,
    duplicate: str | None,
    missing_parent: str | None,
    values: Mapping[str, object],
) -> PostlaneError:
    kind, constraint, detail = _classify(error.orig)
    if kind == "unique" and duplicate is not None:
        return AlreadyExists(duplicate)
    if kind == "foreign_key" and missing_parent is not None:
        return NotFound(missing_parent)
    if kind == "check" and constraint in CHECK_RULES:
        column, rule = CHECK_RULES[constraint]
        if column in values:
            return InvalidInput(f"{column} {values[column]!r} is invalid: {rule}")
        return InvalidInput(f"{column} is invalid: {rule}")
    if kind == "not_null":
        return InvalidInput(f"a required value is missing: {detail}")
    return StoreError(f"the database refused the change: {detail}")


def _classify(orig: BaseException | None) -> tuple[str, str | None, str]:
    """(kind of violation, constraint name if known, the driver's first line)."""
    lines = str(orig).strip().splitlines()
    detail = lines[0] if lines else type(orig).__name__
    if isinstance(orig, psycopg.Error):
        kind = _BY_SQLSTATE.get(orig.sqlstate or "", "other")
        return kind, orig.diag.constraint_name, detail
    if isinstance(orig, sqlite3.Error):
        kind = _BY_SQLITE_NAME.get(orig.sqlite_errorname, "other")
        constraint = None
        if kind == "check" and detail.startswith(_SQLITE_CHECK_PREFIX):
            constraint = detail.removeprefix(_SQLITE_CHECK_PREFIX).strip()
        return kind, constraint, detail
    return "other", None, detail
