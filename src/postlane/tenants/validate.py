"""Checks for the values an operator or API client types in.

Everything that names a tenant object arrives as free text from a shell or an
HTTP request. Each check returns the normalised value or raises InvalidInput
with a message that repeats the bad value and says what is wrong with it, so
the CLI can print it as the one line the user sees.
"""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from typing import Final

from postlane.errors import InvalidInput

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")


def domain_name(value: str) -> str:
    """A DNS domain name suitable for sending mail, lower-cased, in its ASCII (IDNA) form."""
    text = value.strip().rstrip(".").lower()
    try:
        ascii_name = text if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidInput(f"invalid domain {value!r}: not a valid international name") from None
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise InvalidInput(f"invalid domain {value!r}: needs at least two labels, like example.com")
    if len(ascii_name) > 253:
        raise InvalidInput(f"invalid domain {value!r}: longer than 253 characters")
    for label in labels:
        if not _LABEL.match(label):
            raise InvalidInput(
                f"invalid domain {value!r}: label {label!r} must be 1-63 letters, digits or "
                "hyphens, not starting or ending with a hyphen"
            )
    if labels[-1].isdigit():
        raise InvalidInput(f"invalid domain {value!r}: an IP address is not a domain")
    return ascii_name


def account_name(value: str) -> str:
    """An account name: what the operator calls the customer."""
    name = value.strip()
    if not name or len(name) > 100 or _CONTROL.search(name):
        raise InvalidInput(f"invalid account name {value!r}: use 1-100 printable characters")
    return name


def username(value: str) -> str:
    """An SMTP username: anything a mail client can send in AUTH, without spaces."""
    name = value.strip()
    if not name or len(name) > 254 or _CONTROL.search(name) or " " in name:
        raise InvalidInput(
            f"invalid username {value!r}: use 1-254 printable characters without spaces"
        )
    return name


def priority(value: int | str) -> int:
    """A sending priority: 1 (highest) to 5 (lowest), 3 normal."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"invalid priority {value!r}: must be a whole number 1-5") from None
    if not 1 <= number <= 5:
        raise InvalidInput(f"invalid priority {value!r}: must be 1 (highest) to 5 (lowest)")
    return number


def split_list(value: str) -> list[str]:
    """Items of a ';'-separated list (the SMTP+ form; ',' accepted too), blanks dropped."""
    return [item.strip() for item in re.split(r"[;,]", value) if item.strip()]


def address(value: str) -> str:
    """An email address local@domain, with the domain normalised."""
    text = value.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or len(local) > 64 or not _ATEXT.match(local):
        raise InvalidInput(f"invalid email address {value!r}: expected local@domain")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidInput(f"invalid email address {value!r}: misplaced dot in the local part")
    try:
        return f"{local}@{domain_name(domain)}"
    except InvalidInput as exc:
        raise InvalidInput(f"invalid email address {value!r}: {exc}") from None


def authorised_domains(value: str) -> tuple[str, ...]:
    """The SMTP+ "authorised domains" field: domains separated by ';'."""
    return tuple(dict.fromkeys(domain_name(item) for item in split_list(value)))


def authorised_senders(value: str) -> tuple[str, ...]:
    """The SMTP+ "authorised senders" field: addresses separated by ';'."""
    return tuple(dict.fromkeys(address(item) for item in split_list(value)))


# The widest trusted network accepted, per family. A client inside sends as the
# account without logging in: 0.0.0.0/0 would let anyone on the Internet do so.
_WIDEST_PREFIX: Final = {4: 8, 6: 32}


def networks(value: str) -> tuple[str, ...]:
    """Trusted networks: IP addresses or CIDR blocks separated by ',' or ';'."""
    result: list[str] = []
    for item in split_list(value):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise InvalidInput(
                f"invalid network {item!r}: expected an IP address or CIDR like 10.1.0.0/16"
            ) from None
        widest = _WIDEST_PREFIX[network.version]
        if network.prefixlen < widest:
            raise InvalidInput(
                f"network {item!r} is too wide to trust: anyone in it could send as the"
                f" account without logging in; give a /{widest} or narrower"
            )
        result.append(str(network))
    return tuple(dict.fromkeys(result))


def timezone(value: str) -> str:
    """An IANA time zone name, as used for zone-less times in option headers."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(
            f"invalid time zone {value!r}: use an IANA name like Asia/Taipei or UTC"
        ) from None
    return value


def selector(value: str) -> str:
    """A DKIM selector: one or more DNS labels."""
    text = value.strip().lower()
    if not text or not all(_LABEL.match(label) for label in text.split(".")):
        raise InvalidInput(f"invalid DKIM selector {value!r}: use letters, digits and hyphens")
    return text
