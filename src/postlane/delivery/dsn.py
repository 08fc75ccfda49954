"""Reading the reports that come back: delivery status notifications and complaints.

Two standard formats arrive at the bounce address:

- RFC 3464 DSNs, ``multipart/report; report-type=delivery-status``: a human
  part, a ``message/delivery-status`` part (one block of per-message fields,
  then one block per recipient: Final-Recipient, Action, Status,
  Diagnostic-Code, Remote-MTA …) and the original message or its headers.
  RFC 6533's ``message/global-delivery-status`` (for SMTPUTF8 mail) is read
  the same way.
- RFC 5965 ARF feedback reports, ``report-type=feedback-report``: a mailbox
  provider telling us a user pressed "this is spam" (Feedback-Type,
  Original-Mail-From, Original-Rcpt-To), with the original's headers.

The stdlib ``email`` package parses them; bounces are rare next to sends, so
clarity beats speed here. Headers are read raw and decoded as UTF-8 (RFC 6532
allows it in reports about SMTPUTF8 mail), unfolded, but RFC 2047
encoded-words are left as sent: the values are for matching (Message-ID,
Return-Path, VERP addresses), and decoding could only lose information.
Anyone can mail a report to a VERP address, and its fields end up in the
database and in logs, so every value also loses its control characters (a
NUL cannot be stored in PostgreSQL text at all) and is cut at
:data:`MAX_VALUE` characters.

What is *not* a report gives None: a person answering the bounce address,
an auto-reply, a read receipt (``report-type=disposition-notification``) and a
report forwarded as an attachment — only the top-level message, or a
``multipart/*`` wrapper around it, is searched, never an attached message.
Non-standard bounces (plain-text qmail style) also give None; their VERP
return path still says which recipient failed.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Final

__all__ = ["MAX_VALUE", "Arf", "Dsn", "DsnRecipient", "parse_report"]

Headers = tuple[tuple[str, str], ...]

_STATUS_TYPES: Final = ("message/delivery-status", "message/global-delivery-status")
_FEEDBACK_TYPE: Final = "message/feedback-report"
# The stdlib parses every message/* part as an embedded message, headers only or not.
_ORIGINAL_MESSAGE_TYPES: Final = ("message/rfc822", "message/global", "message/global-headers")
_STATUS_CODE: Final = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_REPLY_CODE: Final = re.compile(r"([2-5]\d\d)(?:[ -]|$)")
_COMMENT: Final = re.compile(r"\([^()]*\)")
_BLANK_LINE: Final = re.compile(rb"\n[ \t]*\n")
_HEADER_PARSER: Final = BytesHeaderParser(policy=email.policy.compat32)
#: C0 controls and DEL. TAB is left to the whitespace folding like any space.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Longest field value kept, in characters. A multi-line SMTP reply quoted in a
#: Diagnostic-Code fits with room to spare; a report is not a place for more.
MAX_VALUE: Final = 2000


def _first(headers: Headers, name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in headers if key.lower() == wanted), None)


def _all(headers: Headers, name: str) -> list[str]:
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


class _Original:
    """The headers of the message a report is about, as the report returned them."""

    __slots__ = ()
    original_headers: Headers

    def original_header(self, name: str) -> str | None:
        """The first original header called ``name`` (any case), or None."""
        return _first(self.original_headers, name)


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One per-recipient block of a DSN (RFC 3464 §2.3).

    Addresses and the remote MTA are given without their type prefix
    (``rfc822;``, ``dns;``); ``action`` is lower-case (failed, delayed,
    delivered, relayed, expanded); ``status`` is the enhanced status code;
    ``diagnostic_code`` is the text after its type, usually the remote
    server's SMTP reply, with ``diagnostic_type`` saying which (``smtp``).
    """

    final_recipient: str
    action: str | None
    status: str | None
    diagnostic_code: str | None
    remote_mta: str | None
    original_recipient: str | None = None
    diagnostic_type: str | None = None

    @property
    def reply_code(self) -> int | None:
        """The basic SMTP reply code of an ``smtp`` diagnostic, for classification."""
        if self.diagnostic_type != "smtp" or self.diagnostic_code is None:
            return None
        match = _REPLY_CODE.match(self.diagnostic_code)
        return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class Dsn(_Original):
    """A delivery status notification.

    ``original_envelope_id`` is the ENVID we gave at MAIL FROM, if the
    reporting MTA kept it. ``return_path`` is the original envelope sender —
    where a VERP address shows — as the report states it: Postfix's
    X-Postfix-Sender field, else the returned original's Return-Path, else
    the report's own To (a DSN is sent to the return path). The envelope
    recipient the bounce server received is more trustworthy than any of
    these; use this when the bounce was forwarded or fetched from a mailbox.
    """

    recipients: tuple[DsnRecipient, ...]
    reporting_mta: str | None
    original_envelope_id: str | None
    return_path: str | None
    original_headers: Headers


