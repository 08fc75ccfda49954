"""The Omnivery X-OV-* headers."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest

from postlane.options import omnivery


def parse(*headers: tuple[str, str]) -> tuple[dict[str, Any], list[str]]:
    partial, problems = omnivery.parse(list(headers), tz=UTC)
    return partial, [str(problem) for problem in problems]


def test_no_omnivery_headers_no_options() -> None:
    assert parse(("Subject", "hi"), ("X-Mailgun-Track", "no"), ("X-JobName", "j")) == ({}, [])


def test_tags_repeat_and_deduplicate_in_order() -> None:
    partial, problems = parse(
        ("X-OV-Tag", "spring"), ("Subject", "x"), ("x-ov-tag", " sale "), ("X-OV-Tag", "spring")
    )
    assert problems == []
    assert partial == {"tags": ("spring", "sale")}


def test_empty_tag_is_a_problem_but_other_tags_count() -> None:
    partial, problems = parse(("X-OV-Tag", ""), ("X-OV-Tag", "ok"))
    assert partial == {"tags": ("ok",)}
    assert problems == ["X-OV-Tag: is empty"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("yes", True),
        ("YES", True),
        ("true", True),
        ("True", True),
        ("1", True),
        ("no", False),
        ("No", False),
        ("false", False),
        ("0", False),
    ],
)
def test_testmode(value: str, expected: bool) -> None:
    assert parse(("X-OV-testmode", value)) == ({"test_mode": expected}, [])


def test_bad_testmode_is_a_problem() -> None:
    assert parse(("X-OV-testmode", "maybe")) == (
        {},
        ["X-OV-testmode: expected one of yes, no, true, false, 1, 0, got 'maybe'"],
    )


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("no", False), (" No ", False)])
def test_track_sets_opens_and_clicks(value: str, expected: bool) -> None:
    assert parse(("X-OV-Track", value)) == (
        {"track_opens": expected, "track_clicks": expected},
        [],
    )


@pytest.mark.parametrize(
    "headers",
    [
        [("X-OV-Track", "no"), ("X-OV-tracking_click", "yes")],
        [("X-OV-tracking_click", "yes"), ("X-OV-Track", "no")],
    ],
)
def test_specific_tracking_overrides_track_whatever_the_order(
    headers: list[tuple[str, str]],
) -> None:
    partial, problems = parse(*headers)
    assert problems == []
    assert partial == {"track_opens": False, "track_clicks": True}


def test_specific_tracking_alone() -> None:
    assert parse(("X-OV-tracking_open", "no")) == ({"track_opens": False}, [])
    assert parse(("X-OV-Tracking_Click", "no")) == ({"track_clicks": False}, [])


@pytest.mark.parametrize("header", ["X-OV-Track", "X-OV-tracking_click", "X-OV-tracking_open"])
@pytest.mark.parametrize("value", ["true", "1", "on", ""])
def test_tracking_takes_only_yes_or_no(header: str, value: str) -> None:
    assert parse((header, value)) == ({}, [f"{header}: expected yes or no, got {value!r}"])


@pytest.mark.parametrize(
    ("value", "expected"), [("yes", True), ("no", False), ("TRUE", True), ("false", False)]
)
def test_require_tls(value: str, expected: bool) -> None:
    assert parse(("X-OV-Require-TLS", value)) == ({"require_tls": expected}, [])


def test_bad_require_tls() -> None:
    assert parse(("X-OV-Require-TLS", "1")) == (
        {},
        ["X-OV-Require-TLS: expected one of yes, no, true, false, got '1'"],
    )


def test_recipient_variables() -> None:
    value = '{"a@x.example": {"first": "Ann", "id": 1}, "b@x.example": {}}'
    assert parse(("X-OV-Recipient-Variables", value)) == (
        {"recipient_variables": {"a@x.example": {"first": "Ann", "id": 1}, "b@x.example": {}}},
        [],
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[1, ]", "invalid JSON at line 1 column 5: Expecting value"),
        ('{"a@x.example": {}', "invalid JSON at line 1 column 19: Expecting ',' delimiter"),
        ("[]", "must be a JSON object, got array"),
        ('"x"', "must be a JSON object, got string"),
        ('{"a@x.example": [1]}', "the value for 'a@x.example' must be a JSON object, got array"),
        ('{"a@x.example": 1}', "the value for 'a@x.example' must be a JSON object, got number"),
        ('{"ann": {}}', "key 'ann' is not an email address"),
        ('{"@x.example": {}}', "key '@x.example' is not an email address"),
        ('{"a@x.example": {"n": NaN}}', "invalid JSON: NaN is not a JSON number"),
    ],
)
def test_bad_recipient_variables(value: str, problem: str) -> None:
    assert parse(("X-OV-Recipient-Variables", value)) == (
        {},
        [f"X-OV-Recipient-Variables: {problem}"],
    )


@pytest.mark.parametrize("header", ["X-OV-Variables", "X-OV-Template-Variables"])
def test_json_object_headers(header: str) -> None:
    field = "variables" if header == "X-OV-Variables" else "template_variables"
    assert parse((header, '{"order": 7, "items": [1, 2]}')) == (
        {field: {"order": 7, "items": [1, 2]}},
        [],
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("not json", "invalid JSON at line 1 column 1: Expecting value"),
        ("[1, 2]", "must be a JSON object, got array"),
        ("null", "must be a JSON object, got null"),
        ("true", "must be a JSON object, got boolean"),
        ("3", "must be a JSON object, got number"),
        ('{"x": Infinity}', "invalid JSON: Infinity is not a JSON number"),
        # Numbers Python reads but no JSON consumer can hold: these escaped as
        # exceptions and dropped the SMTP session.
        ('{"x": 1e400}', "invalid JSON: 1e400 is too large for a JSON number"),
        ('{"x": -1e400}', "invalid JSON: -1e400 is too large for a JSON number"),
        (
            '{"x": 1' + "0" * 4300 + "}",
            "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion:"
            " value has 4301 digits; use sys.set_int_max_str_digits() to increase the limit",
        ),
    ],
)
@pytest.mark.parametrize("header", ["X-OV-Variables", "X-OV-Template-Variables"])
def test_bad_json_object_headers(header: str, value: str, problem: str) -> None:
    assert parse((header, value)) == ({}, [f"{header}: {problem}"])


def test_deeply_nested_json_is_refused() -> None:
    for depth in (33, 5000):
        value = "[" * depth + "]" * depth
        _, problems = parse(("X-OV-Variables", '{"x": ' + value + "}"))
        assert problems == ["X-OV-Variables: JSON nested deeper than 32 levels"]


def test_json_at_the_depth_limit_is_fine() -> None:
    value = '{"x": ' + "[" * 31 + "]" * 31 + "}"
    partial, problems = parse(("X-OV-Variables", value))
    assert problems == []
    assert "variables" in partial


def test_oversized_json_is_refused() -> None:
    value = '{"x": "' + "a" * 1_000_000 + '"}'
    assert parse(("X-OV-Variables", value)) == (
        {},
        ["X-OV-Variables: is longer than 1000000 characters"],
    )


def test_template() -> None:
    assert parse(("X-OV-Template", " welcome.html ")) == ({"template": "welcome.html"}, [])
    assert parse(("X-OV-Template", "")) == ({}, ["X-OV-Template: is empty"])


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/ov", "http://10.0.0.1:8080/hook?x=1", "HTTPS://Example.com"]
)
def test_callback_url(url: str) -> None:
    assert parse(("X-OV-Callback-URL", url)) == ({"callback_url": url}, [])


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "/hook",
        "example.com/hook",
        "https://",
        "https://exa mple.com/",
        "https://example.com:99999/",
        "",
        "https://[::1",  # urlsplit's own ValueError once escaped and dropped the session
    ],
)
def test_bad_callback_url(url: str) -> None:
    assert parse(("X-OV-Callback-URL", url)) == (
        {},
        [f"X-OV-Callback-URL: must be an absolute http or https URL, got {url!r}"],
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("bloomreach", "bloomreach"), ("Mailgun", "mailgun"), ("native", "native")],
)
def test_callback_format(value: str, expected: str) -> None:
    assert parse(("X-OV-Callback-Format", value)) == ({"callback_format": expected}, [])


def test_bad_callback_format() -> None:
    assert parse(("X-OV-Callback-Format", "xml")) == (
        {},
        ["X-OV-Callback-Format: expected one of native, mailgun, bloomreach, got 'xml'"],
    )


def test_unknown_ov_header_is_recorded_not_refused() -> None:
    assert parse(("X-OV-Foo", "bar"), ("x-ov-campaign", "1")) == (
        {"unhandled": ("X-OV-Foo not recognised", "x-ov-campaign not recognised")},
        [],
    )


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-OV-testmode", "yes"),
        ("X-OV-Track", "yes"),
        ("X-OV-Require-TLS", "yes"),
        ("X-OV-Variables", "{}"),
        ("X-OV-Template", "t"),
        ("X-OV-Callback-URL", "https://example.com/"),
        ("X-OV-Callback-Format", "mailgun"),
    ],
)
def test_repeated_single_valued_header_is_a_problem(header: str, value: str) -> None:
    assert parse((header, value), (header.upper(), value)) == (
        {},
        [f"{header}: given 2 times; give it once"],
    )


def test_every_header_together() -> None:
    partial, problems = parse(
        ("X-OV-Tag", "t"),
        ("X-OV-testmode", "yes"),
        ("X-OV-Track", "yes"),
        ("X-OV-tracking_open", "no"),
        ("X-OV-Require-TLS", "yes"),
        ("X-OV-Recipient-Variables", '{"a@x.example": {"n": 1}}'),
        ("X-OV-Variables", '{"v": 1}'),
        ("X-OV-Template", "tpl"),
        ("X-OV-Template-Variables", '{"tv": 1}'),
        ("X-OV-Callback-URL", "https://example.com/h"),
        ("X-OV-Callback-Format", "bloomreach"),
    )
    assert problems == []
    assert partial == {
        "tags": ("t",),
        "test_mode": True,
        "track_opens": False,
        "track_clicks": True,
        "require_tls": True,
        "recipient_variables": {"a@x.example": {"n": 1}},
        "variables": {"v": 1},
        "template": "tpl",
        "template_variables": {"tv": 1},
        "callback_url": "https://example.com/h",
        "callback_format": "bloomreach",
    }
