from __future__ import annotations

import dataclasses

import pytest

from postlane.delivery import verp
from postlane.delivery.bounce_class import BounceKind, classify
from postlane.delivery.dsn import MAX_VALUE, Arf, Dsn, DsnRecipient, parse_report

KEY = b"verp-test-key-0123456789abcdef"
VERP = verp.encode(4242, key=KEY, domain="bounce.example.com")


def sample(text: str, *, crlf: bool = False) -> bytes:
    data = text.replace("{verp}", VERP).encode("utf-8")
    return data.replace(b"\n", b"\r\n") if crlf else data


# A Postfix relay that accepted the message and then failed to deliver it.
POSTFIX = """\
Return-Path: <>
Received: from mail.example.net (mail.example.net [198.51.100.10])
\tby bounce.example.com (Postlane) with ESMTPS
\tfor <{verp}>; Sat,  1 Mar 2025 12:00:05 +0000 (UTC)
Date: Sat,  1 Mar 2025 12:00:04 +0000 (UTC)
From: MAILER-DAEMON@mail.example.net (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {verp}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4F1A2B3C.1740830404/mail.example.net"
Content-Transfer-Encoding: 8bit
Message-Id: <20250301120004.5D2E31A0@mail.example.net>

This is a MIME-encapsulated message.

--4F1A2B3C.1740830404/mail.example.net
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mail.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

                   The mail system

<nobody@example.org>: host mx.example.org[192.0.2.25] said: 550 5.1.1
    <nobody@example.org>: Recipient address rejected: User unknown in virtual
    mailbox table (in reply to RCPT TO command)

--4F1A2B3C.1740830404/mail.example.net
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.example.net
X-Postfix-Queue-ID: 4F1A2B3C
X-Postfix-Sender: rfc822; {verp}
Arrival-Date: Sat,  1 Mar 2025 12:00:01 +0000 (UTC)

Final-Recipient: rfc822; nobody@example.org
Original-Recipient: rfc822;nobody@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address
    rejected: User unknown in virtual mailbox table

--4F1A2B3C.1740830404/mail.example.net
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Received: from out1.postlane.example (out1.postlane.example [203.0.113.5])
\tby mail.example.net (Postfix) with ESMTPS id 4F1A2B3C
\tfor <nobody@example.org>; Sat,  1 Mar 2025 12:00:01 +0000 (UTC)
From: Shop News <news@shop.example.com>
To: nobody@example.org
Subject: March offers
Message-ID: <abc123@shop.example.com>
Date: Sat, 01 Mar 2025 12:00:00 +0000

--4F1A2B3C.1740830404/mail.example.net--
"""

# Exchange Online's NDR: CRLF, a multipart/alternative human part, the original attached.
EXCHANGE = """\
Received: from AM0PR01MB1234.eurprd01.prod.exchangelabs.com (2603:10a6:208::12)
 by bounce.example.com; Sat, 1 Mar 2025 12:00:09 +0000
From: Microsoft Outlook
\t<MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@contoso.com>
To: <{verp}>
Date: Sat, 1 Mar 2025 12:00:09 +0000
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="b35f2a8a-1c44-4f3f-9f7c-3a9f6c2f1e10"
X-MS-Exchange-Message-Is-Ndr:
Content-Language: en-US
Message-ID:
 <0f1e2d3c-aaaa-bbbb-cccc-1234567890ab@AM0PR01MB1234.eurprd01.prod.exchangelabs.com>
In-Reply-To: <abc124@shop.example.com>
Subject: Undeliverable: March offers
MIME-Version: 1.0

--b35f2a8a-1c44-4f3f-9f7c-3a9f6c2f1e10
Content-Type: multipart/alternative; differences=Content-Type;
\tboundary="6c1d9e0f-2b3a-4c5d-8e7f-0a1b2c3d4e5f"

--6c1d9e0f-2b3a-4c5d-8e7f-0a1b2c3d4e5f
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

Your message to someone@contoso.com couldn't be delivered.
someone wasn't found at contoso.com.

--6c1d9e0f-2b3a-4c5d-8e7f-0a1b2c3d4e5f
Content-Type: text/html; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

<html><body><p>Your message to someone@contoso.com couldn't be delivered.</p></body></html>
--6c1d9e0f-2b3a-4c5d-8e7f-0a1b2c3d4e5f--

--b35f2a8a-1c44-4f3f-9f7c-3a9f6c2f1e10
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.exchangelabs.com
Received-From-MTA: dns;out1.postlane.example
Arrival-Date: Sat, 1 Mar 2025 12:00:08 +0000

Original-Recipient: rfc822;someone@contoso.com
Final-Recipient: rfc822;someone@contoso.com
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP
 address lookup
X-Display-Name: someone@contoso.com

--b35f2a8a-1c44-4f3f-9f7c-3a9f6c2f1e10
Content-Type: message/rfc822

Received: from out1.postlane.example (203.0.113.5) by
 AM0PR01MB1234.eurprd01.prod.exchangelabs.com; Sat, 1 Mar 2025 12:00:08 +0000
From: Shop News <news@shop.example.com>
To: <someone@contoso.com>
Subject: March offers
Message-ID: <abc124@shop.example.com>
Date: Sat, 1 Mar 2025 12:00:00 +0000
MIME-Version: 1.0
Content-Type: text/plain; charset="us-ascii"

Our March offers.

--b35f2a8a-1c44-4f3f-9f7c-3a9f6c2f1e10--
"""

