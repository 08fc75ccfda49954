"""Envelope path syntax: RFC 5321 section 4.1.2, widened by RFC 6531 for UTF-8.

Why not ``email.utils.parseaddr``: it parses RFC 5322 header syntax, which is
both looser (comments, display names, obsolete forms) and stricter (no address
literals) than an SMTP path, and it never says "this is invalid". An envelope
address decides where mail goes and whose reputation it spends, so it is
checked against the SMTP grammar exactly.

The grammar is one compiled regular expression, so a path is validated in C in
a single pass; possessive quantifiers keep malicious input from backtracking.
Non-ASCII is always accepted here; whether it is *allowed* depends on the
SMTPUTF8 parameter of the transaction, which only the protocol engine knows.

Deliberately not enforced: the 64-octet local-part and 256-octet path limits.
RFC 5321 section 4.5.3.1 asks servers to avoid such limits where they can, real
senders (VERP bounce addresses) exceed them, and the command-line limit bounds
the work anyway. DNS limits (63-octet labels, 255-octet names) are enforced
because no such domain can exist.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["AddressError", "split_path"]

# Non-ASCII code points, without the surrogates that stand for undecodable bytes.
_NON_ASCII = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATOM = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-" + _NON_ASCII + "]++"
_DOT_STRING = _ATOM + r"(?:\." + _ATOM + ")*+"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + _NON_ASCII + r"]|\\[\x20-\x7e])*+" + '"'
_LABEL = "[A-Za-z0-9\\-" + _NON_ASCII + "]++"
_DOMAIN = _LABEL + r"(?:\." + _LABEL + ")*+"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]++\]"
_SOURCE_ROUTE = "@" + _DOMAIN + "(?:,@" + _DOMAIN + ")*+:"

_PATH = re.compile(
    "<(?:"
    + _SOURCE_ROUTE
    + ")?((?:"
    + _DOT_STRING
    + "|"
    + _QUOTED_STRING
    + ")@("
    + _DOMAIN
    + "|"
    + _ADDRESS_LITERAL
    + "))>"
)

_MAX_DOMAIN = 255
_MAX_LABEL = 63
_POSTMASTER = "<postmaster>"


class AddressError(ValueError):
    """The text is not a valid SMTP path; the message says why, never echoes input."""


def split_path(text: str, *, null_allowed: bool, postmaster_allowed: bool) -> tuple[str, str]:
    """Split ``<path> [parameters]`` into the mailbox and the parameter text.

    Returns the mailbox without angle brackets and without any source route
    (RFC 5321 section 4.1.1.3 says to ignore it), ``""`` for the null path
    ``<>``, and the parameter text with leading spaces removed.
    """
    if text.startswith("<>"):
        if not null_allowed:
            raise AddressError("the null path is not allowed here")
        return "", _parameters(text, 2)
    if postmaster_allowed and text[: len(_POSTMASTER)].lower() == _POSTMASTER:
        return text[1 : len(_POSTMASTER) - 1], _parameters(text, len(_POSTMASTER))
    match = _PATH.match(text)
    if match is None:
        raise AddressError("not a valid path")
    domain = match.group(2)
    if domain.startswith("["):
        _check_address_literal(domain[1:-1])
    else:
        _check_domain(domain)
    return match.group(1), _parameters(text, match.end())


def _parameters(text: str, end: int) -> str:
    rest = text[end:]
    if rest and not rest.startswith(" "):
        raise AddressError("the path must be followed by a space or the end of the line")
    return rest.lstrip(" ")


def _check_domain(domain: str) -> None:
    if domain.startswith("-") or domain.endswith("-") or "-." in domain or ".-" in domain:
        raise AddressError("a domain label starts or ends with a hyphen")
    if len(domain) <= _MAX_LABEL:
        return  # the common case: too short to break a length limit
    if len(domain.encode()) > _MAX_DOMAIN:
        raise AddressError("the domain is longer than 255 octets")
    if any(len(label) > _MAX_LABEL for label in domain.split(".") if label.isascii()):
        raise AddressError("a domain label is longer than 63 octets")


def _check_address_literal(literal: str) -> None:
    try:
        if literal[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(literal[5:])
        else:
            ipaddress.IPv4Address(literal)
    except ValueError as exc:
        raise AddressError("not an IPv4 or IPv6 address literal") from exc
    if "%" in literal:
        raise AddressError("an address literal cannot name a zone")
