"""Reading addresses an operator typed or exported: one address per entry, bad lines named."""

from __future__ import annotations

import pytest

from postlane.errors import InvalidInput
from postlane.tenants.suppression_lists import BadLine, address, read_addresses


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("Bob@Example.org", "bob@example.org"),
        ("  ann@example.org\t", "ann@example.org"),
        ('"bob smith"@example.org', '"bob smith"@example.org'),
        ("postmaster@[192.0.2.1]", "postmaster@[192.0.2.1]"),
        ("ÉLODIE@exemple.fr", "élodie@exemple.fr"),
    ],
)
def test_one_address(given: str, stored: str) -> None:
    assert address(given) == stored


@pytest.mark.parametrize(
    "given",
    [
        "",
        "bob",
        "@example.org",
        "bob@",
        "Bob <bob@example.org>",
        "a@example.org, b@example.org",
        "a@example.org;b@example.org",
        "bob smith@example.org",
        "bob@exa mple.org",
        "bob(comment)@example.org",
        'bo"b@example.org',
        "bob@example.org\x00",
    ],
)
def test_not_one_address(given: str) -> None:
    with pytest.raises(InvalidInput, match="invalid address"):
        address(given)


def test_lines_and_csv_rows() -> None:
    lines = [
        b"\xef\xbb\xbfann@example.org\n",
        b"  \n",
        b"   # a comment\n",
        b'"Bob@Example.org",Bob\r\n',
        b"cy@example.org,\n",
        b'"unclosed@example.org\n',
        b"\xff\xfe\n",
        b"dora@example.org",
    ]
    assert list(read_addresses(lines)) == [
        "ann@example.org",
        "bob@example.org",
        "cy@example.org",
        BadLine(6, "not a CSV row: unexpected end of data"),
        BadLine(7, "not UTF-8 text"),
        "dora@example.org",
    ]
