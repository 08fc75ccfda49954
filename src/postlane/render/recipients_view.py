"""What the To, Cc and Bcc fields of one recipient's copy show.

A message sent to many envelope recipients is delivered as one copy each.
As with OMICard (X-ListOption, appendix A of its manual), each copy's To
shows only its own recipient, so a list of customers does not see each other,
unless the sender asked to keep the job's To (bit 1, ``keep_to``); Cc is
dropped unless asked to keep it (bit 2, ``keep_cc``). Bcc is always dropped:
its whole point is that no recipient sees it, and RFC 5322 section 3.6.3
leaves its removal to the sending system. Resent-Bcc (section 3.6.6) is the
same field for a resent message and is dropped with it. A copy whose To and
Cc may stay as written still loses both: :func:`without_bcc`.

Only the header section changes, so it is rewritten from the fields' original
bytes and the body is copied through untouched, never parsed as MIME. The
input is a stored message: CRLF line endings, as intake keeps them.
"""

from __future__ import annotations

import email.policy
from email.errors import HeaderParseError
from email.headerregistry import Address, AddressHeader
from typing import Final

from postlane.errors import InvalidInput
from postlane.intake.headers import Field, HeaderSection
from postlane.render.content import header_section

__all__ = ["view_for", "without_bcc"]

_ADDRESS_FIELDS: Final = ("to", "cc", "bcc")  # where a display name for the recipient is looked for
_BLIND: Final = frozenset({"bcc", "resent-bcc"})  # never in any copy, whatever the options


def view_for(message: bytes, recipient: str, *, keep_to: bool, keep_cc: bool) -> bytes:
    """``message`` with the To, Cc and Bcc fields ``recipient``'s copy shows.

    Without ``keep_to`` the To fields become one ``To: recipient``, placed
    where the first To was (at the end of the header section if there was
    none). If the recipient is named in the original To, Cc or Bcc with a
    display name (``"Ann" <ann@x>``), the new To keeps that name. Returns
    ``message`` itself when nothing changes: no Bcc or Resent-Bcc, no Cc or
    ``keep_cc``, and ``keep_to`` or a To that names exactly this recipient
    already.
    """
    section = header_section(message)
    fields = section.fields
    names = [field.name.lower() for field in fields]
    if (
        _BLIND.isdisjoint(names)
        and (keep_cc or "cc" not in names)
        and (keep_to or _to_is_only(fields, recipient))
    ):
        return message
    new_to = None if keep_to else _to_field(recipient, _display_name(fields, recipient))
    kept: list[bytes] = []
    for field, name in zip(fields, names, strict=True):
        if name in _BLIND or (name == "cc" and not keep_cc):
            continue
        if name == "to" and not keep_to:
            if new_to is not None:
                kept.append(new_to)
                new_to = None
            continue
        kept.append(field.raw)
    if new_to is not None:
        if kept and not kept[-1].endswith(b"\n"):
            # The message ended inside its last field, with no line break.
            kept.append(b"\r\n")
        kept.append(new_to)
    header_length = sum(len(field.raw) for field in fields)
    return b"".join((*kept, memoryview(message)[header_length:]))


def without_bcc(message: bytes, section: HeaderSection | None = None) -> bytes:
    """``message`` without its Bcc and Resent-Bcc fields; ``message`` itself when it has none.

    For the copy that keeps its To and Cc as the sender wrote them (one
    recipient, named in To): the blind copies must not show there either.
    ``section`` is ``message``'s header section when the caller has read it
    already, so the common message, which has no Bcc, is not parsed twice.
    """
    fields = (section or header_section(message)).fields
    if not any(field.name.lower() in _BLIND for field in fields):
        return message
    kept = [field.raw for field in fields if field.name.lower() not in _BLIND]
    header_length = sum(len(field.raw) for field in fields)
    return b"".join((*kept, memoryview(message)[header_length:]))


def _addresses(field: Field) -> list[Address]:
    header = email.policy.SMTP.header_factory(field.name, field.value)
    if not isinstance(header, AddressHeader):
        return []
    return list(header.addresses)


def _to_is_only(fields: tuple[Field, ...], recipient: str) -> bool:
    """Whether there is exactly one To field and it names exactly ``recipient``."""
    to_fields = [field for field in fields if field.name.lower() == "to"]
    if len(to_fields) != 1:
        return False
    addresses = _addresses(to_fields[0])
    return len(addresses) == 1 and addresses[0].addr_spec.casefold() == recipient.casefold()


def _display_name(fields: tuple[Field, ...], recipient: str) -> str:
    """The name the sender gave ``recipient`` in To, Cc or Bcc, or ""."""
    wanted = recipient.casefold()
    for kind in _ADDRESS_FIELDS:
        for field in fields:
            if field.name.lower() != kind:
                continue
            for address in _addresses(field):
                if address.display_name and address.addr_spec.casefold() == wanted:
                    return address.display_name
    return ""


def _to_field(recipient: str, display_name: str) -> bytes:
    """``To: recipient`` as header bytes, the name RFC 2047 encoded where needed.

    An address with a non-ASCII local part can only travel with SMTPUTF8, so
    its field is written in UTF-8 (RFC 6532) rather than encoded.
    """
    try:
        if recipient.isascii():
            address = Address(display_name, addr_spec=recipient)
            policy = email.policy.SMTP
        else:
            username, _, domain = recipient.rpartition("@")
            address = Address(display_name, username, domain)
            policy = email.policy.SMTPUTF8
        field: str = policy.header_factory("To", address).fold(policy=policy)
    except (HeaderParseError, ValueError, IndexError) as exc:
        raise InvalidInput(f"cannot write a To field for {recipient!r}: {exc}") from None
    return field.encode("utf-8")
