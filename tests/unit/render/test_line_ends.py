"""SMTP line ends: every bare CR and bare LF becomes CRLF; CRLF content is returned as is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.render.line_ends import crlf_lines


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", b""),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb"),
        (b"a\n\rb", b"a\r\n\r\nb"),
        (b"no line end", b"no line end"),
    ],
)
def test_crlf_lines(data: bytes, expected: bytes) -> None:
    assert crlf_lines(data) == expected


def test_crlf_content_is_the_same_object() -> None:
    data = b"From: a@example.com\r\n\r\nbody\r\n" * 100
    assert crlf_lines(data) is data


@given(st.lists(st.sampled_from([b"x", b"\r", b"\n", b"\r\n", b"."]), max_size=30))
def test_no_bare_cr_or_lf_is_left_and_a_second_pass_changes_nothing(pieces: list[bytes]) -> None:
    once = crlf_lines(b"".join(pieces))
    assert b"\r" not in once.replace(b"\r\n", b"") and b"\n" not in once.replace(b"\r\n", b"")
    assert crlf_lines(once) == once