# Gmail's mailer-daemon, reporting one failed and one delayed recipient of one message.
GMAIL = """\
Received: by mail-sor-f41.google.com with SMTP id a1sor123456;
        Sat, 01 Mar 2025 04:00:03 -0800 (PST)
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: {verp}
Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Failure)
References: <abc125@shop.example.com>
In-Reply-To: <abc125@shop.example.com>
X-Failed-Recipients: gone@example.org
Message-ID: <67c2f5a3.050a0220.1f2c3d.0001.GMR@mx.google.com>
Date: Sat, 01 Mar 2025 04:00:03 -0800 (PST)
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000000000000a1b2c3d4e5f60718";
\treport-type=delivery-status

--000000000000a1b2c3d4e5f60718
Content-Type: multipart/related; boundary="000000000000a1b2c3d4e5f60719"

--000000000000a1b2c3d4e5f60719
Content-Type: text/html; charset="UTF-8"

<html><body>Address not found. Your message wasn't delivered to gone@example.org
because the address couldn't be found.</body></html>

--000000000000a1b2c3d4e5f60719--

--000000000000a1b2c3d4e5f60718
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Arrival-Date: Sat, 01 Mar 2025 04:00:00 -0800 (PST)
Original-Envelope-Id: pl-4242
X-Original-Message-ID: <abc125@shop.example.com>

Final-Recipient: rfc822; gone@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.org. (192.0.2.25, the server for the domain example.org.)
Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach does not exist.
 550 5.1.1 https://support.google.com/mail/?p=NoSuchUser
Last-Attempt-Date: Sat, 01 Mar 2025 04:00:02 -0800 (PST)

Final-Recipient: rfc822; slow@example.net
Action: delayed
Status: 4.4.1
Remote-MTA: dns; mx.example.net. (198.51.100.7, the server for the domain example.net.)
Diagnostic-Code: smtp; 421 4.4.1 Connection timed out
Will-Retry-Until: Mon, 03 Mar 2025 04:00:00 -0800 (PST)

--000000000000a1b2c3d4e5f60718
Content-Type: message/rfc822

Return-Path: <{verp}>
From: Shop News <news@shop.example.com>
To: gone@example.org, slow@example.net
Subject: =?UTF-8?Q?M=C3=A4rz_offers?=
Message-ID: <abc125@shop.example.com>
Date: Sat, 01 Mar 2025 12:00:00 +0000
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"

Our March offers.

--000000000000a1b2c3d4e5f60718--
"""

# A mailbox provider's complaint, after RFC 5965 Appendix B.
ARF = """\
From: <feedback@mailbox-provider.example>
Date: Sat, 1 Mar 2025 14:40:36 +0000
Subject: FW: March offers
To: <fbl@bounce.example.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
203.0.113.5 on Sat, 1 Mar 2025 12:00:01 +0000. For more information
about this format please see http://www.mipassoc.org/arf/.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: Abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <{verp}>
Original-Rcpt-To: <user@mailbox-provider.example>
Arrival-Date: Sat, 1 Mar 2025 12:00:01 +0000
Reporting-MTA: dns; mx.mailbox-provider.example
Source-IP: 203.0.113.5
Authentication-Results: mx.mailbox-provider.example;
     spf=pass smtp.mail={verp}
Reported-Domain: shop.example.com
Reported-Uri: https://shop.example.com/march

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

Return-Path: <{verp}>
Received: from out1.postlane.example (out1.postlane.example [203.0.113.5])
     by mx.mailbox-provider.example; Sat, 1 Mar 2025 12:00:01 +0000
From: Shop News <news@shop.example.com>
To: <user@mailbox-provider.example>
Subject: March offers
MIME-Version: 1.0
Content-type: text/plain
Message-ID: <abc126@shop.example.com>
Date: Sat, 1 Mar 2025 12:00:00 +0000

Our March offers.
--part1_13d.2e68ed54_boundary--
"""

