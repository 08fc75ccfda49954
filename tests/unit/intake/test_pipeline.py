"""The intake pipeline: from what a session received to the record that is committed."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from postlane.errors import MessageRejected
from postlane.intake import pipeline
from postlane.intake.headers import parse_header_section
from postlane.intake.pipeline import (
    Envelope,
    IntakeLimits,
    Sender,
    accept,
    dedupe_key,
    envelope_sender_problems,
    inbound,
)
from postlane.options import SendOptions
from postlane.store.accounts import Account
from postlane.store.smtp_users import SmtpUser

NOW = datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC)
QUEUE_ID = "01HXAMPLE0000QID"
HOST = "mx.postlane.test"
LIFETIME = timedelta(days=3)
LIMITS = IntakeLimits(hostname=HOST, max_received=30, max_queue_lifetime=LIFETIME)
TLS = "TLSv1.3 TLS_AES_256_GCM_SHA384"


def make_account(**changes: Any) -> Account:
    values: dict[str, Any] = {
        "id": 7,
        "name": "acme",
        "smtp_enabled": True,
        "allow_email_login": False,
        "unauthorised_sender_policy": "block",
        "attachment_policy": "off",
        "attachment_archive_name": "attachments.zip",
        "attachment_password_enc": None,
        "track_opens": False,
        "track_clicks": False,
        "timezone": "UTC",
        "trusted_networks": (),
        "default_options": {},
        "created_at": NOW,
        "updated_at": NOW,
    }
    return Account(**{**values, **changes})


def make_user(**changes: Any) -> SmtpUser:
    values: dict[str, Any] = {
        "id": 42,
        "account_id": 7,
        "username": "wordpress",
        "password_hash": "$argon2id$unused",
        "active": True,
        "priority": 3,
        "note": "",
        "authorised_domains": (),
        "authorised_senders": (),
        "default_options": {},
        "created_at": NOW,
        "updated_at": NOW,
        "password_changed_at": NOW,
    }
    return SmtpUser(**{**values, **changes})


def make_sender(
    *,
    account: Account | None = None,
    user: SmtpUser | bool | None = True,
    domains: tuple[str, ...] = ("acme.com",),
) -> Sender:
    resolved = make_user() if user is True else (None if user is False else user)
    return Sender(account=account or make_account(), user=resolved, sending_domains=domains)


def make_message(
    *extra: str,
    sender: str = "News <news@acme.com>",
    message_id: str | None = "<m1@acme.com>",
    date: bool = True,
    body: bytes = b"Hello Bob,\r\n\r\nSee you.\r\n",
) -> bytes:
    lines = [f"From: {sender}", "To: Bob <bob@example.org>", "Subject: Spring news"]
    if date:
        lines.append("Date: Wed, 01 May 2024 09:59:00 +0200")
    if message_id is not None:
        lines.append(f"Message-ID: {message_id}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def make_envelope(
    data: bytes,
    *,
    mail_from: str = "news@acme.com",
    recipients: tuple[str, ...] = ("bob@example.org",),
    tls: str | None = TLS,
    authenticated: bool = True,
) -> Envelope:
    return Envelope(
        session_id="s-1",
        client_ip="192.0.2.10",
        helo="client.example",
        tls=tls,
        authenticated=authenticated,
        mail_from=mail_from,
        recipients=recipients,
        data=data,
        eight_bit=False,
    )


def run(
    data: bytes | None = None,
    *,
    sender: Sender | None = None,
    limits: IntakeLimits = LIMITS,
    now: datetime = NOW,
    **envelope: Any,
) -> pipeline.Accepted:
    return accept(
        sender or make_sender(),
        make_envelope(make_message() if data is None else data, **envelope),
        queue_id=QUEUE_ID,
        now=now,
        limits=limits,
    )


def split_received(raw: bytes) -> tuple[str, bytes]:
    """Our Received field's unfolded value, and everything after it."""
    first = parse_header_section(raw).fields[0]
    assert first.name == "Received"
    return first.value, raw[len(first.raw) :]


