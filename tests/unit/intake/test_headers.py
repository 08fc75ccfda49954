"""Header section parsing: fields, folding, raw bytes, limits, rejections, line endings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.errors import MessageRejected
from postlane.intake.headers import (
    MAX_HEADER_SECTION,
    Field,
    HeaderSection,
    normalise_line_endings,
    parse_header_section,
)

MESSAGE = (
    b"From: Alice <alice@acme.com>\r\nTo: bob@example.org\r\nSubject: Hello\r\n\r\nBody line\r\n"
)


def _rejection(data: bytes) -> MessageRejected:
    with pytest.raises(MessageRejected) as info:
        parse_header_section(data)
    assert (info.value.code, info.value.enhanced) == (550, "5.6.0")
    return info.value


def test_fields_in_order_with_values_and_raw_bytes() -> None:
    section = parse_header_section(MESSAGE)
    assert section.fields == (
        Field("From", "Alice <alice@acme.com>", b"From: Alice <alice@acme.com>\r\n"),
        Field("To", "bob@example.org", b"To: bob@example.org\r\n"),
        Field("Subject", "Hello", b"Subject: Hello\r\n"),
    )
    assert MESSAGE[section.body_offset :] == b"Body line\r\n"


def test_name_is_kept_as_written() -> None:
    section = parse_header_section(b"sUbJeCt: x\r\nX-Custom.Name_1: y\r\n\r\n")
    assert [f.name for f in section.fields] == ["sUbJeCt", "X-Custom.Name_1"]


def test_folded_value_is_unfolded_and_raw_keeps_the_folding() -> None:
    raw = b"Subject: a long\r\n  subject\r\n\tcontinued  \r\n"
    section = parse_header_section(raw + b"To: x@y.z\r\n\r\nbody")
    assert section.fields[0] == Field("Subject", "a long  subject\tcontinued", raw)
    assert section.fields[1].name == "To"


def test_value_is_stripped_and_may_be_empty() -> None:
    section = parse_header_section(b"X-Empty:\r\nX-Spaces: \t value \t\r\nA:b: c\r\n\r\n")
    assert [(f.name, f.value) for f in section.fields] == [
        ("X-Empty", ""),
        ("X-Spaces", "value"),
        ("A", "b: c"),
    ]


def test_values_are_utf8_with_surrogateescape() -> None:
    section = parse_header_section("Subject: Grüße\r\nX-Bad: \xff\r\n\r\n".encode("latin-1"))
    assert section.fields[1].value.encode("utf-8", "surrogateescape") == b"\xff"
    section = parse_header_section("Subject: Grüße 你好\r\n\r\n".encode())
    assert section.fields[0].value == "Grüße 你好"


def test_body_starts_after_the_first_blank_line_only() -> None:
    body = b"first\r\n\r\nFrom here on\r\nX-Not-A-Header: no\r\n\r\n"
    data = b"From: a@b.c\r\n\r\n" + body
    section = parse_header_section(data)
    assert len(section.fields) == 1
    assert data[section.body_offset :] == body


def test_headers_only_message_has_an_empty_body() -> None:
    data = b"From: a@b.c\r\nSubject: x\r\n"
    section = parse_header_section(data)
    assert [f.name for f in section.fields] == ["From", "Subject"]
    assert section.body_offset == len(data)


def test_last_field_without_line_break() -> None:
    section = parse_header_section(b"From: a@b.c\r\nSubject: x")
    assert section.fields[1] == Field("Subject", "x", b"Subject: x")
    assert section.body_offset == 23


def test_empty_header_section() -> None:
    assert parse_header_section(b"\r\nbody") == HeaderSection((), 2)
    assert parse_header_section(b"") == HeaderSection((), 0)


@pytest.mark.parametrize(
    "data",
    [
        b"From: a@b.c\r\nNot a header\r\n\r\n",
        b"From: a@b.c\r\nSub ject: x\r\n\r\n",
        b"From: a@b.c\r\n: no name\r\n\r\n",
        b"From a@b.c Mon Nov 24 10:00:00 2025\r\nSubject: x\r\n\r\n",
        b"From: a@b.c\r\nSubject\x7f: x\r\n\r\n",
    ],
)
def test_line_that_is_no_field_is_rejected_with_its_number(data: bytes) -> None:
    line = 1 if data.startswith(b"From ") else 2
    assert _rejection(data).text == (
        f"Header line {line} is neither a header field (Name: value) nor a continuation line"
    )


def test_continuation_before_any_field_is_rejected() -> None:
    assert "starts with a continuation line" in _rejection(b" folded: x\r\n\r\n").text
    assert "starts with a continuation line" in _rejection(b"\tx\r\nFrom: a@b.c\r\n\r\n").text


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"From: a@b.c\r\nSubject: x\ry\r\n\r\n", 2),
        (b"From: a@b.c\r\nSubject: x\r\n y\nz\r\n\r\n", 3),
        (b"From: a@b.c\nSubject: x\n\nbody", 1),
        (b"From: a@b.c\r\n\r", 2),
    ],
)
def test_bare_cr_or_lf_in_the_header_section_is_rejected(data: bytes, line: int) -> None:
    assert _rejection(data).text == f"Header line {line} contains a bare CR or LF"


def test_header_section_up_to_one_mib_is_accepted() -> None:
    field = b"X-Big: " + b"a" * (MAX_HEADER_SECTION - 9) + b"\r\n"
    assert len(field) == MAX_HEADER_SECTION
    section = parse_header_section(field + b"\r\nbody")
    assert section.body_offset == MAX_HEADER_SECTION + 2
    assert parse_header_section(field).body_offset == MAX_HEADER_SECTION


@pytest.mark.parametrize("after", [b"\r\nbody", b""])
def test_header_section_over_one_mib_is_rejected(after: bytes) -> None:
    field = b"X-Big: " + b"a" * (MAX_HEADER_SECTION - 8) + b"\r\n"
    assert _rejection(field + after).text == "Header section is larger than 1 MiB"


def test_large_body_does_not_count_against_the_header_limit() -> None:
    data = b"From: a@b.c\r\n\r\n" + b"x" * (2 * MAX_HEADER_SECTION)
    assert parse_header_section(data).body_offset == 15


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        (b"a\nb\n\nc\n", b"a\r\nb\r\n\r\nc\r\n"),
        (b"a\r\nb\nc\r\n", b"a\r\nb\r\nc\r\n"),
        (b"a\rb\n", b"a\rb\r\n"),
        (b"\n", b"\r\n"),
    ],
)
def test_bare_lf_becomes_crlf(given_: bytes, expected: bytes) -> None:
    assert normalise_line_endings(given_) == expected


def test_crlf_message_is_returned_without_a_copy() -> None:
    data = MESSAGE + b"x" * 10_000
    assert normalise_line_endings(data) is data
    bare_cr = b"a\rb\r\n"
    assert normalise_line_endings(bare_cr) is bare_cr


_PIECES = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b" ", b"\t", b":", b"From", b"X-A", b"a@b.c", b"\xff", b"\x00"]
)


@given(st.binary(max_size=2000) | st.lists(_PIECES, max_size=60).map(b"".join))
def test_arbitrary_bytes_parse_or_are_rejected(data: bytes) -> None:
    try:
        section = parse_header_section(data)
    except MessageRejected as exc:
        rejected = exc
    else:
        header = b"".join(f.raw for f in section.fields)
        assert data.startswith(header)
        assert data[len(header) : section.body_offset] in (b"", b"\r\n")
        return
    assert (rejected.code, rejected.enhanced) == (550, "5.6.0")


@given(st.binary(max_size=2000))
def test_normalised_bytes_have_no_bare_lf(data: bytes) -> None:
    result = normalise_line_endings(data)
    assert result.count(b"\n") == result.count(b"\r\n")
    assert result.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