# A provider that redacts the recipient and returns only the original's headers.
ARF_REDACTED = """\
From: staff@hotmail.example
To: fbl@bounce.example.com
Subject: complaint about message from 203.0.113.5
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="jmrp"

--jmrp
Content-Type: text/plain

This is an email abuse report.

--jmrp
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: Hotmail FBL
Version: 1
Original-Mail-From: <>
Received-Date: Sat, 1 Mar 2025 12:00:01 +0000

--jmrp
Content-Type: text/rfc822-headers
Content-Transfer-Encoding: base64

UmV0dXJuLVBhdGg6IDxiLWJvdW5jZUBleGFtcGxlLmNvbT4KWC1Qb3N0bGFuZS1JZDogcGwtNDI0Mwpt
ZXNzYWdlLWlkOiA8YWJjMTI3QHNob3AuZXhhbXBsZS5jb20+Cg==
--jmrp--
"""


def _report(
    body: str, *, content_type: str = "multipart/report; report-type=delivery-status"
) -> bytes:
    return sample(
        "From: MAILER-DAEMON@mail.example.net\n"
        "To: {verp}\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: {content_type}; boundary="B"\n\n' + body
    )


def _status_report(status_part: str, *, extra: str = "") -> bytes:
    return _report(
        "--B\nContent-Type: text/plain\n\nYour message was not delivered.\n\n"
        f"--B\nContent-Type: message/delivery-status\n\n{status_part}\n" + extra + "--B--\n"
    )


# --- DSNs -----------------------------------------------------------------------------


def test_postfix_dsn() -> None:
    report = parse_report(sample(POSTFIX))
    assert isinstance(report, Dsn)
    assert report.reporting_mta == "mail.example.net"
    assert report.original_envelope_id is None
    assert report.recipients == (
        DsnRecipient(
            final_recipient="nobody@example.org",
            action="failed",
            status="5.1.1",
            diagnostic_code="550 5.1.1 <nobody@example.org>: Recipient address rejected: "
            "User unknown in virtual mailbox table",
            remote_mta="mx.example.org",
            original_recipient="nobody@example.org",
            diagnostic_type="smtp",
        ),
    )
    assert report.recipients[0].reply_code == 550
    assert report.return_path == VERP
    assert verp.decode(report.return_path, key=KEY) == 4242
    assert report.original_header("message-id") == "<abc123@shop.example.com>"
    assert report.original_header("Received") == (
        "from out1.postlane.example (out1.postlane.example [203.0.113.5]) by mail.example.net "
        "(Postfix) with ESMTPS id 4F1A2B3C for <nobody@example.org>; "
        "Sat, 1 Mar 2025 12:00:01 +0000 (UTC)"
    )
    assert report.original_header("X-Missing") is None


def test_exchange_ndr_with_crlf_line_ends() -> None:
    report = parse_report(sample(EXCHANGE, crlf=True))
    assert isinstance(report, Dsn)
    assert report.reporting_mta == "AM0PR01MB1234.eurprd01.prod.exchangelabs.com"
    (recipient,) = report.recipients
    assert recipient.final_recipient == "someone@contoso.com"
    assert recipient.original_recipient == "someone@contoso.com"
    assert (recipient.action, recipient.status, recipient.reply_code) == ("failed", "5.1.10", 550)
    assert recipient.diagnostic_code == (
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
    )
    assert recipient.remote_mta is None
    # No X-Postfix-Sender and no Return-Path in the original: the report's To names it.
    assert report.return_path == VERP
    assert report.original_header("Message-ID") == "<abc124@shop.example.com>"