def header_names(raw: bytes) -> list[str]:
    return [f.name for f in parse_header_section(raw).fields]


def header_values(raw: bytes, name: str) -> list[str]:
    return [f.value for f in parse_header_section(raw).fields if f.name.lower() == name.lower()]


# -- a good message ------------------------------------------------------------------------


def test_good_message_becomes_a_new_message() -> None:
    data = make_message()
    accepted = run(data)
    message = accepted.message
    assert message.id == QUEUE_ID
    assert message.account_id == 7
    assert message.smtp_user_id == 42
    assert message.mail_from == "news@acme.com"
    assert message.header_from == "news@acme.com"
    assert message.message_id_header == "<m1@acme.com>"
    assert message.subject == "Spring news"
    assert message.client_ip == "192.0.2.10"
    assert message.tls == TLS
    assert message.received_at == NOW
    assert message.event_type == "accepted"
    assert message.options == accepted.options.to_json()
    assert accepted.alerts == ()
    assert message.alerts == ()
    # The stored message is the client's, byte for byte, under our Received field.
    received, rest = split_received(message.raw)
    assert rest == data
    assert received == (
        "from client.example ([192.0.2.10]) by mx.postlane.test (Postlane)"
        f" with ESMTPSA id {QUEUE_ID} for <bob@example.org>; Wed, 01 May 2024 08:00:00 +0000"
    )
    (recipient,) = message.recipients
    assert recipient.address == "bob@example.org"
    assert recipient.domain == "example.org"
    assert recipient.priority == 3
    assert recipient.next_attempt_at == NOW
    assert recipient.expires_at == NOW + LIFETIME
    assert message.event_data == {
        "session": "s-1",
        "client_ip": "192.0.2.10",
        "user": "wordpress",
        "tls": TLS,
        "size": len(message.raw),
        "recipients": 1,
        "priority": 3,
    }


def test_every_envelope_recipient_gets_a_row_with_its_domain_lower_cased() -> None:
    message = run(recipients=("a@Example.ORG", "B@mail.example.net")).message
    assert [(r.address, r.domain) for r in message.recipients] == [
        ("a@Example.ORG", "example.org"),
        ("B@mail.example.net", "mail.example.net"),
    ]
    # With more than one recipient the Received field names none of them.
    (received,) = header_values(message.raw, "Received")
    assert "for <" not in received
    assert message.event_data["recipients"] == 2


def test_control_headers_of_every_dialect_are_removed_and_others_kept() -> None:
    data = make_message(
        "X-OV-Tag: spring",
        "X-Mailgun-Tag: news",
        "X-Mailgun-Track-Clicks: yes",
        "X-JobName: May newsletter",
        "X-JobOption: 8",
        "X-OV-Something-New: whatever",
        "X-Priority: 3 (Normal)",
        "List-Unsubscribe: <mailto:unsub@acme.com>",
    )
    accepted = run(data)
    raw = accepted.message.raw
    assert header_names(raw) == [
        "Received",
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "X-Priority",
        "List-Unsubscribe",
    ]
    lowered = raw.lower()
    for gone in (b"x-ov-", b"x-mailgun-", b"x-jobname", b"x-joboption"):
        assert gone not in lowered
    assert raw.endswith(b"\r\n\r\nHello Bob,\r\n\r\nSee you.\r\n")
    # What the headers asked for was read before they were removed.
    options = accepted.options
    assert options.tags == ("spring", "news")
    assert options.track_clicks is True
    assert options.job_name == "May newsletter"
    assert options.html_to_text is True
    assert "X-OV-Something-New not recognised" in " ".join(options.unhandled)


def test_folded_kept_header_is_written_back_byte_for_byte() -> None:
    folded = "DKIM-Signature: v=1; a=rsa-sha256; d=acme.com;\r\n\tb=abc"
    raw = run(make_message(folded)).message.raw
    assert folded.encode() + b"\r\n" in raw


