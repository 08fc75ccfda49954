"""From a received message to the record that is committed: every decision of intake.

This is the one place that turns what a session received into what is
stored, in this order: parse the header section once, check it, read the
per-message options of every dialect, check the sender against the user's and
account's rules, rewrite the header (control headers out; Received, Date and
Message-ID in), and compute each recipient's priority, schedule and expiry.
Each step raises MessageRejected with the reply the client gets; nothing here
does I/O, so the whole path is tested without a socket or a database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from postlane.errors import MessageRejected
from postlane.intake import checks, headers, rewrite
from postlane.intake.sender_policy import SenderProblem, check_sender
from postlane.options import SendOptions, from_headers, is_control_header
from postlane.store.accounts import Account
from postlane.store.intake import NewMessage, NewRecipient
from postlane.store.smtp_users import SmtpUser

DEFAULT_PRIORITY = 3


@dataclass(frozen=True, slots=True)
class Sender:
    """Who a session sends as: an SMTP user, or an account through a trusted network.

    ``defaults`` are the account's and the user's option layers, built once
    (the server keeps one Sender per tenant snapshot): most messages carry no
    option header, and then these are their options as they are.
    """

    account: Account
    user: SmtpUser | None
    sending_domains: tuple[str, ...]
    defaults: SendOptions = field(init=False)
    defaults_json: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        layered = SendOptions().layer(
            {"track_opens": self.account.track_opens, "track_clicks": self.account.track_clicks}
        )
        layered = layered.layer(self.account.default_options)
        if self.user is not None:
            layered = layered.layer(self.user.default_options)
        object.__setattr__(self, "defaults", layered)
        object.__setattr__(self, "defaults_json", layered.to_json())

    @property
    def name(self) -> str:
        return self.user.username if self.user else f"trusted network of {self.account.name}"


@dataclass(frozen=True, slots=True)
class Envelope:
    session_id: str
    client_ip: str
    helo: str
    tls: str | None  # "TLSv1.3 TLS_AES_256_GCM_SHA384", None when plaintext
    authenticated: bool
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    eight_bit: bool  # BODY=8BITMIME or SMTPUTF8 was given


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    hostname: str
    max_received: int
    max_queue_lifetime: timedelta
    duplicate_detection: bool = True


@dataclass(frozen=True, slots=True)
class Accepted:
    """The record to commit, and the sender-policy alerts to write beside it."""

    message: NewMessage
    options: SendOptions
    alerts: tuple[SenderProblem, ...] = field(default_factory=tuple)


def envelope_sender_problems(sender: Sender, mail_from: str) -> list[SenderProblem]:
    """The MAIL FROM part of the sender policy, checked before any data is sent."""
    if not mail_from:
        return []
    return _sender_problems(sender, mail_from, mail_from)


def _sender_problems(sender: Sender, mail_from: str, header_from: str) -> list[SenderProblem]:
    user = sender.user
    return check_sender(
        mail_from=mail_from,
        header_from=header_from,
        authorised_domains=user.authorised_domains if user else (),
        authorised_senders=user.authorised_senders if user else (),
        sending_domains=sender.sending_domains,
    )


def options_for(sender: Sender, partial: dict[str, object]) -> SendOptions:
    """Options in layers, later wins: account defaults, user defaults, the message's headers."""
    return sender.defaults.layer(partial) if partial else sender.defaults


def effective_priority(sender: Sender, options: SendOptions) -> int:
    """The higher (numerically lower) of the user's and the message's priority."""
    user_level = sender.user.priority if sender.user else DEFAULT_PRIORITY
    if options.priority is None:
        return user_level
    return min(user_level, options.priority)


def _schedule(
    options: SendOptions, asked: dict[str, Any], now: datetime, lifetime: timedelta
) -> tuple[datetime, datetime]:
    """When the recipients are first due, and when they expire; MessageRejected if never.

    ``asked`` is what the message's own headers set, so a reply can tell a
    header's mistake from a default's.
    """
    start = options.scheduled_at if options.scheduled_at and options.scheduled_at > now else now
    try:
        expires = options.expires_at or start + lifetime
    except OverflowError:
        source = "X-NextLaunchTime or X-Mailgun-Deliver-By"
        if "scheduled_at" not in asked:
            source = "the launch time in the account's or SMTP user's default options"
        raise MessageRejected(
            550, "5.6.0", f"The launch time ({start:%Y-%m-%d} UTC) is too far ahead: check {source}"
        ) from None
    if expires <= start:
        when = f"{expires:%Y-%m-%d %H:%M:%S} UTC"
        source = "X-LaunchExpireTime"
        if "expires_at" not in asked:
            source = "the expiry of the account's or SMTP user's default options"
        raise MessageRejected(
            550, "5.6.0", f"The message expires ({when}) before it can be sent: check {source}"
        )
    return start, expires


def dedupe_key(
    account_id: int, message_id: str, mail_from: str, recipients: tuple[str, ...]
) -> str:
    """Identifies a resubmission: same account, Message-ID, sender and recipient set."""
    material = "\0".join(
        [str(account_id), message_id, mail_from.lower(), *sorted(r.lower() for r in recipients)]
    )
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


