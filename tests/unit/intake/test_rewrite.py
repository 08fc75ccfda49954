"""Rewriting: Received on top, control headers out, additions, body byte-exact."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.intake.headers import parse_header_section
from postlane.intake.rewrite import format_date, make_message_id, received_header, rewrite

WHEN = datetime(2025, 11, 24, 10, 30, 0, tzinfo=UTC)
BODY = (
    b"Hello,\r\n"
    b"\r\n"
    b"From the team\r\n"
    b"From: not a header\r\n"
    b".leading dot\r\n"
    b"\r\n\r\n"
    b"\xff\xfe binary-ish \x00 bytes\r\n"
)
MESSAGE = (
    b"From: Alice <alice@acme.com>\r\n"
    b"X-OV-Tag: newsletter\r\n"
    b"Subject: a subject\r\n"
    b"  folded over two lines\r\n"
    b"x-ov-TESTMODE: yes\r\n"
    b"To: bob@example.org\r\n"
    b"\r\n" + BODY
)


def _control(name: str) -> bool:
    return name.lower().startswith("x-ov-")


def _never(name: str) -> bool:
    return False


def test_control_headers_out_received_on_top_additions_last() -> None:
    section = parse_header_section(MESSAGE)
    result = rewrite(
        MESSAGE,
        section,
        remove=_control,
        received="from a ([192.0.2.1]) by h (Postlane); x",
        date="Mon, 24 Nov 2025 10:30:00 +0000",
        message_id="<q.1@h>",
    )
    assert result == (
        b"Received: from a ([192.0.2.1]) by h (Postlane); x\r\n"
        b"From: Alice <alice@acme.com>\r\n"
        b"Subject: a subject\r\n"
        b"  folded over two lines\r\n"
        b"To: bob@example.org\r\n"
        b"Date: Mon, 24 Nov 2025 10:30:00 +0000\r\n"
        b"Message-ID: <q.1@h>\r\n"
        b"\r\n" + BODY
    )


def test_only_the_missing_field_is_added() -> None:
    data = b"From: a@b.c\r\nDate: Mon, 24 Nov 2025 10:30:00 +0000\r\n\r\nbody"
    result = rewrite(
        data,
        parse_header_section(data),
        remove=_never,
        received="r",
        date=None,
        message_id="<m@h>",
    )
    assert result == b"Received: r\r\n" + data[:-6] + b"Message-ID: <m@h>\r\n\r\nbody"


def test_headers_only_message_without_final_line_break() -> None:
    data = b"From: a@b.c\r\nSubject: x"
    section = parse_header_section(data)
    kept = rewrite(data, section, remove=_never, received="r", date=None, message_id=None)
    assert kept == b"Received: r\r\n" + data
    added = rewrite(data, section, remove=_never, received="r", date="d", message_id=None)
    assert added == b"Received: r\r\n" + data + b"\r\nDate: d\r\n"


def test_empty_header_section_gets_the_new_fields() -> None:
    data = b"\r\nbody only"
    result = rewrite(
        data,
        parse_header_section(data),
        remove=_never,
        received="r",
        date="d",
        message_id="<m@h>",
    )
    assert result == b"Received: r\r\nDate: d\r\nMessage-ID: <m@h>\r\n\r\nbody only"


def test_long_received_is_folded_at_spaces() -> None:
    value = received_header(
        helo="mail-client.customer-network.example.com",
        client_ip="2001:db8::25",
        hostname="smtp-eu-1.postlane.example.net",
        protocol="ESMTPSA",
        queue_id="01JD8Y5Q2W7Z3K4M5N6P7R8S9T",
        recipient="a.very.long.recipient.address@some-recipient-domain.example.org",
        when=WHEN,
    )
    data = b"From: a@b.c\r\n\r\nbody"
    result = rewrite(
        data, parse_header_section(data), remove=_never, received=value, date=None, message_id=None
    )
    head = result[: result.index(b"From: ")]
    lines = head.split(b"\r\n")[:-1]
    assert len(lines) > 2
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert all(line.strip() for line in lines)
    reparsed = parse_header_section(result)
    assert reparsed.fields[0].name == "Received"
    assert reparsed.fields[0].value == value


def test_unbreakable_word_stays_whole() -> None:
    word = "x" * 100
    data = b"From: a@b.c\r\n\r\n"
    result = rewrite(
        data,
        parse_header_section(data),
        remove=_never,
        received=f"{word} by h",
        date=None,
        message_id=None,
    )
    assert result.startswith(f"Received: {word}\r\n by h\r\n".encode())


def test_received_header_wording() -> None:
    value = received_header(
        helo="client.example",
        client_ip="192.0.2.1",
        hostname="smtp.postlane.test",
        protocol="ESMTPSA",
        queue_id="Q123",
        recipient="bob@example.org",
        when=WHEN,
    )
    assert value == (
        "from client.example ([192.0.2.1]) by smtp.postlane.test (Postlane) "
        "with ESMTPSA id Q123 for <bob@example.org>; Mon, 24 Nov 2025 10:30:00 +0000"
    )


def test_received_header_without_single_recipient_and_ipv6() -> None:
    value = received_header(
        helo="[IPv6:2001:db8::1]",
        client_ip="2001:db8::1",
        hostname="h.test",
        protocol="ESMTP",
        queue_id="Q",
        recipient=None,
        when=WHEN.astimezone(timezone(timedelta(hours=8))),
    )
    assert value == (
        "from [IPv6:2001:db8::1] ([IPv6:2001:db8::1]) by h.test (Postlane) with ESMTP id Q; "
        "Mon, 24 Nov 2025 18:30:00 +0800"
    )


@pytest.mark.parametrize("protocol", ["ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"])
def test_every_rfc3848_keyword_is_accepted(protocol: str) -> None:
    value = received_header(
        helo="c",
        client_ip="192.0.2.1",
        hostname="h",
        protocol=protocol,
        queue_id="Q",
        recipient=None,
        when=WHEN,
    )
    assert f" with {protocol} id Q;" in value


@pytest.mark.parametrize("protocol", ["SMTP", "esmtpsa", "LMTP", ""])
def test_other_protocol_words_are_a_bug(protocol: str) -> None:
    with pytest.raises(ValueError, match="RFC 3848"):
        received_header(
            helo="c",
            client_ip="192.0.2.1",
            hostname="h",
            protocol=protocol,
            queue_id="Q",
            recipient=None,
            when=WHEN,
        )


def test_message_id_is_unique_and_well_formed() -> None:
    first = make_message_id("Q1", "smtp.postlane.test")
    assert re.fullmatch(r"<Q1\.[0-9a-f]{16}@smtp\.postlane\.test>", first)
    assert make_message_id("Q1", "smtp.postlane.test") != first


def test_format_date_needs_an_aware_time() -> None:
    assert format_date(WHEN) == "Mon, 24 Nov 2025 10:30:00 +0000"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_date(datetime(2025, 11, 24))


_NAME = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"),
    min_size=1,
    max_size=20,
)
_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_FIELD = st.builds(
    lambda name, first, more: name.encode() + b":" + first + b"".join(b"\r\n\t" + m for m in more),
    _NAME,
    _LINE,
    st.lists(_LINE, max_size=2),
)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(_FIELD, max_size=15))
    header = b"".join(field + b"\r\n" for field in fields)
    if draw(st.booleans()):
        return header
    return header + b"\r\n" + draw(st.binary(max_size=500))


@given(_messages())
def test_rewrite_without_changes_reproduces_the_message(data: bytes) -> None:
    section = parse_header_section(data)
    result = rewrite(data, section, remove=_never, received="r", date=None, message_id=None)
    assert result == b"Received: r\r\n" + data


@given(_messages(), st.sampled_from(["a", "b", "c"]))
def test_removal_keeps_the_rest_byte_exact(data: bytes, letter: str) -> None:
    section = parse_header_section(data)

    def remove(name: str) -> bool:
        return name.startswith(letter)

    result = rewrite(data, section, remove=remove, received="r", date=None, message_id=None)
    kept = b"".join(f.raw for f in section.fields if not remove(f.name))
    header_length = sum(len(f.raw) for f in section.fields)
    assert result == b"Received: r\r\n" + kept + data[header_length:]


def test_format_date_of_the_same_second_is_reused_only_for_the_same_zone_and_second() -> None:
    paris = timezone(timedelta(hours=1))
    assert format_date(WHEN) == "Mon, 24 Nov 2025 10:30:00 +0000"
    assert format_date(WHEN + timedelta(microseconds=999)) == "Mon, 24 Nov 2025 10:30:00 +0000"
    assert format_date(WHEN.astimezone(paris)) == "Mon, 24 Nov 2025 11:30:00 +0100"
    assert format_date(WHEN + timedelta(seconds=1)) == "Mon, 24 Nov 2025 10:30:01 +0000"
    assert format_date(WHEN) == "Mon, 24 Nov 2025 10:30:00 +0000"