def test_missing_date_and_message_id_are_added() -> None:
    accepted = run(make_message(date=False, message_id=None))
    message = accepted.message
    (date,) = header_values(message.raw, "Date")
    assert date == "Wed, 01 May 2024 08:00:00 +0000"
    (message_id,) = header_values(message.raw, "Message-ID")
    assert re.fullmatch(rf"<{QUEUE_ID}\.[0-9a-f]{{16}}@{re.escape(HOST)}>", message_id)
    assert message.message_id_header == message_id
    # Postlane made the Message-ID up, so a resubmission cannot be recognised by it.
    assert message.dedupe_key is None


def test_present_date_and_message_id_are_not_replaced() -> None:
    message = run(make_message()).message
    assert header_values(message.raw, "Date") == ["Wed, 01 May 2024 09:59:00 +0200"]
    assert header_values(message.raw, "Message-ID") == ["<m1@acme.com>"]


@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_message_id_is_replaced(blank: str) -> None:
    # It once went out as "Message-ID: " and the record had no identifier.
    message = run(make_message(message_id=blank)).message
    (message_id,) = header_values(message.raw, "Message-ID")
    assert re.fullmatch(rf"<{QUEUE_ID}\.[0-9a-f]{{16}}@{re.escape(HOST)}>", message_id)
    assert message.message_id_header == message_id
    assert message.dedupe_key is None


def test_only_the_missing_one_is_added() -> None:
    message = run(make_message(message_id=None)).message
    assert len(header_values(message.raw, "Date")) == 1
    assert len(header_values(message.raw, "Message-ID")) == 1
    message = run(make_message(date=False)).message
    assert header_values(message.raw, "Date") == ["Wed, 01 May 2024 08:00:00 +0000"]
    assert header_values(message.raw, "Message-ID") == ["<m1@acme.com>"]


@pytest.mark.parametrize(
    ("tls", "authenticated", "protocol"),
    [
        (None, False, "ESMTP"),
        (TLS, False, "ESMTPS"),
        (None, True, "ESMTPA"),
        (TLS, True, "ESMTPSA"),
    ],
)
def test_received_names_the_protocol(tls: str | None, authenticated: bool, protocol: str) -> None:
    message = run(tls=tls, authenticated=authenticated).message
    (received,) = header_values(message.raw, "Received")
    assert f" with {protocol} id {QUEUE_ID} " in received


def test_lf_only_message_is_stored_with_crlf() -> None:
    data = make_message().replace(b"\r\n", b"\n")
    raw = run(data).message.raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"Hello Bob,\r\n\r\nSee you.\r\n")


def test_a_message_breaking_a_header_rule_is_rejected() -> None:
    data = b"To: bob@example.org\r\nSubject: no author\r\n\r\nbody\r\n"
    with pytest.raises(MessageRejected) as caught:
        run(data)
    assert (caught.value.code, caught.value.enhanced) == (550, "5.6.0")
    assert "From" in caught.value.text


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("account_opens", "user_defaults", "header", "expected"),
    [
        (True, {}, None, True),
        (False, {}, None, False),
        (True, {"track_opens": False}, None, False),
        (False, {"track_opens": True}, None, True),
        (True, {"track_opens": False}, "yes", True),
        (False, {"track_opens": True}, "no", False),
    ],
)
def test_options_layer_account_then_user_then_headers(
    account_opens: bool, user_defaults: dict[str, Any], header: str | None, expected: bool
) -> None:
    sender = make_sender(
        account=make_account(track_opens=account_opens),
        user=make_user(default_options=user_defaults),
    )
    extra = [f"X-OV-tracking_open: {header}"] if header else []
    accepted = run(make_message(*extra), sender=sender)
    assert accepted.options.track_opens is expected
    assert accepted.message.options["track_opens"] is expected


