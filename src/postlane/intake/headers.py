"""The header section of a submitted message, parsed once on the hot path.

Why not the ``email`` package: its parser builds an object tree of the whole
message, copies the body several times and repairs what it does not
understand. Intake only needs the header fields, must keep every byte it does
not change exactly as the client sent it (DKIM signatures the client made, the
body of a 30 MB attachment), and must *reject* a malformed header section
rather than guess. So the section is split off at the first blank line with
``bytes.find`` and its fields are matched with one compiled expression; the
body is never looked at here.

Input is the message after dot-unstuffing with CRLF line endings (see
:func:`normalise_line_endings`). A bare CR or LF left in the header section is
rejected: RFC 5322 section 2.2 forbids it, and a receiver that reads it as a
line break would see different headers from the ones checked here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postlane.errors import MessageRejected

__all__ = [
    "MAX_HEADER_SECTION",
    "Field",
    "HeaderSection",
    "normalise_line_endings",
    "parse_header_section",
]

MAX_HEADER_SECTION = 1024 * 1024
"""Bytes a header section may take; more is an attack or a broken client, not mail."""

# One field: a name of printable ASCII except ':' (RFC 5322 section 2.2), the
# colon, then the first line and every continuation line (starting with SP or
# HTAB). Possessive quantifiers keep a hostile section from backtracking.
# Groups: the whole field, its name, its folded value.
_FIELD = re.compile(rb"(([!-9;-~]++):([^\r\n]*+(?:\r\n[ \t][^\r\n]*+)*+)(?:\r\n|\Z))")


@dataclass(frozen=True, slots=True)
class Field:
    """One header field.

    ``raw`` is kept so that a field intake does not change is written back
    byte for byte, folding included: a client's own DKIM signature covers it.
    """

    name: str
    value: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class HeaderSection:
    """The fields in their original order and where the body starts in the message.

    The fields' raw bytes laid end to end are exactly the start of the
    message; what lies between them and ``body_offset`` is the blank line, or
    nothing for a message that has no body.
    """

    fields: tuple[Field, ...]
    body_offset: int


def normalise_line_endings(data: bytes) -> bytes:
    """Turn bare LF into CRLF, returning ``data`` itself when there is none.

    Unix tools and some libraries hand over LF-only messages; everything after
    intake (header parsing, DKIM, the SMTP client) assumes CRLF. The common
    case is already CRLF, so two C-speed counts decide without copying.
    """
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def parse_header_section(data: bytes) -> HeaderSection:
    """Parse the header section of ``data``, rejecting one a receiver could misread.

    A message without a blank line is all header section with an empty body
    (RFC 5322 section 3.5 makes the body optional).
    """
    if data.startswith(b"\r\n"):
        return HeaderSection((), 2)
    blank = data.find(b"\r\n\r\n", 0, MAX_HEADER_SECTION + 2)
    if blank >= 0:
        end = blank + 2
        body_offset = blank + 4
    elif len(data) > MAX_HEADER_SECTION:
        raise MessageRejected(550, "5.6.0", "Header section is larger than 1 MiB")
    else:
        end = body_offset = len(data)
    # findall runs the whole loop in C. Its matches never overlap and come in
    # order, so they cover the section exactly when their lengths add up to
    # it; otherwise something between them is not a field.
    fields = []
    covered = 0
    for raw, name, value in _FIELD.findall(data, 0, end):
        covered += len(raw)
        fields.append(
            Field(
                name.decode("ascii"),
                value.replace(b"\r\n", b"").strip(b" \t").decode("utf-8", "surrogateescape"),
                raw,
            )
        )
    if covered != end:
        raise _malformed(data, end)
    return HeaderSection(tuple(fields), body_offset)


def _malformed(data: bytes, end: int) -> MessageRejected:
    """Say which line of the section before ``end`` is wrong, and how.

    Only reached for a bad message, so it may walk the fields one by one.
    """
    start = 0
    while (found := _FIELD.match(data, start, end)) is not None:
        start = found.end()
    number = data.count(b"\r\n", 0, start) + 1
    lines = data[start:end].split(b"\r\n")
    first = lines[0]
    if first[:1] in (b" ", b"\t"):
        # Continuation lines are consumed with the field above them, so one
        # can only be left over at the very start of the section.
        return MessageRejected(
            550, "5.6.0", "Header section starts with a continuation line, not a header field"
        )
    for offset, line in enumerate(lines):
        if offset and line[:1] not in (b" ", b"\t"):
            break
        if b"\r" in line or b"\n" in line:
            return MessageRejected(
                550, "5.6.0", f"Header line {number + offset} contains a bare CR or LF"
            )
    return MessageRejected(
        550,
        "5.6.0",
        f"Header line {number} is neither a header field (Name: value) nor a continuation line",
    )