@dataclass(frozen=True, slots=True)
class Arf(_Original):
    """A feedback report (RFC 5965): a complaint or other feedback about a message.

    Providers often redact the recipient (no Original-Rcpt-To); the original
    headers — our Message-ID, the VERP Return-Path — then identify it.
    """

    feedback_type: str
    user_agent: str | None
    original_mail_from: str | None
    original_rcpt_to: tuple[str, ...]
    source_ip: str | None
    reported_domain: str | None
    arrival_date: str | None
    original_headers: Headers


def _clean(value: str) -> str:
    """A raw header value as text fit to store and log: UTF-8, one line, bounded.

    Controls become spaces rather than vanish, so the words they separated
    stay apart (``unknown\\0user`` is not ``unknownuser``); folding and runs
    of space then collapse to single spaces.
    """
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(_CONTROL.sub(" ", text).split())[:MAX_VALUE]


def _headers(message: Message) -> Headers:
    return tuple((name, _clean(str(value))) for name, value in message.raw_items())


def _typed(value: str) -> tuple[str | None, str]:
    """Split ``type; value`` (RFC 3464 address-type, mta-name-type, diagnostic-type)."""
    kind, semicolon, rest = value.partition(";")
    if not semicolon:
        return None, value.strip()
    return kind.strip().lower(), rest.strip()


def _address(value: str | None) -> str | None:
    if value is None:
        return None
    address = _typed(value)[1].strip().removeprefix("<").removesuffix(">").strip()
    return address or None