def test_account_default_options_lie_over_the_account_switches() -> None:
    account = make_account(
        track_clicks=False, default_options={"track_clicks": True, "tags": ["acct"]}
    )
    sender = make_sender(account=account, user=make_user(default_options={"tags": ["user"]}))
    options = run(make_message("X-OV-Tag: msg"), sender=sender).options
    assert options.track_clicks is True
    # Tags accumulate through the layers instead of replacing each other.
    assert options.tags == ("acct", "user", "msg")


def test_headers_override_user_defaults_field_by_field() -> None:
    user = make_user(default_options={"track_clicks": True, "job_name": "default job"})
    options = run(make_message("X-JobName: from header"), sender=make_sender(user=user)).options
    assert options.job_name == "from header"
    assert options.track_clicks is True


def test_a_list_or_job_mask_turns_off_what_defaults_turned_on() -> None:
    # An OMICard mask is the message's whole word on its switches: X-ListOption
    # 32 without bit 1 means "rewrite To", whatever the user's defaults say.
    user = make_user(default_options={"keep_to": True, "archive_copy": True, "track_opens": False})
    options = run(
        make_message("X-ListOption: 32", "X-JobOption: 0", "X-LinkOption: 0"),
        sender=make_sender(user=user),
    ).options
    assert options.keep_to is False
    assert options.remove_unsubscribed is True
    assert options.archive_copy is False
    # LinkOption's bits only forbid tracking: a clear bit leaves the default.
    assert options.track_opens is False


def test_trusted_network_sender_gets_account_options_only() -> None:
    sender = make_sender(account=make_account(track_opens=True), user=False)
    accepted = run(sender=sender, authenticated=False)
    assert accepted.options.track_opens is True
    assert accepted.message.smtp_user_id is None
    assert accepted.message.event_data["user"] is None


def test_options_for_layers_in_order() -> None:
    sender = make_sender(
        account=make_account(track_opens=True, default_options={"job_name": "a"}),
        user=make_user(default_options={"job_name": "u"}),
    )
    assert pipeline.options_for(sender, {}).job_name == "u"
    assert pipeline.options_for(sender, {"job_name": "h"}).job_name == "h"
    assert pipeline.options_for(sender, {}).track_opens is True


@pytest.mark.parametrize(
    ("header", "problem_header"),
    [
        ("X-OV-tracking_open: maybe", "X-OV-tracking_open"),
        ("X-JobOption: lots", "X-JobOption"),
        ("X-NextLaunchTime: tomorrow-ish", "X-NextLaunchTime"),
        ("X-Mailgun-Variables: {not json", "X-Mailgun-Variables"),
        ("X-Priority: 9", "X-Priority"),
    ],
)
def test_malformed_option_header_is_rejected_naming_it(header: str, problem_header: str) -> None:
    with pytest.raises(MessageRejected) as caught:
        run(make_message(header))
    rejected = caught.value
    assert (rejected.code, rejected.enhanced) == (550, "5.6.0")
    assert rejected.text.startswith(f"Invalid {problem_header} header: ")


# -- priority ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_priority", "x_priority", "expected"),
    [
        (3, None, 3),
        (2, None, 2),
        (5, None, 5),
        (3, "1 (Highest)", 1),
        (4, "2", 2),
        (2, "5 (Lowest)", 2),
        (1, "3", 1),
    ],
)
def test_effective_priority_is_the_higher_of_user_and_message(
    user_priority: int, x_priority: str | None, expected: int
) -> None:
    extra = [f"X-Priority: {x_priority}"] if x_priority else []
    sender = make_sender(user=make_user(priority=user_priority))
    message = run(make_message(*extra), sender=sender).message
    assert {r.priority for r in message.recipients} == {expected}
    assert message.event_data["priority"] == expected
    if x_priority:
        # The priority header is content for the recipient's client: it stays.
        assert header_values(message.raw, "X-Priority") == [x_priority]