def accept(
    sender: Sender,
    envelope: Envelope,
    *,
    queue_id: str,
    now: datetime,
    limits: IntakeLimits,
) -> Accepted:
    """Decide on one message; raises MessageRejected with the reply to give."""
    data = headers.normalise_line_endings(envelope.data)
    section = headers.parse_header_section(data)
    missing = checks.check_message(
        section,
        data,
        eight_bit_allowed=envelope.eight_bit,
        hostname=limits.hostname,
        max_received=limits.max_received,
    )
    account = sender.account
    parsed = from_headers(
        [(f.name, f.value) for f in section.fields], tz=ZoneInfo(account.timezone)
    )
    if parsed.problems:
        problem = parsed.problems[0]
        raise MessageRejected(550, "5.6.0", f"Invalid {problem.header} header: {problem.problem}")
    options = options_for(sender, parsed.partial)

    header_from = checks.header_from_address(section)
    problems = _sender_problems(sender, envelope.mail_from, header_from)
    if problems and account.unauthorised_sender_policy == "block":
        raise MessageRejected(550, "5.7.1", problems[0].reason)

    names = {f.name.lower() for f in section.fields}
    # An empty Message-ID identifies nothing: it is replaced as a missing one is.
    original_message_id = _first(section, "message-id") or None
    new_message_id = (
        None if original_message_id else rewrite.make_message_id(queue_id, limits.hostname)
    )
    remove = is_control_header
    if new_message_id is not None and "message-id" in names:
        remove = _control_or_message_id
    protocol = "ESMTP" + ("S" if envelope.tls else "") + ("A" if envelope.authenticated else "")
    received = rewrite.received_header(
        helo=envelope.helo,
        client_ip=envelope.client_ip,
        hostname=limits.hostname,
        protocol=protocol,
        queue_id=queue_id,
        recipient=envelope.recipients[0] if len(envelope.recipients) == 1 else None,
        when=now,
    )
    raw = rewrite.rewrite(
        data,
        section,
        remove=remove,
        received=received,
        date=rewrite.format_date(now) if "Date" in missing else None,
        message_id=new_message_id,
    )

    priority = effective_priority(sender, options)
    start, expires = _schedule(options, parsed.partial, now, limits.max_queue_lifetime)
    recipients = tuple(
        NewRecipient(
            address=address,
            domain=address.rpartition("@")[2].lower(),
            priority=priority,
            next_attempt_at=start,
            expires_at=expires,
        )
        for address in envelope.recipients
    )
    key = None
    if original_message_id and limits.duplicate_detection:
        key = dedupe_key(account.id, original_message_id, envelope.mail_from, envelope.recipients)
    message = NewMessage(
        id=queue_id,
        account_id=account.id,
        smtp_user_id=sender.user.id if sender.user else None,
        mail_from=envelope.mail_from,
        header_from=header_from,
        message_id_header=original_message_id or new_message_id,
        subject=_first(section, "subject"),
        raw=raw,
        options=options.to_json() if parsed.partial else sender.defaults_json,
        client_ip=envelope.client_ip,
        tls=envelope.tls,
        received_at=now,
        dedupe_key=key,
        recipients=recipients,
        event_data={
            "session": envelope.session_id,
            "client_ip": envelope.client_ip,
            "user": sender.user.username if sender.user else None,
            "tls": envelope.tls,
            "size": len(raw),
            "recipients": len(recipients),
            "priority": priority,
        },
        alerts=tuple(p.reason for p in problems),
    )
    return Accepted(message, options, tuple(problems))


def _control_or_message_id(name: str) -> bool:
    return is_control_header(name) or name.lower() == "message-id"


def _first(section: headers.HeaderSection, name: str) -> str | None:
    """The first ``name`` field's value, as text the database can store.

    Submissions with header bytes that are not UTF-8, or NUL, were refused
    by the checks; mail to a bounce domain is kept as received, so its
    undecodable bytes and NULs become U+FFFD here (the stored message keeps
    the bytes).
    """
    for f in section.fields:
        if f.name.lower() == name:
            value = f.value
            if not value.isascii():
                value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            if "\0" in value:
                value = value.replace("\0", "\ufffd")  # no database stores NUL in text
            return value
    return None


def inbound(
    account_id: int,
    envelope: Envelope,
    *,
    queue_id: str,
    now: datetime,
    limits: IntakeLimits,
) -> NewMessage:
    """Mail to a return-path (bounce) domain: kept as received, for bounce processing.

    It is not sent anywhere, so it has no recipient rows; the ``inbound`` event
    is what bounce processing reads.
    """
    data = headers.normalise_line_endings(envelope.data)
    section = headers.parse_header_section(data)
    received = rewrite.received_header(
        helo=envelope.helo,
        client_ip=envelope.client_ip,
        hostname=limits.hostname,
        protocol="ESMTPS" if envelope.tls else "ESMTP",
        queue_id=queue_id,
        recipient=envelope.recipients[0] if len(envelope.recipients) == 1 else None,
        when=now,
    )
    raw = rewrite.rewrite(
        data, section, remove=lambda name: False, received=received, date=None, message_id=None
    )
    return NewMessage(
        id=queue_id,
        account_id=account_id,
        smtp_user_id=None,
        mail_from=envelope.mail_from,
        header_from=_first(section, "from") or "",
        message_id_header=_first(section, "message-id"),
        subject=_first(section, "subject"),
        raw=raw,
        options={},
        client_ip=envelope.client_ip,
        tls=envelope.tls,
        received_at=now,
        dedupe_key=None,
        recipients=(),
        event_data={
            "session": envelope.session_id,
            "client_ip": envelope.client_ip,
            "recipients": list(envelope.recipients),
            "size": len(raw),
        },
        event_type="inbound",
    )
