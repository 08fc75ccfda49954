"""The ITPison OMICard headers: text fields, launch times and option masks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from postlane.options import itpison

TAIPEI = ZoneInfo("Asia/Taipei")


def parse(*headers: tuple[str, str], tz: Any = UTC) -> tuple[dict[str, Any], list[str]]:
    partial, problems = itpison.parse(list(headers), tz=tz)
    return partial, [str(problem) for problem in problems]


def test_no_itpison_headers_no_options() -> None:
    assert parse(("Subject", "hi"), ("X-OV-Track", "no")) == ({}, [])


def test_text_headers() -> None:
    partial, problems = parse(("X-JobName", " Spring sale "), ("X-RefNumber", "R-42"))
    assert problems == []
    assert partial == {"job_name": "Spring sale", "ref_number": "R-42"}


def test_header_names_are_case_insensitive() -> None:
    partial, _ = parse(("x-jobname", "a"), ("X-LINKOPTION", "64"))
    assert partial["job_name"] == "a"
    assert partial["track_opens"] is False
    assert partial["raw_masks"] == {"X-LinkOption": 64}


def test_encoded_word_job_name_is_decoded() -> None:
    partial, problems = parse(("X-JobName", "=?UTF-8?B?5rS75YuV?="))
    assert problems == []
    assert partial["job_name"] == "活動"


def test_empty_and_malformed_text_are_problems() -> None:
    _, problems = parse(("X-JobName", "  "), ("X-RefNumber", "=?bogus-charset?Q?x?="))
    assert problems[0] == "X-JobName: is empty"
    assert problems[1].startswith("X-RefNumber: malformed RFC 2047 encoded word")


def test_launch_type_and_class_are_kept_and_reported() -> None:
    partial, problems = parse(("X-LaunchType", "2"), ("X-LaunchClass", "7"))
    assert problems == []
    assert partial["launch_type"] == "2"
    assert partial["launch_class"] == "7"
    assert partial["unhandled"] == (
        "X-LaunchType 2 — ITPison launcher setting, recorded only",
        "X-LaunchClass 7 — ITPison launcher setting, recorded only",
    )


def test_repeated_header_is_a_problem() -> None:
    partial, problems = parse(("X-JobName", "a"), ("X-JobName", "b"))
    assert "job_name" not in partial
    assert problems == ["X-JobName: given 2 times; give it once"]


# The samples of the manual, chapter 7.2.
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("64", {"track_opens": False}),
        ("128", {"track_clicks": False}),
        ("192", {"track_opens": False, "track_clicks": False}),
    ],
)
def test_manual_link_option_samples(value: str, expected: dict[str, Any]) -> None:
    partial, problems = parse(("X-LinkOption", value))
    assert problems == []
    assert partial == {**expected, "raw_masks": {"X-LinkOption": int(value)}}


@pytest.mark.parametrize(
    ("value", "field"), [("1", "keep_to"), ("2", "keep_cc"), ("65536", "bypass_list_filters")]
)
def test_manual_list_option_samples(value: str, field: str) -> None:
    partial, problems = parse(("X-ListOption", value))
    assert problems == []
    assert partial == {
        **_off("X-ListOption"),
        field: True,
        "raw_masks": {"X-ListOption": int(value)},
    }


# A JobOption or ListOption header states every switch it holds: a clear bit
# turns its switch off. LinkOption's bits only forbid tracking.
_SWITCHES = {
    "X-JobOption": (
        "html_to_text",
        "text_to_html",
        "convert_to_utf8",
        "subject_from_html_title",
        "archive_copy",
        "delivery_receipt",
        "read_receipt",
    ),
    "X-ListOption": (
        "keep_to",
        "keep_cc",
        "remove_unsubscribed",
        "remove_duplicates",
        "remove_blacklisted",
        "remove_bounced",
        "bypass_list_filters",
    ),
}


def _off(header: str) -> dict[str, bool]:
    return dict.fromkeys(_SWITCHES.get(header, ()), False)


@pytest.mark.parametrize("header", sorted(_SWITCHES))
def test_a_zero_mask_turns_every_switch_it_holds_off(header: str) -> None:
    partial, problems = parse((header, "0"))
    assert problems == []
    assert partial == {**_off(header), "raw_masks": {header: 0}}


@pytest.mark.parametrize(
    ("header", "bit", "field", "value"),
    [
        ("X-JobOption", 8, "html_to_text", True),
        ("X-JobOption", 262144, "text_to_html", True),
        ("X-JobOption", 512, "convert_to_utf8", True),
        ("X-JobOption", 2048, "subject_from_html_title", True),
        ("X-JobOption", 128, "archive_copy", True),
        ("X-JobOption", 268435456, "delivery_receipt", True),
        ("X-JobOption", 536870912, "read_receipt", True),
        ("X-LinkOption", 64, "track_opens", False),
        ("X-LinkOption", 128, "track_clicks", False),
        ("X-LinkOption", 512, "track_mailto_links", False),
        ("X-ListOption", 1, "keep_to", True),
        ("X-ListOption", 2, "keep_cc", True),
        ("X-ListOption", 32, "remove_unsubscribed", True),
        ("X-ListOption", 64, "remove_duplicates", True),
        ("X-ListOption", 128, "remove_blacklisted", True),
        ("X-ListOption", 512, "remove_bounced", True),
        ("X-ListOption", 65536, "bypass_list_filters", True),
    ],
)
def test_every_acted_on_bit(header: str, bit: int, field: str, value: bool) -> None:
    partial, problems = parse((header, str(bit)))
    assert problems == []
    assert partial == {**_off(header), field: value, "raw_masks": {header: bit}}


def test_link_option_without_not_track_bits_asks_nothing_about_tracking() -> None:
    partial, _ = parse(("X-LinkOption", "0"))
    assert partial == {"raw_masks": {"X-LinkOption": 0}}


@pytest.mark.parametrize(
    ("header", "bit", "entry"),
    [
        ("X-JobOption", 1, "X-JobOption 1 cJBDoResendMask"),
        ("X-JobOption", 16, "X-JobOption 16 cJBDynaMergeMask"),
        ("X-JobOption", 262144 * 2**3, "X-JobOption 2097152 cJBSaveWebPageAsMht"),
        ("X-JobOption", 2147483648, "X-JobOption 2147483648 cJBRemoveFilesAfterComplete"),
        ("X-JobOption", 4096, "X-JobOption 4096 unknown bit"),
        ("X-LinkOption", 2, "X-LinkOption 2 cLKAddQStrToLinkMask"),
        ("X-LinkOption", 16384, "X-LinkOption 16384 cLKTrackQRCodeLinkMask"),
        ("X-LinkOption", 32768, "X-LinkOption 32768 unknown bit"),
        ("X-ListOption", 4, "X-ListOption 4 unknown bit"),
        ("X-ListOption", 256, "X-ListOption 256 cLTRemoveWhiteMask"),
        ("X-ListOption", 1048576, "X-ListOption 1048576 cLTNotToRemoveSystemRemoveWhiteMask"),
        ("X-LaunchOption", 1, "X-LaunchOption 1 cLHRemoveFilesAfterCompleteOption"),
        ("X-LaunchOption", 4, "X-LaunchOption 4 cLHPendApproveOption"),
        ("X-LaunchOption", 1024, "X-LaunchOption 1024 cLHCheckListOption"),
        ("X-LaunchOption", 2048, "X-LaunchOption 2048 unknown bit"),
    ],
)
def test_unhandled_bits_are_named(header: str, bit: int, entry: str) -> None:
    partial, problems = parse((header, str(bit)))
    assert problems == []
    assert partial == {**_off(header), "unhandled": (entry,), "raw_masks": {header: bit}}


@pytest.mark.parametrize(
    ("header", "acted", "named"),
    [
        ("X-LaunchOption", 0, 11),
        ("X-JobOption", 7, 23),
        ("X-LinkOption", 3, 15),
        ("X-ListOption", 7, 20),
    ],
)
def test_every_bit_of_a_full_mask_is_acted_on_or_listed(
    header: str, acted: int, named: int
) -> None:
    partial, problems = parse((header, "4294967295"))
    assert problems == []
    entries = partial["unhandled"]
    assert len(entries) == 32 - acted
    assert sum(not entry.endswith("unknown bit") for entry in entries) == named - acted
    assert len(partial) == acted + 2  # the acted-on fields, unhandled and raw_masks


def test_bits_combine() -> None:
    partial, problems = parse(("X-JobOption", str(8 | 16 | 128)), ("X-ListOption", "0x41"))
    assert problems == []
    assert partial["html_to_text"] is True
    assert partial["archive_copy"] is True
    assert partial["keep_to"] is True
    assert partial["remove_duplicates"] is True
    assert partial["unhandled"] == ("X-JobOption 16 cJBDynaMergeMask",)
    assert partial["raw_masks"] == {"X-JobOption": 152, "X-ListOption": 65}


@pytest.mark.parametrize("value", ["0", "1"])
def test_send_option_email_is_fine(value: str) -> None:
    assert parse(("X-SendOption", value)) == ({"raw_masks": {"X-SendOption": int(value)}}, [])


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        (
            "2",
            "X-SendOption 2 cSDSendSubListFirst (SMS first) — email is sent only via email channel",
        ),
        (
            "4",
            "X-SendOption 4 cSDSendBothList (email and SMS) — email is sent only via email channel",
        ),
        ("9", "X-SendOption 9 unknown value"),
    ],
)
def test_send_option_sms_values_are_recorded(value: str, entry: str) -> None:
    partial, problems = parse(("X-SendOption", value))
    assert problems == []
    assert partial["unhandled"] == (entry,)


@pytest.mark.parametrize("value", ["3", str(3 | 32)])
def test_send_option_sms_only_is_a_problem(value: str) -> None:
    # Postlane has no SMS: sending the email would be doing what was not asked.
    _, problems = parse(("X-SendOption", value))
    assert "X-SendOption: 3 (cSDSendSubListOnly) asks for SMS only; Postlane sends email only" in (
        problems
    )


def test_send_option_bits_above_the_list_mask_are_unknown() -> None:
    partial, _ = parse(("X-SendOption", str(32 | 1)))
    assert partial["unhandled"] == ("X-SendOption 32 unknown bit",)


@pytest.mark.parametrize(
    ("value", "number"),
    [("0x40", 64), ("0X40", 64), (" 64 ", 64), ("0064", 64), ("4294967295", 2**32 - 1)],
)
def test_mask_forms(value: str, number: int) -> None:
    partial, problems = parse(("X-LaunchOption", value))
    assert problems == []
    assert partial["raw_masks"] == {"X-LaunchOption": number}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("sixty-four", "must be an unsigned integer (decimal or 0x hex), got 'sixty-four'"),
        ("", "must be an unsigned integer (decimal or 0x hex), got ''"),
        ("+64", "must be an unsigned integer (decimal or 0x hex), got '+64'"),
        ("6 4", "must be an unsigned integer (decimal or 0x hex), got '6 4'"),
        ("1_000", "must be an unsigned integer (decimal or 0x hex), got '1_000'"),
        ("0x", "must be an unsigned integer (decimal or 0x hex), got '0x'"),
        ("٦٤", "must be an unsigned integer (decimal or 0x hex), got '٦٤'"),
        ("-64", "must not be negative, got -64"),
        ("4294967296", "is out of range (0 to 4294967295), got 4294967296"),
        ("0x100000000", "is out of range (0 to 4294967295), got 0x100000000"),
    ],
)
@pytest.mark.parametrize(
    "header", ["X-LaunchOption", "X-JobOption", "X-ListOption", "X-LinkOption", "X-SendOption"]
)
def test_malformed_masks_are_problems(header: str, value: str, problem: str) -> None:
    partial, problems = parse((header, value))
    assert partial == {}
    assert problems == [f"{header}: {problem}"]


def test_huge_mask_is_out_of_range_not_a_crash() -> None:
    _, problems = parse(("X-JobOption", "9" * 5000))
    assert problems[0].startswith("X-JobOption: is out of range (0 to 4294967295)")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01T09:30:00+08:00", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("2024-05-01T01:30:00Z", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("2024-05-01 01:30:00Z", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("2024-05-01T03:30+02:00", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("Wed, 01 May 2024 09:30:00 +0800", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("1 May 2024 01:30:00 GMT", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("Wed, 01 May 2024 01:30:00 -0000", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        # No zone: the account's zone, here Asia/Taipei (UTC+8).
        ("2024-05-01T09:30:00", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("2024-05-01 09:30", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
        ("Wed, 01 May 2024 09:30:00", datetime(2024, 5, 1, 1, 30, tzinfo=UTC)),
    ],
)
@pytest.mark.parametrize(
    ("header", "field"),
    [("X-NextLaunchTime", "scheduled_at"), ("X-LaunchExpireTime", "expires_at")],
)
def test_times(header: str, field: str, value: str, expected: datetime) -> None:
    partial, problems = parse((header, value), tz=TAIPEI)
    assert problems == []
    assert partial == {field: expected}
    assert partial[field].tzinfo is UTC


def test_zone_less_time_uses_the_account_zone() -> None:
    in_utc, _ = parse(("X-NextLaunchTime", "2024-05-01 09:30"), tz=UTC)
    in_taipei, _ = parse(("X-NextLaunchTime", "2024-05-01 09:30"), tz=TAIPEI)
    assert in_utc["scheduled_at"] - in_taipei["scheduled_at"] == (
        datetime(2024, 5, 1, 8, tzinfo=UTC) - datetime(2024, 5, 1, tzinfo=UTC)
    )


@pytest.mark.parametrize("value", ["2024-05-01", "20240501", "2024-W18-3"])
def test_date_only_is_ambiguous(value: str) -> None:
    partial, problems = parse(("X-NextLaunchTime", value))
    assert partial == {}
    assert problems == [
        f"X-NextLaunchTime: a date without a time is ambiguous, got {value!r}; give a date"
        " and time such as 2024-05-01T09:30:00+08:00"
    ]


@pytest.mark.parametrize(
    "value", ["tomorrow", "", "2024-13-01T00:00", "Wed, 01 May 2024 25:00:00 +0800", "1 May 2024"]
)
def test_bad_times_are_problems(value: str) -> None:
    partial, problems = parse(("X-LaunchExpireTime", value))
    assert partial == {}
    assert problems == [
        f"X-LaunchExpireTime: expected an ISO 8601 or RFC 5322 date and time, got {value!r}"
    ]


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 01 May 2024 09:30:00 -0000",
        "Wed, 01 May 2024 09:30:00-0000",
        "Wed, 01 May 2024 09:30:00 -0000 (UTC)",
    ],
)
def test_minus_zero_is_utc_however_spaced(value: str) -> None:
    partial, problems = parse(("X-NextLaunchTime", value), tz=TAIPEI)
    assert problems == []
    assert partial == {"scheduled_at": datetime(2024, 5, 1, 9, 30, tzinfo=UTC)}


@pytest.mark.parametrize("zone", ["CET", "FOO", "A"])
def test_unknown_zone_is_a_problem_not_the_accounts_zone(zone: str) -> None:
    value = f"Wed, 01 May 2024 09:30:00 {zone}"
    partial, problems = parse(("X-NextLaunchTime", value), tz=TAIPEI)
    assert partial == {}
    assert problems == [
        f"X-NextLaunchTime: unknown time zone {zone!r} in {value!r};"
        " give a numeric offset such as +0100"
    ]


def test_a_comment_after_a_zone_less_time_is_no_zone() -> None:
    partial, _ = parse(("X-NextLaunchTime", "Wed, 01 May 2024 09:30:00 (office)"), tz=TAIPEI)
    assert partial == {"scheduled_at": datetime(2024, 5, 1, 1, 30, tzinfo=UTC)}


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("2024-03-10T02:30:00", "does not exist"),  # clocks go forward at 02:00
        ("Sun, 10 Mar 2024 02:30:00", "does not exist"),
        ("2024-11-03T01:30:00", "happens twice"),  # clocks go back at 02:00
    ],
)
def test_zone_less_time_at_a_clock_change_is_a_problem(value: str, what: str) -> None:
    partial, problems = parse(("X-NextLaunchTime", value), tz=ZoneInfo("America/New_York"))
    assert partial == {}
    assert problems == [
        f"X-NextLaunchTime: {value!r} {what} in the account's time zone America/New_York"
        " (its clocks change then); write the time with its UTC offset"
    ]


def test_time_at_a_clock_change_with_its_offset_is_fine() -> None:
    partial, problems = parse(
        ("X-NextLaunchTime", "2024-11-03T01:30:00-05:00"), tz=ZoneInfo("America/New_York")
    )
    assert problems == []
    assert partial == {"scheduled_at": datetime(2024, 11, 3, 6, 30, tzinfo=UTC)}


def test_time_out_of_range_is_a_problem() -> None:
    _, problems = parse(("X-NextLaunchTime", "0001-01-01T00:00:00"), tz=TAIPEI)
    assert problems == ["X-NextLaunchTime: is out of range, got '0001-01-01T00:00:00'"]


def test_rfc5322_year_out_of_range_is_a_problem() -> None:
    # The email package's OverflowError once escaped and dropped the session.
    value = "Mon, 1 Jan 99999999999999999999 00:00:00 +0000"
    _, problems = parse(("X-LaunchExpireTime", value))
    assert problems == [f"X-LaunchExpireTime: is out of range, got {value!r}"]


def test_expiry_before_launch_is_a_problem() -> None:
    partial, problems = parse(
        ("X-NextLaunchTime", "2024-05-02T00:00:00Z"),
        ("X-LaunchExpireTime", "2024-05-01T00:00:00Z"),
    )
    assert partial == {"scheduled_at": datetime(2024, 5, 2, tzinfo=UTC)}
    assert problems == [
        "X-LaunchExpireTime: 2024-05-01T00:00:00+00:00 is before the time X-NextLaunchTime"
        " asks to send at (2024-05-02T00:00:00+00:00)"
    ]


def test_expiry_after_launch_is_fine() -> None:
    partial, problems = parse(
        ("X-LaunchExpireTime", "2024-05-03T00:00:00Z"),
        ("X-NextLaunchTime", "2024-05-02T00:00:00Z"),
    )
    assert problems == []
    assert partial["expires_at"] > partial["scheduled_at"]


def test_problems_do_not_stop_other_headers() -> None:
    partial, problems = parse(("X-JobOption", "x"), ("X-JobName", "ok"), ("X-LinkOption", "64"))
    assert partial["job_name"] == "ok"
    assert partial["track_opens"] is False
    assert len(problems) == 1