@pytest.mark.parametrize(("x_priority", "expected"), [(None, 3), ("1", 1), ("5", 3)])
def test_priority_without_a_user_starts_from_normal(x_priority: str | None, expected: int) -> None:
    extra = [f"X-Priority: {x_priority}"] if x_priority else []
    sender = make_sender(user=False)
    message = run(make_message(*extra), sender=sender, authenticated=False).message
    assert message.recipients[0].priority == expected


def test_effective_priority_function() -> None:
    sender = make_sender(user=make_user(priority=2))
    assert pipeline.effective_priority(sender, SendOptions()) == 2
    assert pipeline.effective_priority(sender, SendOptions(priority=1)) == 1
    assert pipeline.effective_priority(sender, SendOptions(priority=4)) == 2


# -- schedule and expiry -------------------------------------------------------------------


def test_zone_less_launch_time_is_read_in_the_accounts_zone() -> None:
    sender = make_sender(account=make_account(timezone="Asia/Taipei"))
    accepted = run(make_message("X-NextLaunchTime: 2024-05-02 09:00:00"), sender=sender)
    start = datetime(2024, 5, 2, 1, 0, tzinfo=UTC)  # 09:00 in Taipei (UTC+8)
    assert accepted.options.scheduled_at == start
    (recipient,) = accepted.message.recipients
    assert recipient.next_attempt_at == start
    # The default expiry counts from when the message may first be sent.
    assert recipient.expires_at == start + LIFETIME


def test_the_same_zone_less_time_differs_by_account_zone() -> None:
    data = make_message("X-NextLaunchTime: 2024-05-02 09:00:00")
    utc = run(data, sender=make_sender(account=make_account(timezone="UTC")))
    taipei = run(data, sender=make_sender(account=make_account(timezone="Asia/Taipei")))
    utc_start = utc.message.recipients[0].next_attempt_at
    taipei_start = taipei.message.recipients[0].next_attempt_at
    assert utc_start - taipei_start == timedelta(hours=8)


def test_launch_time_in_the_past_means_now() -> None:
    accepted = run(make_message("X-NextLaunchTime: 2024-04-30T08:00:00Z"))
    (recipient,) = accepted.message.recipients
    assert recipient.next_attempt_at == NOW
    assert recipient.expires_at == NOW + LIFETIME


def test_launch_expire_time_sets_the_expiry() -> None:
    accepted = run(
        make_message(
            "X-NextLaunchTime: 2024-05-02T09:00:00+08:00",
            "X-LaunchExpireTime: 2024-05-03T00:00:00+08:00",
        )
    )
    (recipient,) = accepted.message.recipients
    assert recipient.next_attempt_at == datetime(2024, 5, 2, 1, 0, tzinfo=UTC)
    assert recipient.expires_at == datetime(2024, 5, 2, 16, 0, tzinfo=UTC)


def test_expiry_alone_keeps_the_start_now() -> None:
    accepted = run(make_message("X-LaunchExpireTime: 2024-05-01T12:00:00Z"))
    (recipient,) = accepted.message.recipients
    assert recipient.next_attempt_at == NOW
    assert recipient.expires_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_expiry_before_the_launch_time_is_rejected() -> None:
    data = make_message(
        "X-NextLaunchTime: 2024-05-03T00:00:00Z", "X-LaunchExpireTime: 2024-05-02T00:00:00Z"
    )
    with pytest.raises(MessageRejected) as caught:
        run(data)
    assert caught.value.enhanced == "5.6.0"
    assert "X-LaunchExpireTime" in caught.value.text


def test_expiry_already_past_is_rejected() -> None:
    data = make_message("X-LaunchExpireTime: 2024-05-01T07:00:00Z")  # an hour before NOW
    with pytest.raises(MessageRejected) as caught:
        run(data)
    assert caught.value.enhanced.startswith("5.6.")
    assert "X-LaunchExpireTime" in caught.value.text


