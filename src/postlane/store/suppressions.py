"""An account's address lists: the suppression list and the lists X-ListOption filters on.

One table holds every list, one row per (account, address), with the
``reason`` naming the list. The reasons form two groups:

**The suppression list**, applied to every message unless it carries
X-ListOption 65536 (bypass all list filtering):

- ``hard_bounce``: a remote server said the address does not exist (the
  delivery worker on a hard 5xx; the bounce processor on a DSN);
- ``complaint``: the recipient reported the mail as spam (an ARF ``abuse``
  report, from the bounce processor);
- ``manual``: the operator or the customer suppressed the address.

**Optional lists**, applied only when a message's X-ListOption bit asks:

- ``unsubscribe`` (32): the recipient unsubscribed;
- ``blocklist`` (128, the OMICard "blacklist"): the customer does not want
  the address mailed by messages that ask;
- ``returned`` (512): earlier mail to the address came back without being a
  hard bounce: any other permanent refusal (policy, content, a full
  mailbox...), a DSN not saying the user is unknown, or a recipient that
  expired undelivered after being tried.

A stored reason outside the known set (written before reasons were checked)
counts as the suppression list: for a list that stops mail the safe mistake
is to not send.

**Precedence.** There is one row per address, so adding an entry must never
weaken what is there: an always-applied reason replaces an optional one (a
hard bounce after a ``returned`` entry must stop all mail, not only mail that
asks for 512); an optional reason never replaces an always-applied one; and
within a group the first entry stays (its detail is the earlier evidence).
The rule is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``, so two
writers racing for one address still end with the stronger reason.

**Addresses are compared in one canonical form** (:func:`fold`), because one
mailbox has several spellings and an entry that misses one of them sends mail
the list was meant to stop; for a suppression list the safe mistake is to not
send. Addresses are stored in that form and every lookup folds what it is
given, so all spellings meet on one row:

- the local part is lower-cased (Python's full Unicode ``str.lower``, not
  SQLite's ASCII-only ``lower()``). RFC 5321 lets a server treat ``Bob@`` and
  ``bob@`` as different mailboxes, but none of note does;
- the domain is lower-cased and loses its trailing dots: ``example.com.`` is
  the absolute spelling of ``example.com`` (RFC 1035 §3.1), the same host;
- an internationalised domain takes its A-label form (``bücher.example`` ->
  ``xn--bcher-kva.example``), the name the DNS and the delivery worker use, so
  the U-label and the A-label spellings of one mailbox are one entry. The
  conversion is Python's ``idna`` codec, the one the resolver and intake use,
  so a domain folds here as it resolves there. A domain it cannot convert
  (an empty or over-long label, a character IDNA prohibits) keeps its
  lower-cased form rather than raising: such a domain receives no mail
  anyway, and the queue sweep that lists addresses must not fail on one.

Folding an already folded address changes nothing, so a key can be folded
again (callers often pass on what :func:`normalise` returned). Migration 0004
rewrote the rows stored before the domain was canonicalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from postlane.errors import InvalidInput
from postlane.store import _values
from postlane.store._constraints import explained
from postlane.store.schema import suppressions

#: Reasons of the suppression list: applied to every message unless bypassed (65536).
SUPPRESSION_LIST: Final = ("hard_bounce", "complaint", "manual")
#: Reasons of the optional lists, each with the X-ListOption bit that applies it.
OPTIONAL_LISTS: Final = {"unsubscribe": 32, "blocklist": 128, "returned": 512}
#: Every reason an entry may have.
REASONS: Final = (*SUPPRESSION_LIST, *OPTIONAL_LISTS)

#: Addresses per ``IN (...)`` lookup; SQLite allows 32,766 bound values.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Suppression:
    id: int
    account_id: int
    #: In the form :func:`fold` gives.
    address: str
    #: Which list: one of :data:`REASONS` (or an older, unchecked reason).
    reason: str
    detail: str | None
    #: When the current reason was recorded.
    created_at: datetime


@dataclass(frozen=True, slots=True)
class NewSuppression:
    """One entry to add; see :func:`add_suppressions`."""

    account_id: int
    address: str
    reason: str
    detail: str | None = None


def add_suppression(
    conn: Connection,
    account_id: int,
    address: str,
    reason: str,
    detail: str | None = None,
    *,
    now: datetime,
) -> bool:
    """Put ``address`` on the account's ``reason`` list; True if its entry was written.

    False when the address was listed already and stays as it was (see the
    precedence in the module docstring). :class:`NotFound` if the account
    does not exist; :class:`InvalidInput` for a malformed address or an
    unknown reason.
    """
    entry = NewSuppression(account_id, address, reason, detail)
    return add_suppressions(conn, [entry], now=now) == 1


def add_suppressions(conn: Connection, entries: Sequence[NewSuppression], *, now: datetime) -> int:
    """Add many entries, a few statements in all; how many addresses were written.

    Written means added, or an optional reason replaced by an always-applied
    one. The same address twice in ``entries`` is resolved by the same
    precedence as against a stored entry. Every entry is checked before
    anything is written, so a malformed one writes nothing.
    """
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise InvalidInput(f"now must be an aware UTC datetime, got {now!r}")
    if isinstance(entries, NewSuppression):
        raise InvalidInput("entries must be a sequence of entries, not one entry")
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for entry in entries:
        account_id = _values.integer("account_id", entry.account_id)
        address = normalise(entry.address)
        reason = check_reason(entry.reason)
        earlier = rows.get((account_id, address))
        if earlier is None or replaces(reason, earlier["reason"]):
            rows[(account_id, address)] = {
                "account_id": account_id,
                "address": address,
                "reason": reason,
                "detail": None if entry.detail is None else _values.text("detail", entry.detail),
                "created_at": now,
            }
    written = 0
    ordered = list(rows.values())
    for start in range(0, len(ordered), _CHUNK):
        written += _upsert(conn, ordered[start : start + _CHUNK])
    return written


def _upsert(conn: Connection, rows: list[dict[str, Any]]) -> int:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    values = insert(suppressions).values(rows)
    c, new = suppressions.c, values.excluded
    statement = values.on_conflict_do_update(
        index_elements=[c.account_id, c.address],
        set_={"reason": new.reason, "detail": new.detail, "created_at": new.created_at},
        where=sa.and_(new.reason.in_(SUPPRESSION_LIST), c.reason.in_(tuple(OPTIONAL_LISTS))),
    ).returning(c.id)
    accounts = sorted({row["account_id"] for row in rows})
    missing = f"account {' or '.join(str(a) for a in accounts)} not found"
    with explained(conn, missing_parent=missing):
        return len(conn.execute(statement).all())


def replaces(new: str, old: str) -> bool:
    """Whether adding ``new`` to an address listed as ``old`` changes it (the precedence rule)."""
    return applies_always(new) and not applies_always(old)


def applies_always(reason: str) -> bool:
    """Whether an entry with ``reason`` keeps every message from its address (unless bypassed).

    True for the suppression list and for any reason that is not a known
    optional list.
    """
    return reason not in OPTIONAL_LISTS


def check_reason(reason: Any) -> str:
    """``reason`` if it names a list; :class:`InvalidInput` listing the allowed ones otherwise."""
    if reason not in REASONS:
        raise InvalidInput(f"reason {reason!r} is invalid: must be one of {', '.join(REASONS)}")
    return str(reason)


def listed(conn: Connection, account_id: int, addresses: Sequence[str]) -> dict[str, str]:
    """Those of ``addresses`` (as given) that are on any of the account's lists, with the reason.

    In any spelling :func:`fold` makes one. One query per 500 distinct
    addresses: delivery asks once per account per batch.
    """
    _values.integer("account_id", account_id)
    if isinstance(addresses, str):
        raise InvalidInput("addresses must be a sequence of addresses, not one string")
    wanted = sorted({fold(address) for address in addresses})
    found: dict[str, str] = {}
    for start in range(0, len(wanted), _CHUNK):
        query = sa.select(suppressions.c.address, suppressions.c.reason).where(
            suppressions.c.account_id == account_id,
            suppressions.c.address.in_(wanted[start : start + _CHUNK]),
        )
        found.update((address, reason) for address, reason in conn.execute(query))
    return {address: found[fold(address)] for address in addresses if fold(address) in found}


def is_suppressed(conn: Connection, account_id: int, addresses: Sequence[str]) -> set[str]:
    """Those of ``addresses`` (as given) on the account's suppression list, in any spelling.

    Only the always-applied reasons: an address on an optional list is
    mailed unless the message asks for that list (use :func:`listed`).
    """
    return {
        a for a, reason in listed(conn, account_id, addresses).items() if applies_always(reason)
    }


def remove_suppression(conn: Connection, account_id: int, address: str) -> bool:
    """Take ``address`` off whatever list it is on; True if it was listed."""
    statement = sa.delete(suppressions).where(
        suppressions.c.account_id == _values.integer("account_id", account_id),
        suppressions.c.address == normalise(address),
    )
    return conn.execute(statement).rowcount > 0


def list_suppressions(
    conn: Connection, account_id: int, limit: int = 100, *, reason: str | None = None
) -> list[Suppression]:
    """The account's listed addresses, newest first; only one list's with ``reason``."""
    if _values.integer("limit", limit) < 0:
        raise InvalidInput(f"limit must not be negative, got {limit}")
    query = (
        sa.select(suppressions)
        .where(suppressions.c.account_id == _values.integer("account_id", account_id))
        .order_by(suppressions.c.id.desc())
        .limit(limit)
    )
    if reason is not None:
        query = query.where(suppressions.c.reason == check_reason(reason))
    return [_suppression(row) for row in conn.execute(query)]


def normalise(address: str) -> str:
    """The form addresses are stored in (:func:`fold`), after checking it is one."""
    text = _values.text("address", address)
    if not is_address(text):
        raise InvalidInput(f"address must look like local@domain, got {address!r}")
    return fold(text)


def is_address(text: str) -> bool:
    """Whether ``text`` can be listed: ``local@domain``, printable, no surrounding space.

    For callers that list addresses as a side effect (the queue sweep) and
    skip what cannot be listed rather than fail.
    """
    local, at, domain = text.rpartition("@")
    # A domain of dots only would fold to nothing.
    return bool(local and at and domain.strip(".")) and text == text.strip() and text.isprintable()


def fold(address: str) -> str:
    """The key addresses are compared by; the rule is in the module docstring.

    Never raises, for any text: lookups fold whatever delivery hands them.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return f"{local.lower()}@{_fold_domain(domain)}"


@lru_cache(maxsize=4096)
def _fold_domain(domain: str) -> str:
    """Cached because one batch folds each recipient several times and IDNA is slow."""
    # Dots are stripped before the conversion (which refuses "name..", and a
    # refused name must still lose them) and after it (which turns U+3002 and
    # its kin into dots), so that folding twice changes nothing.
    name = domain.lower().rstrip(".")
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii").rstrip(".")
    except UnicodeError:
        return name


def _suppression(row: sa.Row[Any]) -> Suppression:
    return Suppression(**row._mapping)
