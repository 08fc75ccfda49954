from __future__ import annotations

import dataclasses

import pytest

from postlane.delivery.bounce_class import BounceKind, Classification, classify, throttles

H, S, P, R, C, T, TLS, U = (
    BounceKind.HARD,
    BounceKind.SOFT,
    BounceKind.POLICY,
    BounceKind.REPUTATION,
    BounceKind.CONTENT,
    BounceKind.THROTTLED,
    BounceKind.TLS,
    BounceKind.UNDETERMINED,
)

# (code, enhanced, text, kind) — replies as real servers word them.
REPLIES = [
    # hard: the address is bad
    (
        550,
        "5.1.1",
        "The email account that you tried to reach does not exist. Please try double-checking "
        "the recipient's email address for typos or unnecessary spaces.",
        H,
    ),
    (550, "5.1.1", "<nobody@example.org>: Recipient address rejected: User unknown", H),
    (550, "5.1.2", "Host unknown: example.invalid", H),
    (553, "5.1.3", "Invalid address syntax", H),
    (550, "5.1.6", "Recipient mailbox has moved, no forwarding address", H),
    (
        550,
        "5.1.10",
        "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        H,
    ),
    (550, "5.1.10", "Recipient address has null MX", H),
    (550, "5.2.1", "The email account that you tried to reach is disabled.", H),
    (550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)", H),
    (550, None, "No such user here", H),
    (550, None, "Requested action not taken: mailbox unavailable: user does not exist", H),
    (554, "5.0.0", "<x@example.org>: unknown recipient", H),
    # soft: the mailbox or the receiving system, not the address
    (452, "4.2.2", "The email account that you tried to reach is over quota.", S),
    (552, "5.2.2", "The email account that you tried to reach is over quota.", S),
    (552, None, "Requested mail action aborted: exceeded storage allocation", S),
    (450, "4.2.0", "<x@example.org>: Recipient address rejected: Greylisted, see http://x/", S),
    (451, "4.3.0", "Temporary local problem - please try later", S),
    (451, "4.1.1", "<x@example.org>: Recipient address rejected: User unknown", S),
    (450, None, "Mailbox temporarily unavailable", S),
    (552, "5.3.1", "Mail system full", S),
    # policy: about the sender, never suppressed
    (
        550,
        "5.7.26",
        "Unauthenticated email from example.com is not accepted due to domain's DMARC policy.",
        P,
    ),
    (550, "5.7.23", "The message was rejected because of Sender Policy Framework violation", P),
    (550, "5.7.1", "SPF check failed: example.com does not designate 192.0.2.1", P),
    (550, "5.7.1", "Message rejected: DKIM signature verification failed", P),
    (554, "5.7.1", "<x@example.org>: Relay access denied", P),
    (553, "5.1.8", "<b-a@bounce.example.com>: Sender address rejected: Domain not found", P),
    (550, "5.7.0", "Sender not permitted by local policy", P),
    (450, "4.7.1", "Client host rejected: cannot find your reverse hostname, [192.0.2.1]", P),
    (550, "5.7.27", "Sender address has null MX", P),
    (550, "5.7.1", "Unknown user", P),  # the X.7 code outranks the text: never suppressed
    (550, "5.7.1", "<x@example.org>: Recipient address rejected: User unknown", P),
    # reputation: blocklists and the sending IP's standing
    (
        554,
        "5.7.1",
        "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; "
        "https://www.spamhaus.org/query/ip/192.0.2.1",
        R,
    ),
    (
        550,
        "5.7.1",
        "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet "
        "service provider since part of their network is on our block list (S3150).",
        R,
    ),
    (
        421,
        "4.7.0",
        "[192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating "
        "from your IP address. To protect our users from spam, mail sent from your IP address "
        "has been temporarily blocked.",
        R,
    ),
    (
        550,
        "5.7.28",
        "[192.0.2.1] There is an unusual rate of unsolicited mail originating from your IP "
        "address. To protect our users from spam, mail sent from your IP address has been "
        "blocked.",
        R,
    ),
    (550, "5.7.1", "Mail from 192.0.2.1 refused: listed at bl.spamcop.net", R),
    (550, "5.7.1", "Message rejected due to poor IP reputation", R),
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]", R),
    (550, "5.7.511", "Access denied, banned sender[x@example.com]", R),
    (
        451,
        "4.7.650",
        "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
        R,
    ),
    (
        421,
        "4.7.0",
        "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
        "complaints - 4.16.55.1",
        R,
    ),
    (554, None, "Your IP 192.0.2.1 is blocked", R),
    # content
    (
        552,
        "5.7.0",
        "This message was blocked because its content presents a potential security issue.",
        C,
    ),
    (550, "5.7.1", "Our system has detected that this message is likely unsolicited mail.", C),
    (554, "5.7.1", "Message rejected as spam by Content Filtering", C),
    (554, None, "Virus found: Eicar-Test-Signature", C),
    (550, "5.6.0", "Message rejected: malformed MIME structure", C),
    (552, "5.3.4", "Message size exceeds fixed maximum message size", C),
    (552, None, "Message size exceeds fixed limit", C),
    (552, "5.2.3", "Message length exceeds administrative limit", C),
    # throttled
    (
        421,
        "4.7.28",
        "[192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating "
        "from your IP address. To protect our users from spam, mail sent from your IP address "
        "has been temporarily rate limited.",
        T,
    ),
    (
        450,
        "4.2.1",
        "The user you are trying to contact is receiving mail at a rate that prevents "
        "additional messages from being delivered. Please resend your message at a later time.",
        T,
    ),
    (450, "4.2.1", "try later", T),
    (550, "5.2.1", "The user is receiving mail too quickly", T),
    (421, None, "Too many concurrent SMTP connections; please try again later.", T),
    (452, "4.5.3", "Too many recipients", T),
    (451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77714)", T),
    (421, "4.7.0", "Rate limit exceeded, try again later", T),
    (421, None, "Service not available, closing transmission channel", T),
    # tls
    (530, "5.7.0", "Must issue a STARTTLS command first", TLS),
    (550, "5.7.10", "Encryption needed", TLS),
    (454, "4.7.5", "Cryptographic failure", TLS),
    (550, "5.7.30", "REQUIRETLS support required", TLS),
    (451, None, "TLS is required, but was not offered by host", TLS),
    # undetermined: a permanent failure without a recognised cause
    (550, None, "Requested action not taken: mailbox unavailable", U),
    (554, "5.0.0", "Transaction failed", U),
    (554, "5.4.4", "Unable to route", U),
    (500, None, "", U),
]


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "kind"),
    REPLIES,
    ids=[f"{r[0]}-{r[1]}-{r[3]}-{i}" for i, r in enumerate(REPLIES)],
)
def test_classification_table(code: int, enhanced: str | None, text: str, kind: BounceKind) -> None:
    result = classify(code, enhanced, text)
    assert result.kind is kind, result.reason
    assert result.permanent is (code >= 500)
    assert result.suppress is (kind is BounceKind.HARD)
    assert result.reason