def test_gmail_dsn_with_two_recipients() -> None:
    report = parse_report(sample(GMAIL))
    assert isinstance(report, Dsn)
    assert report.reporting_mta == "googlemail.com"
    assert report.original_envelope_id == "pl-4242"
    failed, delayed = report.recipients
    assert failed.final_recipient == "gone@example.org"
    assert failed.remote_mta == "mx.example.org"
    assert failed.diagnostic_code == (
        "550-5.1.1 The email account that you tried to reach does not exist. "
        "550 5.1.1 https://support.google.com/mail/?p=NoSuchUser"
    )
    assert failed.reply_code == 550
    assert failed.original_recipient is None
    assert (delayed.final_recipient, delayed.action, delayed.status) == (
        "slow@example.net",
        "delayed",
        "4.4.1",
    )
    assert delayed.remote_mta == "mx.example.net"
    assert delayed.reply_code == 421
    assert report.return_path == VERP
    # Encoded words are kept as sent: the values are for matching, not display.
    assert report.original_header("Subject") == "=?UTF-8?Q?M=C3=A4rz_offers?="


def test_dsn_recipients_feed_the_bounce_classifier() -> None:
    verdicts = []
    for raw in (POSTFIX, EXCHANGE, GMAIL):
        report = parse_report(sample(raw))
        assert isinstance(report, Dsn)
        for recipient in report.recipients:
            assert recipient.reply_code is not None
            assert recipient.diagnostic_code is not None
            result = classify(recipient.reply_code, recipient.status, recipient.diagnostic_code)
            verdicts.append((recipient.final_recipient, result.kind, result.suppress))
    assert verdicts == [
        ("nobody@example.org", BounceKind.HARD, True),
        ("someone@contoso.com", BounceKind.HARD, True),
        ("gone@example.org", BounceKind.HARD, True),
        ("slow@example.net", BounceKind.THROTTLED, False),
    ]


def test_x_postfix_sender_wins_over_the_report_to() -> None:
    raw = sample(POSTFIX).replace(b"To: " + VERP.encode(), b"To: forwarded@example.net")
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    assert report.return_path == VERP


def test_original_return_path_wins_over_the_report_to() -> None:
    raw = sample(GMAIL).replace(b"To: " + VERP.encode(), b"To: Shop <forwarded@example.net>")
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    assert report.return_path == VERP


def test_report_to_with_a_display_name() -> None:
    raw = sample(EXCHANGE).replace(f"To: <{VERP}>".encode(), f"To: Shop <{VERP}>".encode())
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    assert report.return_path == VERP


def test_no_return_path_anywhere() -> None:
    raw = _status_report("Reporting-MTA: dns; mx.example\n\nFinal-Recipient: rfc822; a@x.example")
    report = parse_report(raw.replace(b"To: " + VERP.encode() + b"\n", b""))
    assert isinstance(report, Dsn)
    assert report.return_path is None
    assert report.original_headers == ()


def test_report_type_parameter_is_not_needed() -> None:
    body = (
        "--B\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.example\n\nFinal-Recipient: rfc822; a@x.example\n"
        "Action: failed\nStatus: 5.0.0\n\n--B--\n"
    )
    report = parse_report(_report(body, content_type="multipart/report"))
    assert isinstance(report, Dsn)
    assert report.recipients[0].final_recipient == "a@x.example"


def test_a_report_inside_a_multipart_wrapper_is_found() -> None:
    inner = sample(POSTFIX).split(b"MIME-Version: 1.0\n", 1)[1]
    raw = (
        b"From: gateway@example.net\nTo: " + VERP.encode() + b"\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="W"\n\n--W\n' + inner + b"\n--W--\n"
    )
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    assert report.recipients[0].final_recipient == "nobody@example.org"


