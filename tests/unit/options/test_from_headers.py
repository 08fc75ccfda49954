"""from_headers: all dialects at once, their disagreements, and the headers to strip."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from postlane.options import ParsedOptions, SendOptions, from_headers, is_control_header

TAIPEI = ZoneInfo("Asia/Taipei")


def read(*headers: tuple[str, str], tz: Any = UTC) -> tuple[ParsedOptions, list[str]]:
    parsed = from_headers(list(headers), tz=tz)
    return parsed, [str(problem) for problem in parsed.problems]


def test_plain_message_has_no_options() -> None:
    parsed, problems = read(("From", "a@x.example"), ("Subject", "hi"))
    assert parsed.partial == {}
    assert problems == []
    assert parsed.control_headers == frozenset()


def test_dialects_mix() -> None:
    parsed, problems = read(
        ("X-JobName", "Spring"),
        ("X-OV-Tag", "spring"),
        ("X-Mailgun-Tag", "sale"),
        ("X-Mailgun-Tag", "spring"),
        ("X-Priority", "2 (High)"),
        ("X-LinkOption", "512"),
        ("X-OV-Require-TLS", "yes"),
    )
    assert problems == []
    assert parsed.partial == {
        "job_name": "Spring",
        "raw_masks": {"X-LinkOption": 512},
        "track_mailto_links": False,
        "tags": ("spring", "sale"),
        "require_tls": True,
        "priority": 2,
    }


def test_disagreeing_dialects_name_both_headers_and_set_neither() -> None:
    parsed, problems = read(("X-OV-Track", "yes"), ("X-Mailgun-Track", "no"))
    assert "track_opens" not in parsed.partial
    assert "track_clicks" not in parsed.partial
    assert problems == [
        "X-Mailgun-Track: sets track_opens to false, but X-OV-Track sets it to true",
        "X-Mailgun-Track: sets track_clicks to false, but X-OV-Track sets it to true",
    ]


def test_disagreement_names_the_specific_header_that_won() -> None:
    _, problems = read(("X-OV-Track", "no"), ("X-OV-tracking_open", "yes"), ("X-LinkOption", "64"))
    assert problems == [
        "X-OV-tracking_open: sets track_opens to true, but X-LinkOption sets it to false"
    ]


def test_agreeing_dialects_are_fine() -> None:
    parsed, problems = read(
        ("X-LinkOption", "192"),
        ("X-OV-Track", "no"),
        ("X-Mailgun-Track", "no"),
        ("X-OV-Variables", '{"a": [1, 2]}'),
        ("X-Mailgun-Variables", '{"a": [1, 2]}'),
    )
    assert problems == []
    assert parsed.partial["track_opens"] is False
    assert parsed.partial["track_clicks"] is False
    assert parsed.partial["variables"] == {"a": [1, 2]}


def test_disagreeing_json_is_shown_shortened() -> None:
    long = '{"text": "' + "x" * 100 + '"}'
    _, problems = read(("X-OV-Variables", long), ("X-Mailgun-Variables", "{}"))
    shown = '{"text": "' + "x" * 47 + "..."
    assert problems == [
        f"X-Mailgun-Variables: sets variables to {{}}, but X-OV-Variables sets it to {shown}"
    ]


def test_disagreeing_launch_times() -> None:
    parsed, problems = read(
        ("X-NextLaunchTime", "2024-05-01T00:00:00Z"),
        ("X-Mailgun-Deliver-By", "Thu, 02 May 2024 00:00:00 +0000"),
    )
    assert "scheduled_at" not in parsed.partial
    assert problems == [
        "X-Mailgun-Deliver-By: sets scheduled_at to 2024-05-02T00:00:00+00:00,"
        " but X-NextLaunchTime sets it to 2024-05-01T00:00:00+00:00"
    ]


def test_same_time_written_differently_agrees() -> None:
    parsed, problems = read(
        ("X-NextLaunchTime", "2024-05-01 08:00"),
        ("X-Mailgun-Deliver-By", "Wed, 01 May 2024 00:00:00 +0000"),
        tz=TAIPEI,
    )
    assert problems == []
    assert parsed.partial["scheduled_at"] == datetime(2024, 5, 1, tzinfo=UTC)


def test_expiry_before_deliver_by_is_a_problem() -> None:
    parsed, problems = read(
        ("X-Mailgun-Deliver-By", "Thu, 02 May 2024 00:00:00 +0000"),
        ("X-LaunchExpireTime", "2024-05-01T00:00:00Z"),
    )
    assert "expires_at" not in parsed.partial
    assert problems == [
        "X-LaunchExpireTime: 2024-05-01T00:00:00+00:00 is before the time X-Mailgun-Deliver-By"
        " asks to send at (2024-05-02T00:00:00+00:00)"
    ]


def test_problems_of_every_dialect_are_collected() -> None:
    _, problems = read(
        ("X-JobOption", "lots"),
        ("X-OV-Recipient-Variables", "[1, ]"),
        ("X-Mailgun-Variables", "[]"),
        ("X-Priority", "urgent"),
    )
    assert problems == [
        "X-JobOption: must be an unsigned integer (decimal or 0x hex), got 'lots'",
        "X-OV-Recipient-Variables: invalid JSON at line 1 column 5: Expecting value",
        "X-Mailgun-Variables: must be a JSON object, got array",
        "X-Priority: expected a digit 1 (highest) to 5 (lowest), got 'urgent'",
    ]


def test_unhandled_entries_of_every_dialect_are_kept() -> None:
    parsed, _ = read(
        ("X-JobOption", "16"),
        ("X-OV-Foo", "1"),
        ("X-Mailgun-Track-Clicks", "htmlonly"),
        ("X-SendOption", "4"),
    )
    assert parsed.partial["unhandled"] == (
        "X-JobOption 16 cJBDynaMergeMask",
        "X-SendOption 4 cSDSendBothList (email and SMS) — email is sent only via email channel",
        "X-OV-Foo not recognised",
        "X-Mailgun-Track-Clicks htmlonly — treated as yes",
        "X-Mailgun-Track-Clicks asks for click tracking — Postlane does not do it yet",
    )


def test_asking_for_a_feature_postlane_lacks_is_listed_and_turning_it_off_is_not() -> None:
    parsed, problems = read(
        ("X-OV-tracking_open", "yes"),
        ("X-LinkOption", "128"),
        ("X-OV-Callback-URL", "https://hooks.example.com/e"),
    )
    assert problems == []
    assert parsed.partial["unhandled"] == (
        "X-OV-tracking_open asks for open tracking — Postlane does not do it yet",
        "X-OV-Callback-URL asks for event callbacks — Postlane does not do it yet",
    )
    assert read(("X-Mailgun-Track", "no"))[0].partial == {
        "track_opens": False,
        "track_clicks": False,
    }


def test_control_headers_are_the_ones_present_lower_cased() -> None:
    parsed, _ = read(
        ("X-JobName", "j"),
        ("x-linkoption", "64"),
        ("X-OV-Tag", "t"),
        ("X-OV-Whatever", "t"),
        ("X-Mailgun-Tag", "t"),
        ("X-Mailgun-Variables", "not json"),
        ("X-Priority", "1"),
        ("Importance", "high"),
        ("X-MSMail-Priority", "High"),
        ("Subject", "s"),
    )
    assert parsed.control_headers == frozenset(
        {
            "x-jobname",
            "x-linkoption",
            "x-ov-tag",
            "x-ov-whatever",
            "x-mailgun-tag",
        }
    )


@pytest.mark.parametrize(
    "name",
    [
        "X-JobName",
        "X-RefNumber",
        "X-NextLaunchTime",
        "X-LaunchExpireTime",
        "X-LaunchType",
        "X-LaunchClass",
        "X-LaunchOption",
        "X-JobOption",
        "X-ListOption",
        "X-LinkOption",
        "X-SendOption",
        "x-sendoption",
        "X-OV-Tag",
        "X-OV-anything",
        "x-ov-track",
        "X-OV-Template-Variables",
        "X-Mailgun-Template-Variables",
        "X-Mailgun-Recipient-Variables",
        "X-MAILGUN-Anything",
    ],
)
def test_is_control_header(name: str) -> None:
    assert is_control_header(name)


@pytest.mark.parametrize(
    "name",
    [
        "X-Priority",
        "Importance",
        "X-MSMail-Priority",
        "Subject",
        "X-Mailer",
        "X-OV",
        "X-Mailgun",
        "X-JobNames",
        "List-Unsubscribe",
        # Attached data that Mailgun and Omnivery deliver with the message.
        "X-Mailgun-Variables",
        "x-ov-variables",
    ],
)
def test_is_not_control_header(name: str) -> None:
    assert not is_control_header(name)


def test_parsed_options_is_frozen() -> None:
    parsed, _ = read(("X-JobName", "j"))
    with pytest.raises(AttributeError):
        parsed.partial = {}  # type: ignore[misc]


def test_account_then_user_then_headers() -> None:
    account = {"track_opens": True, "track_clicks": True, "tags": ["acct"], "priority": 4}
    user = {"track_clicks": False, "callback_url": "https://hooks.example.com/u"}
    parsed, problems = read(
        ("X-OV-tracking_open", "no"),
        ("X-OV-Tag", "msg"),
        ("X-Priority", "1"),
        ("X-JobOption", "16"),
        ("X-NextLaunchTime", "2024-05-01 09:00"),
        tz=TAIPEI,
    )
    assert problems == []
    options = SendOptions().layer(account).layer(user).layer(parsed.partial)
    assert options.track_opens is False
    assert options.track_clicks is False
    assert options.callback_url == "https://hooks.example.com/u"
    assert options.priority == 1
    assert options.tags == ("acct", "msg")
    assert options.scheduled_at == datetime(2024, 5, 1, 1, tzinfo=UTC)
    assert options.unhandled == ("X-JobOption 16 cJBDynaMergeMask",)
    assert dict(options.raw_masks) == {"X-JobOption": 16}


def test_parsed_partial_survives_json_storage() -> None:
    parsed, _ = read(
        ("X-OV-Recipient-Variables", '{"a@x.example": {"n": [1]}}'),
        ("X-LaunchExpireTime", "2030-01-01T00:00:00Z"),
    )
    options = SendOptions().layer(parsed.partial)
    assert SendOptions.from_json(options.to_json()) == options
    assert options.recipient_variables["a@x.example"]["n"] == (1,)
