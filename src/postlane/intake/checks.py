"""The rules a submitted message must meet before Postlane takes responsibility for it.

They combine RFC 5322 section 3.6 (which fields may occur at most once), the
rules the Omnivery seed adds (exactly one From, one To, one Cc, one Subject:
large mailbox providers mishandle more), RFC 5321 section 6.3 (refuse a
message that has looped) and RFC 6152 / RFC 6531 (8-bit data only when the
client announced it). Every failure is a :class:`MessageRejected` whose text
the client sees, so it names the header and says what is wrong.

In-Reply-To and References are also "at most one" in RFC 5322 but are not
checked: they only affect threading, and refusing a customer's mail over them
would cost more than it protects.
"""

from __future__ import annotations

from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache

from postlane.errors import MessageRejected
from postlane.intake.headers import HeaderSection

__all__ = ["check_message", "header_from_address"]

# Lower-cased name -> the spelling used in replies, in the order they are checked.
_AT_MOST_ONCE = {
    "to": "To",
    "cc": "Cc",
    "subject": "Subject",
    "date": "Date",
    "message-id": "Message-ID",
    "sender": "Sender",
    "reply-to": "Reply-To",
    "bcc": "Bcc",
}
_COUNTED = frozenset(("from", *_AT_MOST_ONCE))
_ADDED_WHEN_MISSING = {"date": "Date", "message-id": "Message-ID"}
_REMEMBERED_LENGTH = 256  # characters of a From value worth caching the parse of


def check_message(
    section: HeaderSection,
    data: bytes,
    *,
    eight_bit_allowed: bool,
    hostname: str,
    max_received: int,
) -> list[str]:
    """Reject ``data`` if it breaks a rule; else name the fields intake must add.

    The result is a subset of ``["Date", "Message-ID"]``: RFC 5322 requires a
    Date and RFC 5321 section 6.4 lets the submission server supply both, and
    these fields were already counted here, so the caller need not look again.
    """
    if not data.isascii():
        if not eight_bit_allowed:
            raise MessageRejected(
                550,
                "5.6.0",
                "Message contains 8-bit data but BODY=8BITMIME or SMTPUTF8 was not given",
            )
        _check_utf8_fields(section)
    nul = data.find(b"\0", 0, section.body_offset)
    if nul >= 0:
        # RFC 5322 allows no NUL in a header, and PostgreSQL cannot store one in
        # text: accepted, the message would fail every commit there with 451.
        name = next((f.name for f in section.fields if b"\0" in f.raw), "the header section")
        raise MessageRejected(550, "5.6.0", f"{name} header contains a NUL byte")
    marker = f"by {hostname} (Postlane)"
    hops = 0
    counts: dict[str, int] = {}
    from_value = date_value = ""
    for field in section.fields:
        name = field.name.lower()
        if name == "received":
            if marker in field.value:
                hops += 1
        elif name in _COUNTED:
            counts[name] = counts.get(name, 0) + 1
            if name == "from":
                from_value = field.value
            elif name == "date":
                date_value = field.value
    if hops >= max_received:
        raise MessageRejected(554, "5.4.6", "Too many hops: mail loop detected")
    froms = counts.get("from", 0)
    if froms == 0:
        raise MessageRejected(550, "5.6.0", "Message has no From header")
    if froms > 1:
        raise MessageRejected(
            550, "5.6.0", f"Message has {froms} From headers; only one is allowed"
        )
    for name, spelling in _AT_MOST_ONCE.items():
        count = counts.get(name, 0)
        if count > 1:
            raise MessageRejected(
                550, "5.6.0", f"Message has {count} {spelling} headers; only one is allowed"
            )
    if _first_mailbox(from_value) is None:
        raise MessageRejected(550, "5.6.0", "From header has no valid address")
    if "date" in counts:
        try:
            parsedate_to_datetime(date_value)
        except (ValueError, OverflowError):
            raise MessageRejected(
                550, "5.6.0", "Date header is not a valid RFC 5322 date"
            ) from None
    return [spelling for name, spelling in _ADDED_WHEN_MISSING.items() if name not in counts]


def _check_utf8_fields(section: HeaderSection) -> None:
    """Refuse header text that is 8-bit but not UTF-8 (RFC 6532 allows only UTF-8).

    Such a field cannot be stored as text, and accepting it would only turn
    into a temporary failure at commit, on every retry the client makes.
    """
    for field in section.fields:
        if not field.raw.isascii():
            try:
                field.raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MessageRejected(
                    550,
                    "5.6.0",
                    f"{field.name} header is not valid UTF-8; write non-ASCII header text"
                    " in UTF-8 or as an RFC 2047 encoded word",
                ) from None


def header_from_address(section: HeaderSection) -> str:
    """The address the recipient sees as the author: what sender policy must judge.

    Only the first mailbox counts: :func:`check_message` allows one From
    field, and a list of authors is judged by the one mail clients show.
    Raises the same rejections as :func:`check_message` when there is none.
    """
    for field in section.fields:
        if field.name.lower() == "from":
            address = _first_mailbox(field.value)
            if address is None:
                raise MessageRejected(550, "5.6.0", "From header has no valid address")
            return address
    raise MessageRejected(550, "5.6.0", "Message has no From header")


def _first_mailbox(value: str) -> str | None:
    """The first ``local@domain`` in an address list, domain lower-cased, or None.

    ``getaddresses`` is the slowest step of the checks, it runs twice per
    message (here and for sender policy), and a bulk sender repeats one From
    value across thousands of messages; so short values are remembered. Long
    ones are not, or a hostile client could fill memory with them.
    """
    if len(value) <= _REMEMBERED_LENGTH:
        return _remembered_first_mailbox(value)
    return _parse_first_mailbox(value)


def _parse_first_mailbox(value: str) -> str | None:
    for _, address in getaddresses([value]):
        local, at, domain = address.rpartition("@")
        if at and local and domain:
            return f"{local}@{domain.lower()}"
    return None


_remembered_first_mailbox = lru_cache(maxsize=1024)(_parse_first_mailbox)
