"""VERP return paths: a bounce address that names the recipient row it is about.

Each recipient's copy leaves with its own envelope sender,
``b-<id>-<tag>@<bounce domain>``, so a bounce — whatever its format, even one
no parser understands — arrives at an address that says which recipient
failed. ``<id>`` is the recipient row id in base 32; ``<tag>`` is an
HMAC-SHA256 of it, truncated to 80 bits, so nobody can make Postlane mark an
arbitrary recipient as bounced by mailing a guessed address: a forger would
need about 2**79 tries per recipient.

Only lower-case letters and digits 2-7 are used (RFC 4648 base 32), because
remote MTAs may change the case of a local part; :func:`decode` folds case
back. The longest address part before ``@`` is 32 characters, well inside
the 64 of RFC 5321 §4.5.3.1.1. The domain is not part of the tag: any of the
installation's bounce domains may receive the bounce, and the key is what
makes an address Postlane's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from typing import Final

from postlane.tenants.validate import domain_name

__all__ = ["MIN_KEY_BYTES", "decode", "encode"]

MIN_KEY_BYTES: Final = 16
_PREFIX: Final = "b-"
_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base 32, lower-case
_TAG_CHARS: Final = 16  # 16 base-32 digits = 80 bits
_MAX_ID: Final = 2**64 - 1  # 13 base-32 digits
_LOCAL: Final = re.compile(re.escape(_PREFIX) + r"([a-z2-7]{1,13})-([a-z2-7]{16})")


def _check_key(key: bytes) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the VERP key must be at least {MIN_KEY_BYTES} bytes")


def _base32(number: int) -> str:
    digits = []
    while True:
        number, digit = divmod(number, 32)
        digits.append(_ALPHABET[digit])
        if number == 0:
            return "".join(reversed(digits))


def _tag(id_text: str, key: bytes) -> str:
    # The version prefix keeps these MACs apart from any other use of the key.
    mac = hmac.new(key, b"postlane-verp-v1:" + id_text.encode("ascii"), hashlib.sha256)
    return _base32(int.from_bytes(mac.digest()[:10], "big")).rjust(_TAG_CHARS, "a")


@functools.lru_cache(maxsize=64)
def _checked_domain(domain: str) -> str:
    # The few bounce domains, checked once each: one return path per copy made
    # VERP 5% of the delivery role's samples, a sixth of it this check
    # (encode took 5.5 us, 4.5 us with the cache; timeit, by hand).
    return domain_name(domain)


def encode(recipient_id: int, *, key: bytes, domain: str) -> str:
    """The return path for recipient row ``recipient_id``, at ``domain``.

    Raises ValueError for an id outside 0 to 2**64-1 or a key shorter than
    16 bytes, and InvalidInput (from the domain check) for a bad domain.
    """
    _check_key(key)
    if not 0 <= recipient_id <= _MAX_ID:
        raise ValueError(f"recipient id {recipient_id} is outside 0 to 2**64-1")
    id_text = _base32(recipient_id)
    return f"{_PREFIX}{id_text}-{_tag(id_text, key)}@{_checked_domain(domain)}"


def decode(address: str, *, key: bytes) -> int | None:
    """The recipient row id named by ``address``, or None if it is not one of ours.

    Accepts the address with or without angle brackets and in any case. None
    for anything else: another local part, a tag made with another key, a
    non-canonical id (leading zeros, which :func:`encode` never writes).
    """
    _check_key(key)
    local, at, _domain = address.strip().removeprefix("<").removesuffix(">").rpartition("@")
    match = _LOCAL.fullmatch(local.lower()) if at and local.isascii() else None
    if match is None:
        return None
    id_text, tag = match.groups()
    if len(id_text) > 1 and id_text.startswith(_ALPHABET[0]):
        return None
    recipient_id = 0
    for char in id_text:
        recipient_id = recipient_id * 32 + _ALPHABET.index(char)
    if recipient_id > _MAX_ID or not hmac.compare_digest(tag, _tag(id_text, key)):
        return None
    return recipient_id
