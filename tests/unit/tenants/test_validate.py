from __future__ import annotations

import pytest

from postlane.errors import InvalidInput
from postlane.tenants import validate


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Example.COM", "example.com"),
        ("mail.example.co.uk.", "mail.example.co.uk"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("a-b.example.org", "a-b.example.org"),
    ],
)
def test_domain_names(given: str, expected: str) -> None:
    assert validate.domain_name(given) == expected


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("localhost", "at least two labels"),
        ("exa mple.com", "label 'exa mple'"),
        ("-bad.com", "label '-bad'"),
        ("a..com", "label ''"),
        ("192.0.2.1", "an IP address is not a domain"),
        ("", "at least two labels"),
        ("x" * 64 + ".com", "1-63"),
    ],
)
def test_invalid_domains_say_why(given: str, why: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate.domain_name(given)
    assert why in str(info.value)
    assert repr(given) in str(info.value)


@pytest.mark.parametrize("value", ["0", "6", "high", "-1"])
def test_bad_priority(value: str) -> None:
    with pytest.raises(InvalidInput, match="invalid priority"):
        validate.priority(value)


def test_priority_range() -> None:
    assert [validate.priority(p) for p in ("1", 3, "5")] == [1, 3, 5]


def test_semicolon_lists() -> None:
    assert validate.authorised_domains("yourCompany.com; marketing.yourCompany.com;;") == (
        "yourcompany.com",
        "marketing.yourcompany.com",
    )
    assert validate.authorised_senders("info@YourCompany.com;sales@yourcompany.com") == (
        "info@yourcompany.com",
        "sales@yourcompany.com",
    )
    with pytest.raises(InvalidInput, match="invalid email address 'nobody'"):
        validate.authorised_senders("info@a.com;nobody")


@pytest.mark.parametrize("wide", ["0.0.0.0/0", "128.0.0.0/1", "10.0.0.0/7", "::/0", "2001::/31"])
def test_a_network_too_wide_to_trust_is_refused(wide: str) -> None:
    # 0.0.0.0/0 was taken: anyone could then send as the account without AUTH.
    with pytest.raises(InvalidInput, match="too wide to trust"):
        validate.networks(f"192.0.2.7, {wide}")
    assert validate.networks("10.0.0.0/8, 2001:db8::/32") == ("10.0.0.0/8", "2001:db8::/32")


def test_networks_and_timezone() -> None:
    assert validate.networks("10.1.0.0/16, 192.0.2.7") == ("10.1.0.0/16", "192.0.2.7/32")
    with pytest.raises(InvalidInput, match=r"invalid network '10\.1\.0\.0/33'"):
        validate.networks("10.1.0.0/33")
    assert validate.timezone("Asia/Taipei") == "Asia/Taipei"
    with pytest.raises(InvalidInput, match="invalid time zone 'Mars/Base'"):
        validate.timezone("Mars/Base")


@pytest.mark.parametrize("value", ["", "a b", "x\x00y", "u" * 255])
def test_bad_usernames(value: str) -> None:
    with pytest.raises(InvalidInput, match="invalid username"):
        validate.username(value)
