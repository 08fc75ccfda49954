"""Message rules: field counts, From and Date syntax, loops, 8-bit data, the From address."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.errors import MessageRejected
from postlane.intake.checks import check_message, header_from_address
from postlane.intake.headers import Field, HeaderSection, parse_header_section
from postlane.intake.rewrite import received_header

HOST = "smtp.postlane.test"
HEADERS = (
    b"From: Alice <alice@acme.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Hello\r\n"
    b"Date: Mon, 24 Nov 2025 10:30:00 +0000\r\n"
    b"Message-ID: <1@acme.com>\r\n"
)


def _check(data: bytes, *, eight_bit: bool = False, max_received: int = 30) -> list[str]:
    section = parse_header_section(data)
    return check_message(
        section, data, eight_bit_allowed=eight_bit, hostname=HOST, max_received=max_received
    )


def _rejected(data: bytes, *, max_received: int = 30, eight_bit: bool = False) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        _check(data, max_received=max_received, eight_bit=eight_bit)
    return info.value


def _reply(exc: MessageRejected) -> str:
    return f"{exc.code} {exc.enhanced} {exc.text}"


def test_good_message_needs_nothing_added() -> None:
    assert _check(HEADERS + b"\r\nbody\r\n") == []


def test_missing_date_and_message_id_are_named() -> None:
    data = b"From: alice@acme.com\r\n\r\nbody"
    assert _check(data) == ["Date", "Message-ID"]
    assert _check(b"From: alice@acme.com\r\nmessage-id: <x@y>\r\n\r\n") == ["Date"]


def test_no_from() -> None:
    exc = _rejected(b"To: bob@example.org\r\n\r\nbody")
    assert _reply(exc) == "550 5.6.0 Message has no From header"


def test_two_from_headers() -> None:
    exc = _rejected(HEADERS + b"FROM: mallory@evil.com\r\n\r\n")
    assert _reply(exc) == "550 5.6.0 Message has 2 From headers; only one is allowed"


@pytest.mark.parametrize(
    ("extra", "spelling", "count"),
    [
        (b"To: c@d.e\r\n", "To", 2),
        (b"cc: c@d.e\r\nCC: f@g.h\r\n", "Cc", 2),
        (b"Subject: again\r\nsubject: and again\r\n", "Subject", 3),
        (b"Date: Tue, 25 Nov 2025 10:30:00 +0000\r\n", "Date", 2),
        (b"Message-Id: <2@acme.com>\r\n", "Message-ID", 2),
        (b"Sender: a@acme.com\r\nSender: b@acme.com\r\n", "Sender", 2),
        (b"Reply-To: a@acme.com\r\nReply-To: b@acme.com\r\n", "Reply-To", 2),
        (b"Bcc: a@acme.com\r\nBcc: b@acme.com\r\n", "Bcc", 2),
    ],
)
def test_fields_allowed_at_most_once(extra: bytes, spelling: str, count: int) -> None:
    exc = _rejected(HEADERS + extra + b"\r\n")
    assert _reply(exc) == f"550 5.6.0 Message has {count} {spelling} headers; only one is allowed"


def test_repeatable_fields_are_fine() -> None:
    extra = b"X-OV-Tag: a\r\nX-OV-Tag: b\r\nComments: 1\r\nComments: 2\r\nKeywords: k\r\n"
    assert _check(HEADERS + extra + b"\r\n") == []


@pytest.mark.parametrize(
    "value",
    [b"", b"undisclosed-recipients:;", b"Alice", b"<@acme.com>", b"alice@", b"Alice <alice>"],
)
def test_from_without_a_mailbox(value: bytes) -> None:
    exc = _rejected(b"From: " + value + b"\r\n\r\n")
    assert _reply(exc) == "550 5.6.0 From header has no valid address"


@pytest.mark.parametrize(
    "value",
    [
        b"alice@acme.com",
        b'"Smith, Alice" <alice@acme.com>, bob@acme.com',
        b"=?utf-8?q?Al=C3=AFce?= <alice@acme.com>",
        b"Team: alice@acme.com, bob@acme.com;",
    ],
)
def test_from_with_a_mailbox(value: bytes) -> None:
    assert _check(b"From: " + value + b"\r\nDate: 1 Jan 2025 00:00 +0000\r\n\r\n") == ["Message-ID"]


@pytest.mark.parametrize(
    "value",
    [b"yesterday", b"Mon, 24 Nov 2025 25:30:00 +0000", b"1 Jan 99999999999 00:00 +0000", b""],
)
def test_invalid_date(value: bytes) -> None:
    exc = _rejected(b"From: a@b.c\r\nDate: " + value + b"\r\n\r\n")
    assert _reply(exc) == "550 5.6.0 Date header is not a valid RFC 5322 date"


def _our_received(host: str = HOST) -> bytes:
    value = received_header(
        helo="client.example",
        client_ip="192.0.2.1",
        hostname=host,
        protocol="ESMTPSA",
        queue_id="Q1",
        recipient="someone.with.a.very.long.address@recipient-domain.example.org",
        when=datetime(2025, 11, 24, tzinfo=UTC),
    )
    assert len(value) > 78
    # Folded as rewrite writes it: the marker must survive unfolding.
    words = value.split(" ")
    return ("Received: " + " ".join(words[:4]) + "\r\n " + " ".join(words[4:]) + "\r\n").encode()


def test_loop_is_detected_at_max_received() -> None:
    two = _our_received() * 2
    assert _check(two + HEADERS + b"\r\n", max_received=3) == []
    exc = _rejected(two + _our_received() + HEADERS + b"\r\n", max_received=3)
    assert _reply(exc) == "554 5.4.6 Too many hops: mail loop detected"


def test_other_hosts_received_fields_do_not_count() -> None:
    others = _our_received("other.example") + b"Received: from x by y; 1 Jan 2025 00:00 +0000\r\n"
    assert _check(others * 5 + HEADERS + b"\r\n", max_received=2) == []


def test_eight_bit_data_needs_the_parameter() -> None:
    for data in (HEADERS + "\r\nGrüße\r\n".encode(), "Keywords: ü\r\n".encode() + HEADERS):
        exc = _rejected(data)
        assert _reply(exc) == (
            "550 5.6.0 Message contains 8-bit data but BODY=8BITMIME or SMTPUTF8 was not given"
        )
        assert _check(data, eight_bit=True) == []


def test_header_text_must_be_utf8_even_with_8bitmime() -> None:
    # Latin-1 "café" in a header: once accepted, then 451 at every commit
    # (the database cannot store text that is not UTF-8).
    data = b"Keywords: caf\xe9 news\r\n" + HEADERS + b"\r\nBody\r\n"
    exc = _rejected(data, eight_bit=True)
    assert _reply(exc) == (
        "550 5.6.0 Keywords header is not valid UTF-8; write non-ASCII header text"
        " in UTF-8 or as an RFC 2047 encoded word"
    )
    assert _check("Keywords: café\r\n".encode() + HEADERS + b"\r\n\xe9\r\n", eight_bit=True) == []


def test_a_nul_byte_in_a_header_is_refused_naming_the_field() -> None:
    # SQLite stored it; PostgreSQL refused every commit of it with 451.
    data = HEADERS.replace(b"Subject: Hello", b"Subject: Hel\x00lo") + b"\r\nBody\r\n"
    assert _reply(_rejected(data)) == "550 5.6.0 Subject header contains a NUL byte"
    assert _check(HEADERS + b"\r\nA NUL in the body \x00 is the body's business\r\n") == []


def test_header_from_address() -> None:
    section = parse_header_section(b'From: "B" <Bob.Smith@Example.COM>, c@d.e\r\n\r\n')
    assert header_from_address(section) == "Bob.Smith@example.com"
    section = parse_header_section(b"To: x@y.z\r\nfrom: x@Y.Z\r\n\r\n")
    assert header_from_address(section) == "x@y.z"


def test_header_from_address_without_one() -> None:
    with pytest.raises(MessageRejected, match="Message has no From header"):
        header_from_address(parse_header_section(b"To: x@y.z\r\n\r\n"))
    with pytest.raises(MessageRejected, match="From header has no valid address"):
        header_from_address(parse_header_section(b"From: nobody\r\n\r\n"))


_NAMES = st.sampled_from(["From", "To", "Cc", "Date", "Message-ID", "Received", "X-Other"])


@given(st.lists(st.tuples(_NAMES, st.text(max_size=60)), max_size=8), st.booleans())
def test_any_field_values_only_ever_reject(fields: list[tuple[str, str]], eight_bit: bool) -> None:
    section = HeaderSection(
        tuple(Field(name, value, f"{name}: {value}\r\n".encode()) for name, value in fields), 0
    )
    data = b"".join(f.raw for f in section.fields)
    try:
        added = check_message(
            section, data, eight_bit_allowed=eight_bit, hostname=HOST, max_received=2
        )
    except MessageRejected:
        return
    assert set(added) <= {"Date", "Message-ID"}
    assert header_from_address(section).count("@") >= 1


def test_long_from_value_is_parsed_too() -> None:
    name = "A" * 300
    section = parse_header_section(f"From: {name} <a@B.example>\r\n\r\n".encode())
    assert header_from_address(section) == "a@b.example"
    section = parse_header_section(f"From: {name}\r\n\r\n".encode())
    with pytest.raises(MessageRejected, match="From header has no valid address"):
        header_from_address(section)
