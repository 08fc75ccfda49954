"""Build the message Postlane stores from the one the client sent.

Only the header section changes: the trace field goes on top (RFC 5321
section 4.4 says prepend, never reorder), per-message control headers come
out, and a missing Date or Message-ID is supplied (RFC 6409 section 8). Every
other field is written back from its original bytes and the body is copied
once, untouched, because a client may have DKIM-signed the message already.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from email.utils import format_datetime

from postlane.intake.headers import HeaderSection

__all__ = ["format_date", "make_message_id", "received_header", "rewrite"]

_PROTOCOLS = frozenset(("ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"))  # RFC 3848
_MAX_LINE = 78  # RFC 5322 section 2.1.1: SHOULD NOT exceed 78 characters


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: datetime,
) -> str:
    """The value of our Received field (RFC 5321 section 4.4).

    ``recipient`` is named only when the message has exactly one, otherwise
    the field would tell every recipient who else got it. The ``by ...
    (Postlane)`` words are what loop detection counts. ``protocol`` is the
    RFC 3848 keyword: ESMTP, plus S for TLS, plus A for an authenticated client.
    """
    if protocol not in _PROTOCOLS:
        raise ValueError(f"not an RFC 3848 protocol keyword for submission: {protocol!r}")
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    value = f"from {helo} ([{literal}]) by {hostname} (Postlane) with {protocol} id {queue_id}"
    if recipient is not None:
        value += f" for <{recipient}>"
    return f"{value}; {format_date(when)}"


def make_message_id(queue_id: str, hostname: str) -> str:
    """A Message-ID no other message will have: the queue id alone repeats across nodes."""
    return f"<{queue_id}.{secrets.token_hex(8)}@{hostname}>"


def format_date(when: datetime) -> str:
    """An RFC 5322 date; ``when`` must be aware, a naive time would claim zone -0000.

    Every message accepted within one second gets the same text, so the last
    one is kept: email.utils took 2% of a session's CPU under bench/ingest.
    """
    global _last_date
    if when.tzinfo is None:
        raise ValueError("format_date needs a timezone-aware datetime")
    key = (when.replace(microsecond=0), when.utcoffset())
    last = _last_date
    if last is not None and last[0] == key:
        return last[1]
    text = format_datetime(when)
    _last_date = (key, text)
    return text


_last_date: tuple[tuple[datetime, timedelta | None], str] | None = None


def rewrite(
    data: bytes,
    section: HeaderSection,
    *,
    remove: Callable[[str], bool],
    received: str,
    date: str | None,
    message_id: str | None,
) -> bytes:
    """The stored message: Received, the kept fields, additions, then the original body.

    ``section`` must come from parsing ``data``. ``date`` and ``message_id``
    are given only when the message lacks them. What follows the last field
    (the blank line and the body) is sliced through a memoryview so that the
    body is copied exactly once, into the result.
    """
    parts = [_field("Received", received)]
    header_length = 0
    for field in section.fields:
        header_length += len(field.raw)
        if not remove(field.name):
            parts.append(field.raw)
    if date is not None or message_id is not None:
        if not parts[-1].endswith(b"\n"):
            # The message ended inside its last field, with no line break.
            parts.append(b"\r\n")
        if date is not None:
            parts.append(_field("Date", date))
        if message_id is not None:
            parts.append(_field("Message-ID", message_id))
    return b"".join((*parts, memoryview(data)[header_length:]))


def _field(name: str, value: str) -> bytes:
    """``name: value`` folded at spaces into lines of at most 78 characters where possible."""
    line = f"{name}:"
    if len(line) + 1 + len(value) <= _MAX_LINE:
        return f"{line} {value}\r\n".encode("utf-8", "surrogateescape")
    lines: list[str] = []
    start = len(line)
    for word in value.split(" "):
        if word and len(line) + 1 + len(word) > _MAX_LINE and line[start:].strip(" "):
            lines.append(line)
            line, start = "", 0
        line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