def test_deliver_by_schedules_the_send() -> None:
    accepted = run(make_message("X-Mailgun-Deliver-By: Thu, 02 May 2024 09:30:00 +0000"))
    (recipient,) = accepted.message.recipients
    start = datetime(2024, 5, 2, 9, 30, tzinfo=UTC)
    assert recipient.next_attempt_at == start
    assert recipient.expires_at == start + LIFETIME


def test_deliver_by_in_the_past_sends_now() -> None:
    accepted = run(make_message("X-Mailgun-Deliver-By: Wed, 01 May 2024 07:00:00 +0000"))
    (recipient,) = accepted.message.recipients
    assert recipient.next_attempt_at == NOW


def test_launch_time_too_far_ahead_is_rejected() -> None:
    # The default expiry (launch + lifetime) overflowed and the exception
    # dropped the session without a reply.
    with pytest.raises(MessageRejected) as caught:
        run(make_message("X-NextLaunchTime: 9999-12-31T00:00:00Z"))
    assert (caught.value.code, caught.value.enhanced) == (550, "5.6.0")
    assert caught.value.text == (
        "The launch time (9999-12-31 UTC) is too far ahead:"
        " check X-NextLaunchTime or X-Mailgun-Deliver-By"
    )


def test_an_expiry_from_the_defaults_is_named_as_such() -> None:
    user = make_user(default_options={"expires_at": "2024-05-02T00:00:00+00:00"})
    with pytest.raises(MessageRejected) as caught:
        run(make_message("X-NextLaunchTime: 2024-05-03T00:00:00Z"), sender=make_sender(user=user))
    assert "X-LaunchExpireTime" not in caught.value.text
    assert caught.value.text.endswith(
        "check the expiry of the account's or SMTP user's default options"
    )


def test_default_expiry_follows_the_limits() -> None:
    limits = replace(LIMITS, max_queue_lifetime=timedelta(hours=5))
    (recipient,) = run(limits=limits).message.recipients
    assert recipient.expires_at == NOW + timedelta(hours=5)


# -- sender policy -------------------------------------------------------------------------


def _restricted_sender(policy: str, **account: Any) -> Sender:
    return make_sender(
        account=make_account(unauthorised_sender_policy=policy, **account),
        user=make_user(authorised_senders=("news@acme.com",)),
    )


def test_authorised_sender_is_accepted_under_block() -> None:
    accepted = run(sender=_restricted_sender("block"))
    assert accepted.alerts == ()


def test_unauthorised_from_is_refused_under_block_naming_the_address() -> None:
    data = make_message(sender="Sales <sales@acme.com>")
    with pytest.raises(MessageRejected) as caught:
        run(data, sender=_restricted_sender("block"))
    rejected = caught.value
    assert (rejected.code, rejected.enhanced) == (550, "5.7.1")
    assert "<sales@acme.com>" in rejected.text


def test_unauthorised_envelope_sender_is_refused_under_block_naming_it() -> None:
    with pytest.raises(MessageRejected) as caught:
        run(sender=_restricted_sender("block"), mail_from="bounces@acme.com")
    assert (caught.value.code, caught.value.enhanced) == (550, "5.7.1")
    assert "<bounces@acme.com>" in caught.value.text


def test_from_outside_the_sending_domains_is_refused_under_block() -> None:
    data = make_message(sender="someone@gmail.com")
    with pytest.raises(MessageRejected) as caught:
        run(data)
    assert (caught.value.code, caught.value.enhanced) == (550, "5.7.1")
    assert "<someone@gmail.com>" in caught.value.text
    assert "acme.com" in caught.value.text


def test_unauthorised_sender_is_accepted_under_alert_with_the_problems() -> None:
    data = make_message(sender="Sales <sales@acme.com>")
    accepted = run(data, sender=_restricted_sender("alert"))
    assert [p.address for p in accepted.alerts] == ["sales@acme.com"]
    assert "sales@acme.com" in accepted.alerts[0].reason
    assert accepted.message.recipients  # queued like any other message