def test_status_field_details() -> None:
    raw = _status_report(
        "Reporting-MTA: dns; mx.example\n"
        "\n"
        "Final-Recipient: rfc822; <Upper@X.example>\n"
        "Action: Failed\n"
        "Status: 5.0.0 (permanent failure)\n"
        "Diagnostic-Code: X-Unix; delivery via local: permission denied\n"
        "\n"
        "Original-Recipient: rfc822; only-original@x.example\n"
        "Action: delayed\n"
        "Status: bogus\n"
        "\n"
        "Action: failed\n"
        "Status: 5.1.1\n"
        "\n"
        "Final-Recipient: rfc822; plain@x.example\n"
        "Diagnostic-Code: smtp; no reply code here\n"
        "Remote-MTA: dns; (unknown)\n"
    )
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    first, second, third = report.recipients  # the block without a recipient is skipped
    assert (first.final_recipient, first.action, first.status) == (
        "Upper@X.example",
        "failed",
        "5.0.0",
    )
    assert (first.diagnostic_type, first.reply_code) == ("x-unix", None)
    assert first.diagnostic_code == "delivery via local: permission denied"
    assert (second.final_recipient, second.original_recipient) == (
        "only-original@x.example",
        "only-original@x.example",
    )
    assert second.status is None
    assert (second.diagnostic_code, second.diagnostic_type, second.reply_code) == (None, None, None)
    assert (third.reply_code, third.action, third.remote_mta) == (None, None, None)


def test_a_missing_per_message_block_does_not_lose_the_first_recipient() -> None:
    raw = _status_report("Final-Recipient: rfc822; a@x.example\nAction: failed\nStatus: 5.1.1")
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    assert [r.final_recipient for r in report.recipients] == ["a@x.example"]
    assert report.reporting_mta is None


def test_global_delivery_status_for_smtputf8_mail() -> None:
    body = (
        "--B\nContent-Type: message/global-delivery-status\n\n"
        "Reporting-MTA: dns; mx.example\n\n"
        "Final-Recipient: utf-8; jöran@exämple.org\nAction: failed\nStatus: 5.1.1\n\n"
        "Final-Recipient: rfc822; two@example.org\nAction: delayed\nStatus: 4.4.1\n\n"
        "--B\nContent-Type: message/global-headers\n\n"
        "From: Jöran <news@shop.example.com>\nMessage-ID: <g1@shop.example.com>\n\n"
        "--B--\n"
    )
    report = parse_report(_report(body))
    assert isinstance(report, Dsn)
    assert [r.final_recipient for r in report.recipients] == [
        "jöran@exämple.org",
        "two@example.org",
    ]
    assert report.reporting_mta == "mx.example"
    assert report.original_header("From") == "Jöran <news@shop.example.com>"


def test_a_dsn_without_recipients_is_not_a_report() -> None:
    assert parse_report(_status_report("Reporting-MTA: dns; mx.example")) is None
    assert parse_report(_status_report("")) is None


def test_control_characters_in_dsn_fields_become_spaces() -> None:
    """A NUL cannot be stored in PostgreSQL text: a report carrying one must not reach it."""
    raw = (
        sample(POSTFIX)
        .replace(b"Status: 5.1.1\n", b"Status: 5.1.1\x00\n")
        .replace(b"Remote-MTA: dns; mx.example.org\n", b"Remote-MTA: dns; mx.\x01example.org\n")
        .replace(b"550 5.1.1 <nobody@example.org>: Recipient", b"550 5.1.1\x00<nob\x1body@\x7f>\tx")
    )
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    (block,) = report.recipients
    assert block.status == "5.1.1"
    assert block.remote_mta == "mx. example.org"
    assert block.diagnostic_code is not None
    assert block.diagnostic_code.startswith("550 5.1.1 <nob ody@ > x address rejected")
    assert block.reply_code == 550
    for value in (block.diagnostic_code, block.remote_mta, report.reporting_mta):
        assert value is not None
        assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value), value


def test_a_huge_field_is_cut() -> None:
    long_text = b"x" * (3 * MAX_VALUE)
    raw = sample(POSTFIX).replace(b"User unknown in virtual", long_text)
    report = parse_report(raw)
    assert isinstance(report, Dsn)
    diagnostic = report.recipients[0].diagnostic_code
    assert diagnostic is not None
    assert MAX_VALUE - len("smtp; ") == len(diagnostic)  # the whole field was cut
    assert diagnostic.startswith("550 5.1.1 <nobody@example.org>: Recipient address rejected: xx")


def test_reports_are_frozen() -> None:
    report = parse_report(sample(POSTFIX))
    assert isinstance(report, Dsn)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.return_path = "other@example.com"  # type: ignore[misc]


# --- ARF ------------------------------------------------------------------------------