def test_only_permanent_hard_bounces_suppress() -> None:
    for code, enhanced, text, _ in REPLIES:
        result = classify(code, enhanced, text)
        assert result.suppress == (result.kind is BounceKind.HARD and result.permanent)


def test_mailbox_full_is_permanent_but_not_suppressed() -> None:
    assert classify(552, "5.2.2", "Mailbox full") == Classification(
        kind=BounceKind.SOFT, permanent=True, suppress=False, reason="mailbox full"
    )


def test_policy_rejections_do_not_suppress() -> None:
    result = classify(550, "5.7.26", "DMARC policy")
    assert (result.kind, result.permanent, result.suppress) == (BounceKind.POLICY, True, False)


@pytest.mark.parametrize(
    ("enhanced", "text"),
    [
        ("5.7.1", "Unknown user"),
        ("5.7.0", "No such user here"),
        ("5.7.1", "Recipient address rejected: undeliverable address: invalid recipient"),
        ("5.07.001", "user unknown"),
        (None, "5.7.1 Unknown user"),  # the code at the start of the text is as explicit
    ],
)
def test_a_policy_code_outranks_an_unknown_user_text(enhanced: str | None, text: str) -> None:
    result = classify(550, enhanced, text)
    assert (result.kind, result.permanent, result.suppress) == (BounceKind.POLICY, True, False)
    assert "policy" in result.reason and "does not exist" in result.reason


def test_an_unknown_user_text_without_a_policy_code_still_suppresses() -> None:
    for enhanced in (None, "5.0.0", "5.1.0"):
        assert classify(550, enhanced, "Unknown user").suppress


def test_a_temporary_unknown_user_is_soft() -> None:
    result = classify(450, "4.1.1", "<x@example.org>: Recipient address rejected: User unknown")
    assert (result.kind, result.permanent, result.suppress) == (BounceKind.SOFT, False, False)
    assert result.reason.endswith("(temporary reply)")