def test_alerts_under_alert_policy_reach_the_stored_message() -> None:
    data = make_message(sender="Sales <sales@acme.com>")
    accepted = run(data, sender=_restricted_sender("alert"))
    assert accepted.message.alerts == tuple(p.reason for p in accepted.alerts)


def test_null_sender_is_accepted_and_only_the_from_is_judged() -> None:
    accepted = run(sender=_restricted_sender("block"), mail_from="")
    message = accepted.message
    assert message.mail_from == ""
    assert message.header_from == "news@acme.com"
    assert accepted.alerts == ()
    assert message.recipients[0].address == "bob@example.org"


def test_null_sender_with_an_unauthorised_from_is_still_refused() -> None:
    data = make_message(sender="sales@acme.com")
    with pytest.raises(MessageRejected) as caught:
        run(data, sender=_restricted_sender("block"), mail_from="")
    assert "<sales@acme.com>" in caught.value.text


def test_envelope_sender_at_a_subdomain_of_a_sending_domain_is_fine() -> None:
    accepted = run(mail_from="bounce+123@bounce.acme.com")
    assert accepted.alerts == ()


# -- envelope_sender_problems --------------------------------------------------------------


def test_envelope_sender_problems_null_sender_has_none() -> None:
    assert envelope_sender_problems(_restricted_sender("block"), "") == []
    assert envelope_sender_problems(make_sender(domains=()), "") == []


def test_envelope_sender_problems_authorised_has_none() -> None:
    assert envelope_sender_problems(_restricted_sender("block"), "news@acme.com") == []
    assert envelope_sender_problems(make_sender(), "anyone@bounce.acme.com") == []


def test_envelope_sender_problems_unauthorised_names_the_envelope_sender_first() -> None:
    problems = envelope_sender_problems(_restricted_sender("block"), "other@acme.com")
    assert problems
    assert problems[0].address == "other@acme.com"
    assert problems[0].reason.startswith("envelope sender <other@acme.com>")


def test_envelope_sender_problems_outside_sending_domains() -> None:
    sender = make_sender(user=False)
    problems = envelope_sender_problems(sender, "x@elsewhere.example")
    assert problems
    assert problems[0].reason.startswith("envelope sender <x@elsewhere.example>")
    assert all(p.address == "x@elsewhere.example" for p in problems)


def test_envelope_sender_problems_without_sending_domain() -> None:
    problems = envelope_sender_problems(make_sender(domains=()), "news@acme.com")
    assert any("no sending domain" in p.reason for p in problems)


# -- duplicate detection key ---------------------------------------------------------------


def test_dedupe_key_only_when_the_client_gave_a_message_id() -> None:
    with_id = run(make_message(message_id="<abc@acme.com>")).message
    assert with_id.dedupe_key == dedupe_key(
        7, "<abc@acme.com>", "news@acme.com", ("bob@example.org",)
    )
    assert run(make_message(message_id=None)).message.dedupe_key is None


def test_dedupe_key_is_not_made_when_detection_is_off() -> None:
    limits = replace(LIMITS, duplicate_detection=False)
    assert run(limits=limits).message.dedupe_key is None


def test_dedupe_key_ignores_recipient_order_and_case() -> None:
    first = run(recipients=("a@example.org", "b@example.org")).message
    second = run(recipients=("B@Example.org", "a@example.org")).message
    assert first.dedupe_key is not None
    assert first.dedupe_key == second.dedupe_key


