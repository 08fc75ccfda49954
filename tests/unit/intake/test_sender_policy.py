"""Sender policy: SMTP+ authorised senders and domains, sending domains, From alignment."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.intake.sender_policy import SenderProblem, check_sender

AUTH_REASON = "is not an authorised sender of this SMTP user"


def _check(
    mail_from: str,
    header_from: str,
    *,
    domains: Sequence[str] = (),
    senders: Sequence[str] = (),
    sending: Sequence[str] = ("acme.com",),
) -> list[SenderProblem]:
    return check_sender(
        mail_from=mail_from,
        header_from=header_from,
        authorised_domains=domains,
        authorised_senders=senders,
        sending_domains=sending,
    )


def test_no_authorisation_lists_allow_everyone_in_the_sending_domain() -> None:
    assert _check("bounce@acme.com", "news@acme.com") == []


@pytest.mark.parametrize(
    ("domains", "senders", "address"),
    [
        (["acme.com"], [], "anyone@acme.com"),
        (["ACME.com"], [], "Anyone@Acme.COM"),
        (["marketing.acme.com"], [], "x@marketing.acme.com"),
        ([], ["info@acme.com"], "info@acme.com"),
        ([], ["Info@ACME.com"], "INFO@acme.com"),
        (["other.com"], ["info@acme.com"], "info@acme.com"),
    ],
)
def test_authorised_addresses(domains: list[str], senders: list[str], address: str) -> None:
    assert _check(address, address, domains=domains, senders=senders) == []


@pytest.mark.parametrize(
    ("domains", "senders", "address"),
    [
        (["acme.com"], [], "x@marketing.acme.com"),
        (["marketing.acme.com"], [], "x@acme.com"),
        ([], ["info@acme.com"], "sales@acme.com"),
        ([], ["info@acme.com"], "info@marketing.acme.com"),
        (["other.com"], [], "x@acme.com"),
    ],
)
def test_unauthorised_addresses_name_both_roles(
    domains: list[str], senders: list[str], address: str
) -> None:
    assert _check(address, address, domains=domains, senders=senders) == [
        SenderProblem(address, f"envelope sender <{address}> {AUTH_REASON}"),
        SenderProblem(address, f"From <{address}> {AUTH_REASON}"),
    ]


def test_each_address_is_judged_on_its_own() -> None:
    problems = _check("bounce@acme.com", "ceo@acme.com", senders=["bounce@acme.com"])
    assert problems == [SenderProblem("ceo@acme.com", f"From <ceo@acme.com> {AUTH_REASON}")]
    problems = _check("x@acme.com", "info@acme.com", senders=["info@acme.com"])
    assert problems == [SenderProblem("x@acme.com", f"envelope sender <x@acme.com> {AUTH_REASON}")]


def test_null_sender_skips_the_envelope_rules() -> None:
    assert _check("", "info@acme.com", senders=["info@acme.com"]) == []
    assert _check("", "x@acme.com", senders=["info@acme.com"]) == [
        SenderProblem("x@acme.com", f"From <x@acme.com> {AUTH_REASON}")
    ]


@pytest.mark.parametrize("mail_from", ["b@acme.com", "b@bounce.acme.com", "b@A.B.ACME.COM"])
def test_envelope_sender_in_a_sending_domain_or_below(mail_from: str) -> None:
    assert _check(mail_from, "news@acme.com") == []


@pytest.mark.parametrize("mail_from", ["b@evil.com", "b@notacme.com", "b@acme.com.evil.com"])
def test_envelope_sender_outside_the_sending_domains(mail_from: str) -> None:
    assert _check(mail_from, "news@acme.com", sending=["acme.com", "acme.org"]) == [
        SenderProblem(
            mail_from,
            f"envelope sender <{mail_from}> is not at a sending domain of the account "
            "or a subdomain of one (acme.com, acme.org)",
        )
    ]


@pytest.mark.parametrize(
    "header_from",
    ["n@ov.emaildemos.com", "n@emaildemos.com", "n@other.emaildemos.com", "n@EMAILDEMOS.COM"],
)
def test_from_aligned_with_the_organisational_domain(header_from: str) -> None:
    assert _check("b@ov.emaildemos.com", header_from, sending=["ov.emaildemos.com"]) == []


@pytest.mark.parametrize(
    ("sending", "header_from"),
    [
        ("ov.emaildemos.com", "n@emaildemos.net"),
        ("acme.co.uk", "n@other.co.uk"),
        ("acme.co.uk", "n@co.uk"),
        ("acme.com", "n@[192.0.2.1]"),
    ],
)
def test_from_not_aligned(sending: str, header_from: str) -> None:
    assert _check("", header_from, sending=[sending]) == [
        SenderProblem(
            header_from,
            f"From <{header_from}> is not aligned with any sending domain of the account "
            f"({sending})",
        )
    ]


def test_no_sending_domain() -> None:
    assert _check("b@acme.com", "n@acme.com", sending=[]) == [
        SenderProblem("n@acme.com", "account has no sending domain; add one before sending")
    ]


def test_both_rules_report_together() -> None:
    problems = _check("b@evil.com", "n@evil.com", domains=["acme.com"])
    assert [p.reason.split(" <")[0] for p in problems] == [
        "envelope sender",
        "From",
        "envelope sender",
        "From",
    ]


def test_many_sending_domains_are_abbreviated() -> None:
    sending = [f"d{i}.example" for i in range(7)]
    (problem,) = _check("", "n@evil.com", sending=sending)
    assert problem.reason.endswith(
        "(d0.example, d1.example, d2.example, d3.example, d4.example and 2 more)"
    )


def test_international_domains_compare_as_a_labels() -> None:
    a_label = "xn--bcher-kva.example"
    assert _check("b@bounce.bücher.example", "n@BÜCHER.example", sending=[a_label]) == []
    assert _check("b@bücher.example", "n@bücher.example", sending=["bücher.example"]) == []
    assert (
        _check(
            "",
            "info@bücher.example",
            domains=[a_label],
            senders=[],
            sending=[a_label],
        )
        == []
    )
    assert (
        _check("", "Info@Bücher.example", senders=["info@xn--bcher-kva.example"], sending=[a_label])
        == []
    )


def test_domain_idna_cannot_encode_matches_nothing() -> None:
    bad = "n@" + "ü" * 70 + ".example"
    problems = _check("", bad, domains=["example"])
    assert [p.address for p in problems] == [bad, bad]


def test_overlong_domain_matches_nothing() -> None:
    huge = "n@" + "a" * 300 + ".acme.com"
    assert _check(huge, huge, sending=["acme.com"], domains=["acme.com"]) == [
        SenderProblem(huge, f"envelope sender <{huge}> {AUTH_REASON}"),
        SenderProblem(huge, f"From <{huge}> {AUTH_REASON}"),
        SenderProblem(
            huge,
            f"envelope sender <{huge}> is not at a sending domain of the account "
            "or a subdomain of one (acme.com)",
        ),
        SenderProblem(
            huge, f"From <{huge}> is not aligned with any sending domain of the account (acme.com)"
        ),
    ]


@given(st.text(max_size=40), st.text(max_size=40))
def test_any_addresses_give_problems_not_errors(mail_from: str, header_from: str) -> None:
    problems = _check(mail_from, header_from, domains=["acme.com"], senders=["a@b.c"])
    assert all(isinstance(p, SenderProblem) for p in problems)
