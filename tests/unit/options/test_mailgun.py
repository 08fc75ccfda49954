"""The X-Mailgun-* headers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from postlane.options import mailgun

TAIPEI = ZoneInfo("Asia/Taipei")


def parse(*headers: tuple[str, str], tz: Any = UTC) -> tuple[dict[str, Any], list[str]]:
    partial, problems = mailgun.parse(list(headers), tz=tz)
    return partial, [str(problem) for problem in problems]


def test_no_mailgun_headers_no_options() -> None:
    assert parse(("Subject", "hi"), ("X-OV-Track", "no")) == ({}, [])


def test_tags() -> None:
    assert parse(("X-Mailgun-Tag", "a"), ("x-mailgun-tag", "b"), ("X-Mailgun-Tag", "a")) == (
        {"tags": ("a", "b")},
        [],
    )


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("no", False), ("NO", False)])
def test_track_sets_opens_and_clicks(value: str, expected: bool) -> None:
    assert parse(("X-Mailgun-Track", value)) == (
        {"track_opens": expected, "track_clicks": expected},
        [],
    )


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Mailgun-Track", "yes"), ("X-Mailgun-Track-Opens", "no")],
        [("X-Mailgun-Track-Opens", "no"), ("X-Mailgun-Track", "yes")],
    ],
)
def test_specific_tracking_overrides_track(headers: list[tuple[str, str]]) -> None:
    assert parse(*headers) == ({"track_opens": False, "track_clicks": True}, [])


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("no", False)])
def test_track_clicks(value: str, expected: bool) -> None:
    assert parse(("X-Mailgun-Track-Clicks", value)) == ({"track_clicks": expected}, [])


def test_track_clicks_htmlonly_is_yes_and_noted() -> None:
    assert parse(("X-Mailgun-Track-Clicks", "HtmlOnly")) == (
        {
            "track_clicks": True,
            "unhandled": ("X-Mailgun-Track-Clicks htmlonly — treated as yes",),
        },
        [],
    )


def test_track_htmlonly_is_yes_and_noted() -> None:
    assert parse(("X-Mailgun-Track", "htmlonly")) == (
        {
            "track_opens": True,
            "track_clicks": True,
            "unhandled": ("X-Mailgun-Track htmlonly — treated as yes",),
        },
        [],
    )


@pytest.mark.parametrize(
    ("header", "value", "problem"),
    [
        ("X-Mailgun-Track", "true", "expected one of yes, no, htmlonly, got 'true'"),
        ("X-Mailgun-Track-Opens", "htmlonly", "expected yes or no, got 'htmlonly'"),
        (
            "X-Mailgun-Track-Clicks",
            "sometimes",
            "expected one of yes, no, htmlonly, got 'sometimes'",
        ),
        ("X-Mailgun-Require-TLS", "1", "expected one of yes, no, true, false, got '1'"),
    ],
)
def test_bad_yes_no(header: str, value: str, problem: str) -> None:
    assert parse((header, value)) == ({}, [f"{header}: {problem}"])


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("False", False), ("yes", True), ("no", False)]
)
def test_require_tls(value: str, expected: bool) -> None:
    assert parse(("X-Mailgun-Require-TLS", value)) == ({"require_tls": expected}, [])


def test_variables_and_recipient_variables() -> None:
    partial, problems = parse(
        ("X-Mailgun-Variables", '{"order": 1}'),
        ("X-Mailgun-Recipient-Variables", '{"a@x.example": {"first": "Ann"}}'),
    )
    assert problems == []
    assert partial == {
        "variables": {"order": 1},
        "recipient_variables": {"a@x.example": {"first": "Ann"}},
    }


@pytest.mark.parametrize(
    ("header", "value", "problem"),
    [
        ("X-Mailgun-Variables", "[1]", "must be a JSON object, got array"),
        (
            "X-Mailgun-Variables",
            "{'a': 1}",
            "invalid JSON at line 1 column 2: Expecting property name enclosed in double quotes",
        ),
        (
            "X-Mailgun-Recipient-Variables",
            '{"a@x.example": "Ann"}',
            "the value for 'a@x.example' must be a JSON object, got string",
        ),
        ("X-Mailgun-Template-Variables", '"x"', "must be a JSON object, got string"),
    ],
)
def test_bad_json(header: str, value: str, problem: str) -> None:
    assert parse((header, value)) == ({}, [f"{header}: {problem}"])


def test_template() -> None:
    assert parse(
        ("X-Mailgun-Template-Name", "welcome"),
        ("X-Mailgun-Template-Variables", '{"name": "Ann"}'),
    ) == ({"template": "welcome", "template_variables": {"name": "Ann"}}, [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Wed, 01 May 2024 09:30:00 +0800", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("Wed, 01 May 2024 01:30:00 GMT", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("Wed, 01 May 2024 01:30:00 -0000", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("Wed, 01 May 2024 09:30:00", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),  # Taipei
    ],
)
def test_deliver_by_is_the_time_to_send(value: str, expected: datetime) -> None:
    # Mailgun: "request a specific time for delivering messages ... Use the MIME
    # header X-Mailgun-Deliver-By when sending via SMTP" (its o:deliverytime).
    assert parse(("X-Mailgun-Deliver-By", value), tz=TAIPEI) == ({"scheduled_at": expected}, [])


@pytest.mark.parametrize("value", ["2024-05-01T09:30:00+08:00", "tomorrow", "2024-05-01"])
def test_deliver_by_takes_rfc_2822_only(value: str) -> None:
    assert parse(("X-Mailgun-Deliver-By", value)) == (
        {},
        [f"X-Mailgun-Deliver-By: expected an RFC 5322 date, got {value!r}"],
    )


def test_unknown_mailgun_header_is_recorded() -> None:
    assert parse(("X-Mailgun-Dkim", "no"), ("X-Mailgun-Sending-Ip", "1.2.3.4")) == (
        {
            "unhandled": (
                "X-Mailgun-Dkim not recognised",
                "X-Mailgun-Sending-Ip not recognised",
            )
        },
        [],
    )


def test_repeated_single_valued_header_is_a_problem() -> None:
    assert parse(("X-Mailgun-Track", "yes"), ("X-Mailgun-Track", "yes")) == (
        {},
        ["X-Mailgun-Track: given 2 times; give it once"],
    )
