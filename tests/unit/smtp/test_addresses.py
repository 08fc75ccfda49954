"""Envelope path syntax (RFC 5321 section 4.1.2, RFC 6531)."""

from __future__ import annotations

import pytest

from postlane.smtp.addresses import AddressError, split_path


def mailbox(text: str) -> str:
    return split_path(text, null_allowed=True, postmaster_allowed=True)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<user@example.com>", "user@example.com"),
        ("<first.last+tag@sub.example.co.uk>", "first.last+tag@sub.example.co.uk"),
        ("<!#$%&'*+/=?^_`{|}~-@example.com>", "!#$%&'*+/=?^_`{|}~-@example.com"),
        ('<"john doe"@example.com>', '"john doe"@example.com'),
        ('<"a\\"b@c>"@example.com>', '"a\\"b@c>"@example.com'),
        ('<""@example.com>', '""@example.com'),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("<user@[ipv6:::1]>", "user@[ipv6:::1]"),
        ("<@relay.example,@other.example:user@example.com>", "user@example.com"),
        ("<user@xn--bcher-kva.example>", "user@xn--bcher-kva.example"),
        ("<user@a-b.example>", "user@a-b.example"),
        ("<user@localhost>", "user@localhost"),
        ("<δοκιμή@παράδειγμα.δοκιμή>", "δοκιμή@παράδειγμα.δοκιμή"),
        ("<用户@例子.广告>", "用户@例子.广告"),
    ],
)
def test_valid_paths(text: str, expected: str) -> None:
    assert mailbox(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "user@example.com",
        "<user@example.com",
        "<user>",
        "<@example.com>",
        "<user@>",
        "<.user@example.com>",
        "<user.@example.com>",
        "<us..er@example.com>",
        "<us er@example.com>",
        "<user@exa mple.com>",
        "<user@example..com>",
        "<user@.example.com>",
        "<user@example.com.>",
        "<user@-example.com>",
        "<user@example-.com>",
        "<user@exa_mple.com>",
        "<user@[300.1.1.1]>",
        "<user@[192.0.2]>",
        "<user@[IPv6:nonsense]>",
        "<user@[IPv6:fe80::1%eth0]>",
        "<user@[tag:content]>",
        '<"unterminated@example.com>',
        '<"bad\x01char"@example.com>',
        "<user@example.com>trailing",
        "<a@b@example.com>",
        "<user\udc80@example.com>",
        "<user@" + "a" * 64 + ".example>",
        "<user@" + ".".join(["a" * 60] * 5) + ">",
        "",
        "<",
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(AddressError):
        mailbox(text)


def test_long_labels_at_the_limit_are_accepted() -> None:
    domain = ".".join(["a" * 63] * 3) + "." + "b" * 61
    assert len(domain) == 253
    assert mailbox(f"<u@{domain}>") == f"u@{domain}"


def test_parameters_are_split_off() -> None:
    assert split_path(
        "<a@example.com>  SIZE=10 BODY=8BITMIME", null_allowed=False, postmaster_allowed=False
    ) == ("a@example.com", "SIZE=10 BODY=8BITMIME")


def test_null_path_only_where_allowed() -> None:
    assert split_path("<> SIZE=1", null_allowed=True, postmaster_allowed=False) == ("", "SIZE=1")
    with pytest.raises(AddressError):
        split_path("<>", null_allowed=False, postmaster_allowed=True)


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_postmaster_without_domain_only_where_allowed(text: str) -> None:
    assert split_path(text, null_allowed=False, postmaster_allowed=True) == (text[1:-1], "")
    with pytest.raises(AddressError):
        split_path(text, null_allowed=True, postmaster_allowed=False)


def test_postmaster_with_domain_is_an_ordinary_mailbox() -> None:
    assert mailbox("<postmaster@example.com>") == "postmaster@example.com"


def test_error_does_not_echo_the_input() -> None:
    with pytest.raises(AddressError) as info:
        mailbox("<secret-looking-text>")
    assert "secret-looking-text" not in str(info.value)


def test_pathological_input_is_fast() -> None:
    # Possessive quantifiers: no catastrophic backtracking on near-misses.
    for text in ("<" + "a." * 5000 + "@", "<a@" + "b-" * 5000 + "!>", '<"' + "\\a" * 5000):
        with pytest.raises(AddressError):
            mailbox(text)