def _subparts(part: Message) -> list[Message]:
    """The parts inside a multipart or message/* part; none for a leaf."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        return []
    return [child for child in payload if isinstance(child, Message)]


def _blocks(part: Message) -> list[Headers]:
    """The field blocks of a message/delivery-status-like part, in order.

    The stdlib splits message/delivery-status into one Message per block; any
    other message/* type (global-delivery-status, feedback-report) becomes one
    Message whose body holds the remaining blocks, split here.
    """
    blocks: list[Headers] = []
    for block in _subparts(part):
        blocks.append(_headers(block))
        rest = block.get_payload(decode=True)
        if isinstance(rest, bytes):
            for chunk in _BLANK_LINE.split(rest.replace(b"\r\n", b"\n")):
                if chunk.strip():
                    blocks.append(_headers(_HEADER_PARSER.parsebytes(chunk.strip())))
    return [block for block in blocks if block]


def _original_headers(parts: list[Message]) -> Headers:
    for part in parts:
        kind = part.get_content_type()
        if kind in _ORIGINAL_MESSAGE_TYPES:
            embedded = _subparts(part)
            if embedded:
                return _headers(embedded[0])
        elif kind == "text/rfc822-headers":
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                return _headers(_HEADER_PARSER.parsebytes(data))
    return ()


def _mta_name(value: str) -> str | None:
    """``dns; mx.example.org. (192.0.2.1, the server for ...)`` as ``mx.example.org``."""
    return _COMMENT.sub("", _typed(value)[1]).strip().rstrip(".") or None


def _recipient(block: Headers) -> DsnRecipient | None:
    original = _address(_first(block, "Original-Recipient"))
    final = _address(_first(block, "Final-Recipient")) or original
    if final is None:
        return None
    status_text = _first(block, "Status")
    status = _STATUS_CODE.match(status_text) if status_text else None
    action = _first(block, "Action")
    remote = _first(block, "Remote-MTA")
    diagnostic = _first(block, "Diagnostic-Code")
    diagnostic_type, diagnostic_text = _typed(diagnostic) if diagnostic else (None, None)
    return DsnRecipient(
        final_recipient=final,
        action=action.lower() if action else None,
        status=status.group(0) if status else None,
        diagnostic_code=diagnostic_text or None,
        remote_mta=_mta_name(remote) if remote else None,
        original_recipient=original,
        diagnostic_type=diagnostic_type,
    )


def _dsn(message: Message, status_part: Message, parts: list[Message]) -> Dsn | None:
    blocks = _blocks(status_part)
    per_message: Headers = ()
    if blocks and _first(blocks[0], "Final-Recipient") is None:
        per_message, blocks = blocks[0], blocks[1:]
    recipients = tuple(r for r in map(_recipient, blocks) if r is not None)
    if not recipients:
        return None
    original = _original_headers(parts)
    reporting_mta = _first(per_message, "Reporting-MTA")
    candidates = (
        _address(_first(per_message, "X-Postfix-Sender")),
        email.utils.parseaddr(_first(original, "Return-Path") or "")[1],
        email.utils.parseaddr(_first(_headers(message), "To") or "")[1],
    )
    return Dsn(
        recipients=recipients,
        reporting_mta=_mta_name(reporting_mta) if reporting_mta else None,
        original_envelope_id=_first(per_message, "Original-Envelope-Id"),
        return_path=next((c for c in candidates if c), None),
        original_headers=original,
    )


def _arf(feedback_part: Message, parts: list[Message]) -> Arf | None:
    fields: Headers = tuple(field for block in _blocks(feedback_part) for field in block)
    feedback_type = _first(fields, "Feedback-Type")
    if not feedback_type:
        return None
    return Arf(
        feedback_type=feedback_type.lower(),
        user_agent=_first(fields, "User-Agent"),
        original_mail_from=_address(_first(fields, "Original-Mail-From")),
        original_rcpt_to=tuple(
            a for a in map(_address, _all(fields, "Original-Rcpt-To")) if a is not None
        ),
        source_ip=_first(fields, "Source-IP"),
        reported_domain=_first(fields, "Reported-Domain"),
        arrival_date=_first(fields, "Arrival-Date") or _first(fields, "Received-Date"),
        original_headers=_original_headers(parts),
    )


def _find_report(part: Message) -> Message | None:
    """The multipart/report part: the message itself or inside multipart wrappers."""
    if part.get_content_type() == "multipart/report":
        return part
    if part.get_content_maintype() != "multipart":
        return None
    for child in _subparts(part):
        found = _find_report(child)
        if found is not None:
            return found
    return None


def parse_report(raw: bytes) -> Dsn | Arf | None:
    """The DSN or feedback report in ``raw``, or None if it is neither.

    The report's parts decide, not its ``report-type`` parameter, which some
    senders get wrong: a delivery-status part makes a DSN, a feedback-report
    part an ARF report. A report without a recipient block or without a
    Feedback-Type is malformed and gives None too.
    """
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    report = _find_report(message)
    if report is None:
        return None
    parts = _subparts(report)
    for part in parts:
        if part.get_content_type() in _STATUS_TYPES:
            return _dsn(message, part, parts)
        if part.get_content_type() == _FEEDBACK_TYPE:
            return _arf(part, parts)
    return None
