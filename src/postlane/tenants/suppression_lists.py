"""What an operator does to an account's address lists: add, list, remove, import.

The lists and their reasons are described in :mod:`postlane.store.suppressions`.
Addresses typed by a person or read from a file are checked more strictly
than the store checks what delivery writes: a line like
``bob@example.org; ann@example.org`` is a pasting mistake, not one address,
and is refused instead of being listed as a useless entry.

An import reads the file line by line and writes it in chunks, each in its
own transaction: a list of a million addresses must not hold the database's
write lock for its whole length, and adding an address twice changes
nothing, so an import cut short can simply be run again.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput
from postlane.store import Database
from postlane.store import accounts as account_store
from postlane.store import suppressions as store
from postlane.store.suppressions import NewSuppression, Suppression

#: Addresses written per transaction by an import.
IMPORT_CHUNK: Final = 1000
#: Characters no single address has outside a quoted local part.
_SEPARATORS: Final = frozenset(" \t,;<>()")


@dataclass(frozen=True, slots=True)
class Change:
    """What adding one address did.

    ``outcome`` is ``added`` (it was on no list), ``replaced`` (it moved from
    the optional list ``before`` to the always-applied one asked for) or
    ``kept`` (it stays on ``before``: the same list, or one that an optional
    reason may not weaken).
    """

    address: str
    outcome: str
    before: str | None


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line of an import that was skipped, and why."""

    number: int
    problem: str


@dataclass(slots=True)
class ImportSummary:
    """The counts an import reports, and its bad lines in file order."""

    added: int = 0
    replaced: int = 0
    kept: int = 0
    bad: list[BadLine] = field(default_factory=list)


def add(
    db: Database,
    account: str,
    addresses: Sequence[str],
    reason: str,
    detail: str | None = None,
) -> list[Change]:
    """Put ``addresses`` on the account's ``reason`` list, all or none; what each one did.

    One :class:`Change` per address given, in order.
    """
    reason = store.check_reason(reason)
    checked = [address(a) for a in addresses]
    if not checked:
        raise InvalidInput("no address given")
    with db.begin() as conn:
        account_id = account_store.get_account(conn, account).id
        return _add(conn, account_id, checked, reason, detail)


def _add(
    conn: Connection, account_id: int, addresses: list[str], reason: str, detail: str | None
) -> list[Change]:
    before = store.listed(conn, account_id, addresses)
    new = [NewSuppression(account_id, a, reason, detail) for a in addresses]
    store.add_suppressions(conn, new, now=datetime.now(UTC))
    # One change per address given, as if added one after the other: an
    # address given twice is added, then kept.
    changes: list[Change] = []
    for entry in addresses:
        earlier = before.get(entry)
        if earlier is None:
            changes.append(Change(entry, "added", None))
            before[entry] = reason
        elif store.replaces(reason, earlier):
            changes.append(Change(entry, "replaced", earlier))
            before[entry] = reason
        else:
            changes.append(Change(entry, "kept", earlier))
    return changes


def remove(db: Database, account: str, addresses: Sequence[str]) -> list[tuple[str, str | None]]:
    """Take ``addresses`` off the account's lists; each with the list it was on (None: none)."""
    checked = [address(a) for a in addresses]
    if not checked:
        raise InvalidInput("no address given")
    with db.begin() as conn:
        account_id = account_store.get_account(conn, account).id
        before = store.listed(conn, account_id, checked)
        for entry in checked:
            store.remove_suppression(conn, account_id, entry)
    return [(entry, before.get(entry)) for entry in dict.fromkeys(checked)]


def list_entries(
    db: Database, account: str, *, reason: str | None = None, limit: int = 100
) -> list[Suppression]:
    """The account's entries, newest first, of one list or all."""
    with db.connect() as conn:
        account_id = account_store.get_account(conn, account).id
        return store.list_suppressions(conn, account_id, limit, reason=reason)


def import_lines(
    db: Database,
    account: str,
    lines: Iterable[bytes],
    reason: str,
    detail: str | None = None,
) -> ImportSummary:
    """Add every address of ``lines`` (see :func:`read_addresses`) to the ``reason`` list.

    Bad lines are skipped and reported in the summary; the account and the
    reason are checked before anything is read.
    """
    reason = store.check_reason(reason)
    with db.connect() as conn:
        account_id = account_store.get_account(conn, account).id
    summary = ImportSummary()
    chunk: list[str] = []

    def flush() -> None:
        with db.begin() as conn:
            for change in _add(conn, account_id, chunk, reason, detail):
                if change.outcome == "added":
                    summary.added += 1
                elif change.outcome == "replaced":
                    summary.replaced += 1
                else:
                    summary.kept += 1
        chunk.clear()

    for item in read_addresses(lines):
        if isinstance(item, BadLine):
            summary.bad.append(item)
            continue
        chunk.append(item)
        if len(chunk) >= IMPORT_CHUNK:
            flush()
    if chunk:
        flush()
    return summary


def read_addresses(lines: Iterable[bytes]) -> Iterator[str | BadLine]:
    """The address of each line, or why the line is bad; blank and ``#`` lines are skipped.

    A line is one address, or a CSV row whose first column is the address
    (the form most mailing tools export). Lines are read as bytes and
    decoded one by one, so one line in another encoding is reported by its
    number instead of ending the import. A UTF-8 byte order mark is ignored.
    """
    for number, raw in enumerate(lines, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield BadLine(number, "not UTF-8 text")
            continue
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            first = text
            if '"' in text or "," in text:
                first = next(csv.reader([text], strict=True), [""])[0]
        except csv.Error as exc:
            yield BadLine(number, f"not a CSV row: {exc}")
            continue
        try:
            yield address(first)
        except InvalidInput as exc:
            yield BadLine(number, str(exc))


def address(value: str) -> str:
    """One address as a person typed it: surrounding space dropped, then stored form.

    Refuses what is not one address: no ``@``, an empty part, or spaces,
    commas, semicolons, parentheses or angle brackets outside a quoted local
    part (a list pasted into one entry, a ``Name <address>`` form).
    """
    text = value.strip()
    local, at, domain = text.rpartition("@")
    if not (local and at and domain):
        raise InvalidInput(f"invalid address {value!r}: must look like local@domain")
    quoted = len(local) >= 2 and local[0] == '"' == local[-1]
    if (
        not text.isprintable()
        or any(ch in _SEPARATORS for ch in domain)
        or (not quoted and any(ch in _SEPARATORS or ch == '"' for ch in local))
    ):
        raise InvalidInput(
            f"invalid address {value!r}: one address without spaces, commas, semicolons,"
            " parentheses or angle brackets"
        )
    return store.normalise(text)