@pytest.mark.parametrize(
    "change",
    [
        {"recipients": ("a@example.org",)},
        {"recipients": ("a@example.org", "b@example.org", "c@example.org")},
        {"mail_from": "other@acme.com"},
        {"mail_from": ""},
        {"message_id": "<other@acme.com>"},
        {"account_id": 8},
    ],
)
def test_dedupe_key_differs_when_anything_that_identifies_the_message_differs(
    change: dict[str, Any],
) -> None:
    base: dict[str, Any] = {
        "account_id": 7,
        "message_id": "<m1@acme.com>",
        "mail_from": "news@acme.com",
        "recipients": ("a@example.org", "b@example.org"),
    }
    assert dedupe_key(**base) != dedupe_key(**{**base, **change})


def test_null_sender_message_still_gets_a_dedupe_key() -> None:
    message = run(mail_from="").message
    assert message.dedupe_key == dedupe_key(7, "<m1@acme.com>", "", ("bob@example.org",))


# -- inbound (mail to a bounce domain) -----------------------------------------------------


def test_inbound_keeps_the_message_as_received_with_no_recipient_rows() -> None:
    data = (
        b"From: MAILER-DAEMON@mx.example.org\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"X-OV-Tag: kept as received\r\n"
        b"\r\n"
        b"The mail system said no.\r\n"
    )
    envelope = make_envelope(
        data,
        mail_from="",
        recipients=("b+QID@bounce.acme.com",),
        tls=None,
        authenticated=False,
    )
    message = inbound(7, envelope, queue_id=QUEUE_ID, now=NOW, limits=LIMITS)
    assert message.id == QUEUE_ID
    assert message.account_id == 7
    assert message.smtp_user_id is None
    assert message.event_type == "inbound"
    assert message.recipients == ()
    assert message.dedupe_key is None
    assert message.options == {}
    assert message.mail_from == ""
    assert message.header_from == "MAILER-DAEMON@mx.example.org"
    assert message.subject == "Undelivered Mail Returned to Sender"
    assert message.message_id_header is None
    assert message.received_at == NOW
    received, rest = split_received(message.raw)
    assert rest == data  # nothing removed, nothing added
    assert received == (
        "from client.example ([192.0.2.10]) by mx.postlane.test (Postlane)"
        f" with ESMTP id {QUEUE_ID} for <b+QID@bounce.acme.com>; Wed, 01 May 2024 08:00:00 +0000"
    )
    assert message.event_data == {
        "session": "s-1",
        "client_ip": "192.0.2.10",
        "recipients": ["b+QID@bounce.acme.com"],
        "size": len(message.raw),
    }


def test_inbound_over_tls_and_without_a_from() -> None:
    data = b"Subject: odd bounce\r\n\r\nbody\r\n"
    envelope = make_envelope(
        data, mail_from="", recipients=("a@bounce.acme.com", "b@bounce.acme.com"), tls=TLS
    )
    message = inbound(7, envelope, queue_id=QUEUE_ID, now=NOW, limits=LIMITS)
    assert message.header_from == ""
    (received,) = header_values(message.raw, "Received")
    assert f" with ESMTPS id {QUEUE_ID};" in received
    assert message.event_data["recipients"] == ["a@bounce.acme.com", "b@bounce.acme.com"]


@pytest.mark.parametrize(
    ("subject", "stored"),
    [
        # A remote MTA's bounce with a Latin-1 Subject: the text columns once
        # held lone surrogates, which the database refuses: 451 for ever.
        (b"caf\xe9", "caf\ufffd"),
        (b"odd\x00one", "odd\ufffdone"),  # PostgreSQL stores no NUL in text
    ],
)
def test_inbound_header_text_a_database_cannot_store_becomes_replacement_characters(
    subject: bytes, stored: str
) -> None:
    data = b"From: MAILER-DAEMON@mx.example.org\r\nSubject: " + subject + b"\r\n\r\nbody\r\n"
    envelope = make_envelope(
        data, mail_from="", recipients=("b@bounce.acme.com",), tls=None, authenticated=False
    )
    message = inbound(7, envelope, queue_id=QUEUE_ID, now=NOW, limits=LIMITS)
    assert message.subject == stored
    assert split_received(message.raw)[1] == data  # the bytes themselves are kept
