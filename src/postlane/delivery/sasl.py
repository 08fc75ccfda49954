"""The SASL side of outbound AUTH (RFC 4954): credentials, mechanism choice, responses.

Apart from the engine (``client_protocol.py``) so that the one place where a
password becomes bytes is small enough to read at a glance: nothing here logs,
and :class:`Credentials` never shows the password in a repr or traceback.

Only PLAIN (RFC 4616) and LOGIN (the de-facto mechanism every relay that
lacks PLAIN still offers) are spoken. Both send the password itself, which is
why the engine refuses them outside TLS unless the operator allowed it;
challenge-response mechanisms (CRAM-MD5, SCRAM) would need the password kept
in a form relays rarely accept, and submission relays offer PLAIN anyway.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "SUPPORTED",
    "Credentials",
    "choose_mechanism",
    "decode_challenge",
    "login_response",
    "offered_mechanisms",
    "plain_response",
]

# In order of preference: PLAIN needs one round trip, LOGIN three.
SUPPORTED = ("PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password for AUTH at a relay; the repr masks the password."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        # PLAIN separates its fields with NUL: one inside a field would shift
        # them, and the server would read part of the password as a user name.
        for name, value in (("username", self.username), ("password", self.password)):
            if not value:
                raise ValueError(f"the {name} for AUTH is empty")
            if "\0" in value:
                raise ValueError(f"the {name} for AUTH contains a NUL character")

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='********')"


def offered_mechanisms(extensions: Mapping[str, str]) -> list[str] | None:
    """The SASL mechanisms an EHLO reply lists, upper-cased; None when it has no AUTH.

    Also reads the pre-standard ``AUTH=PLAIN LOGIN`` line that some old
    servers send instead of (or besides) ``AUTH PLAIN LOGIN``.
    """
    found = False
    mechanisms: list[str] = []
    for keyword, params in extensions.items():
        if keyword == "AUTH":
            names = params.split()
        elif keyword.startswith("AUTH="):
            names = [keyword[5:], *params.split()]
        else:
            continue
        found = True
        for name in names:
            if name.upper() not in mechanisms:
                mechanisms.append(name.upper())
    return mechanisms if found else None


def choose_mechanism(offered: list[str]) -> str | None:
    """The best mechanism we speak among ``offered``; None when there is none."""
    return next((name for name in SUPPORTED if name in offered), None)


def plain_response(credentials: Credentials) -> bytes:
    """The PLAIN initial response: base64 of ``NUL username NUL password`` (RFC 4616 §2).

    No authorisation identity: we act as the user we authenticate as.
    """
    message = b"\0" + credentials.username.encode() + b"\0" + credentials.password.encode()
    return base64.b64encode(message)


def login_response(credentials: Credentials, step: int) -> bytes:
    """LOGIN's answer to its ``step``-th challenge (0: the user name, 1: the password)."""
    value = credentials.username if step == 0 else credentials.password
    return base64.b64encode(value.encode())


def decode_challenge(text: str) -> bytes:
    """A 334 challenge's payload; ValueError when it is not base64.

    LOGIN's prompts ("Username:", "Password:") carry no information we use,
    but a challenge that is not base64 means the server is not in the SASL
    exchange we think it is, and answering it would send a credential blind.
    """
    try:
        return base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("the challenge is not base64") from None