def test_arf_complaint() -> None:
    report = parse_report(sample(ARF))
    assert isinstance(report, Arf)
    assert report.feedback_type == "abuse"
    assert report.user_agent == "SomeGenerator/1.0"
    assert report.original_mail_from == VERP
    assert report.original_rcpt_to == ("user@mailbox-provider.example",)
    assert report.source_ip == "203.0.113.5"
    assert report.reported_domain == "shop.example.com"
    assert report.arrival_date == "Sat, 1 Mar 2025 12:00:01 +0000"
    assert report.original_header("Message-ID") == "<abc126@shop.example.com>"
    assert verp.decode(report.original_mail_from, key=KEY) == 4242


def test_control_characters_in_arf_fields_become_spaces() -> None:
    raw = (
        sample(ARF)
        .replace(b"Feedback-Type: Abuse\n", b"Feedback-Type: Abuse\x00\n")
        .replace(b"User-Agent: SomeGenerator/1.0", b"User-Agent: Some\x00Generator/1.0\x08")
        .replace(b"Source-IP: 203.0.113.5", b"Source-IP: 203.0.113.5\x00")
    )
    report = parse_report(raw)
    assert isinstance(report, Arf)
    assert report.feedback_type == "abuse"
    assert report.user_agent == "Some Generator/1.0"
    assert report.source_ip == "203.0.113.5"


def test_arf_with_several_recipients() -> None:
    raw = sample(ARF).replace(
        b"Original-Rcpt-To: <user@mailbox-provider.example>\n",
        b"Original-Rcpt-To: <user@mailbox-provider.example>\nOriginal-Rcpt-To: two@x.example\n",
    )
    report = parse_report(raw)
    assert isinstance(report, Arf)
    assert report.original_rcpt_to == ("user@mailbox-provider.example", "two@x.example")


def test_arf_with_the_recipient_redacted() -> None:
    report = parse_report(sample(ARF_REDACTED))
    assert isinstance(report, Arf)
    assert report.original_rcpt_to == ()
    assert report.original_mail_from is None  # the null path <>
    assert report.arrival_date == "Sat, 1 Mar 2025 12:00:01 +0000"  # from Received-Date
    assert (report.source_ip, report.reported_domain) == (None, None)
    # The original's headers, base64-encoded by the provider, still identify the message.
    assert report.original_header("Return-Path") == "<b-bounce@example.com>"
    assert report.original_header("X-Postlane-Id") == "pl-4243"
    assert report.original_header("Message-ID") == "<abc127@shop.example.com>"


def test_arf_without_feedback_type_is_not_a_report() -> None:
    raw = sample(ARF).replace(b"Feedback-Type: Abuse\n", b"")
    assert parse_report(raw) is None


# --- not reports ----------------------------------------------------------------------

HUMAN_REPLY = """\
From: Alice <alice@example.org>
To: {verp}
Subject: Re: March offers
Content-Type: text/plain; charset=utf-8

Please stop sending me these.
"""

READ_RECEIPT = """\
From: alice@example.org
To: news@shop.example.com
Subject: Read: March offers
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification; boundary="R"

--R
Content-Type: text/plain

Your message was displayed.

--R
Content-Type: message/disposition-notification

Reporting-UA: mail.example.org; Webmail
Final-Recipient: rfc822; alice@example.org
Original-Message-ID: <abc123@shop.example.com>
Disposition: manual-action/MDN-sent-manually; displayed

--R--
"""


def _forwarded(report: bytes) -> bytes:
    return (
        b"From: Alice <alice@example.org>\nTo: " + VERP.encode() + b"\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="F"\n\n'
        b"--F\nContent-Type: text/plain\n\nWhy did I get this?\n\n"
        b"--F\nContent-Type: message/rfc822\n\n" + report + b"\n--F--\n"
    )


@pytest.mark.parametrize(
    "raw",
    [
        sample(HUMAN_REPLY),
        sample(READ_RECEIPT),
        _forwarded(sample(POSTFIX)),
        _forwarded(sample(ARF)),
        _report("--B\nContent-Type: text/plain\n\nno status part\n--B--\n"),
        b"",
        b"\x00\xff\xfe garbage \r\n\r\n\x80",
        b"Content-Type: multipart/report\n\nno boundary at all",
    ],
    ids=[
        "human-reply",
        "read-receipt",
        "forwarded-dsn",
        "forwarded-arf",
        "report-without-status",
        "empty",
        "garbage",
        "broken-multipart",
    ],
)
def test_not_a_report(raw: bytes) -> None:
    assert parse_report(raw) is None