def test_the_enhanced_code_at_the_start_of_the_text_is_used() -> None:
    assert classify(550, None, "5.1.1 <x@example.org>: Recipient address rejected").kind is H
    assert classify(550, None, "  5.1.10 RESOLVER.ADR.RecipientNotFound").kind is H


def test_enhanced_code_outranks_text() -> None:
    # 5.2.2 says "mailbox full" even though the text would say "unknown user".
    assert classify(552, "5.2.2", "unknown user or mailbox full").kind is S


@pytest.mark.parametrize("enhanced", ["5.1", "x.1.1", "5.1.1.1", "5.1.1000", "2.1.1", ""])
def test_malformed_enhanced_codes_are_ignored(enhanced: str) -> None:
    result = classify(550, enhanced, "Requested action not taken: mailbox unavailable")
    assert result.kind is U


def test_a_malformed_argument_falls_back_to_the_code_in_the_text() -> None:
    assert classify(550, "bogus", "5.1.1 user unknown").kind is H


def test_leading_zeros_in_enhanced_codes() -> None:
    assert classify(550, "5.01.001", "Bad destination mailbox").kind is H
    assert classify(550, " 5.1.1 ", "").kind is H


def test_enhanced_code_of_the_wrong_class_does_not_make_a_4xx_permanent() -> None:
    result = classify(450, "5.1.1", "user unknown")
    assert (result.kind, result.permanent, result.suppress) == (BounceKind.SOFT, False, False)


def test_not_listed_is_not_a_blocklist() -> None:
    assert classify(550, None, "User not listed in public Name & Address Book").kind is U


@pytest.mark.parametrize("code", [250, 354, 399, 600, 0])
def test_only_failure_codes_are_classified(code: int) -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        classify(code, None, "")


def test_classification_is_frozen() -> None:
    result = classify(550, "5.1.1", "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.suppress = False  # type: ignore[misc]


def test_kinds_are_strings_for_reports() -> None:
    assert [str(kind) for kind in BounceKind] == [
        "hard",
        "soft",
        "policy",
        "reputation",
        "content",
        "throttled",
        "tls",
        "undetermined",
    ]


# -- slowing down: throttles() ------------------------------------------------------------------

THROTTLING = [
    # any 421, whatever its kind: Gmail, Yahoo (reputation words), a bare one
    (421, "4.7.0", "Temporary System Problem. Try again later"),
    (
        421,
        "4.7.0",
        "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
        "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
    ),
    (421, "4.7.0", "Too many connections from your IP, slow down"),
    (421, "4.7.0", "Must issue a STARTTLS command first"),  # a 421 closes the channel anyway
    (421, None, "Service not available, closing transmission channel"),
    # a temporary 4.7.x about rate or a deferral, whatever the kind says
    (
        451,
        "4.7.650",
        "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation. "
        "For e-mail delivery information, see https://postmaster.outlook.com (S775)",
    ),
    (451, "4.7.0", "Temporary System Problem. Try again later"),
    (450, "4.7.1", "Messages from 192.0.2.1 temporarily deferred due to unexpected volume"),
    (451, "4.7.1", "Slow down, please"),
    # replies classified throttled, as before
    (450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that prevents"),
    (451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77714)"),
    (550, "5.2.1", "The user is receiving mail too quickly"),
]

NOT_THROTTLING = [
    (451, "4.7.1", "greylisted, try again later"),
    (450, "4.7.1", "<x@example.org>: Recipient address rejected: Greylisted for 300 seconds"),
    (451, "4.7.0", "Must issue a STARTTLS command first"),
    (450, "4.7.1", "Client host rejected: cannot find your reverse hostname, [192.0.2.1]"),
    (451, "4.3.0", "Temporary local problem - please try later"),  # not 4.7: not the sender
    (550, "5.7.1", "Message refused by local policy, try again later"),  # permanent
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]"),
    (250, "2.0.0", "Ok"),  # not a refusal at all
]


@pytest.mark.parametrize(("code", "enhanced", "text"), THROTTLING)
def test_throttling_replies_slow_down(code: int, enhanced: str | None, text: str) -> None:
    assert throttles(code, enhanced, text)


@pytest.mark.parametrize(("code", "enhanced", "text"), NOT_THROTTLING)
def test_other_refusals_do_not_slow_down(code: int, enhanced: str | None, text: str) -> None:
    assert not throttles(code, enhanced, text)


def test_the_kind_on_record_is_unchanged_by_slowing_down() -> None:
    yahoo = "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume"
    assert classify(421, "4.7.0", yahoo).kind is R
    assert classify(421, "4.7.0", "Temporary System Problem. Try again later").kind is P
