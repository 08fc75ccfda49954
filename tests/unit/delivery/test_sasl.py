"""The SASL pieces of outbound AUTH: credentials, the EHLO's AUTH list, the responses."""

from __future__ import annotations

import base64

import pytest

from postlane.delivery.sasl import (
    Credentials,
    choose_mechanism,
    decode_challenge,
    login_response,
    offered_mechanisms,
    plain_response,
)


def test_credentials_never_show_the_password() -> None:
    credentials = Credentials("relay-user", "hunter2")
    for shown in (repr(credentials), str(credentials), repr([credentials])):
        assert "hunter2" not in shown
        assert "relay-user" in shown


@pytest.mark.parametrize(
    ("username", "password", "problem"),
    [
        ("", "pw", "the username for AUTH is empty"),
        ("user", "", "the password for AUTH is empty"),
        ("us\0er", "pw", "the username for AUTH contains a NUL"),
        ("user", "p\0w", "the password for AUTH contains a NUL"),
    ],
)
def test_credentials_that_plain_cannot_carry_are_refused(
    username: str, password: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        Credentials(username, password)


@pytest.mark.parametrize(
    ("extensions", "offered"),
    [
        ({"PIPELINING": ""}, None),
        ({"AUTH": ""}, []),
        ({"AUTH": "plain Login"}, ["PLAIN", "LOGIN"]),
        ({"AUTH=LOGIN": "PLAIN"}, ["LOGIN", "PLAIN"]),
        ({"AUTH": "LOGIN CRAM-MD5", "AUTH=LOGIN": ""}, ["LOGIN", "CRAM-MD5"]),
    ],
)
def test_offered_mechanisms(extensions: dict[str, str], offered: list[str] | None) -> None:
    assert offered_mechanisms(extensions) == offered


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["LOGIN", "PLAIN"], "PLAIN"),
        (["CRAM-MD5", "LOGIN"], "LOGIN"),
        (["CRAM-MD5", "SCRAM-SHA-256"], None),
        ([], None),
    ],
)
def test_choose_mechanism_prefers_plain(offered: list[str], chosen: str | None) -> None:
    assert choose_mechanism(offered) == chosen


def test_plain_and_login_responses() -> None:
    credentials = Credentials("user@example.com", "pässword")
    assert base64.b64decode(plain_response(credentials)) == b"\0user@example.com\0p\xc3\xa4ssword"
    assert base64.b64decode(login_response(credentials, 0)) == b"user@example.com"
    assert base64.b64decode(login_response(credentials, 1)) == "pässword".encode()


def test_challenges_must_be_base64() -> None:
    assert decode_challenge("VXNlcm5hbWU6") == b"Username:"
    assert decode_challenge("") == b""
    for bad in ("Username:", "VXNlcm5hbWU", "ünï"):
        with pytest.raises(ValueError, match="not base64"):
            decode_challenge(bad)
