"""Message priority from X-Priority, Importance and X-MSMail-Priority."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest

from postlane.options import standard


def parse(*headers: tuple[str, str]) -> tuple[dict[str, Any], list[str]]:
    partial, problems = standard.parse(list(headers), tz=UTC)
    return partial, [str(problem) for problem in problems]


def test_no_priority_headers_no_options() -> None:
    assert parse(("Subject", "x"), ("X-OV-Track", "no")) == ({}, [])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1 (Highest)", 1),
        ("2 (High)", 2),
        ("3 (Normal)", 3),
        ("4 (Low)", 4),
        ("5 (Lowest)", 5),
        ("1", 1),
        (" 3 ", 3),
        ("2(High)", 2),
    ],
)
def test_x_priority(value: str, expected: int) -> None:
    assert parse(("X-Priority", value)) == ({"priority": expected}, [])


@pytest.mark.parametrize("value", ["0", "6", "10", "1.5", "High", "", "(1)", "1a"])
def test_malformed_x_priority_is_a_problem(value: str) -> None:
    assert parse(("X-Priority", value)) == (
        {},
        [f"X-Priority: expected a digit 1 (highest) to 5 (lowest), got {value.strip()!r}"],
    )


@pytest.mark.parametrize("header", ["Importance", "X-MSMail-Priority"])
@pytest.mark.parametrize(("value", "expected"), [("high", 2), ("Normal", 3), ("LOW", 4)])
def test_importance_words(header: str, value: str, expected: int) -> None:
    assert parse((header, value)) == ({"priority": expected}, [])


@pytest.mark.parametrize("header", ["Importance", "X-MSMail-Priority"])
def test_malformed_importance_is_a_problem(header: str) -> None:
    assert parse((header, "urgent")) == (
        {},
        [f"{header}: expected high, normal or low, got 'urgent'"],
    )


@pytest.mark.parametrize(
    "headers",
    [
        [("Importance", "low"), ("X-Priority", "1 (Highest)")],
        [("X-Priority", "1 (Highest)"), ("Importance", "low"), ("X-MSMail-Priority", "Low")],
    ],
)
def test_x_priority_wins(headers: list[tuple[str, str]]) -> None:
    assert parse(*headers) == ({"priority": 1}, [])


def test_importance_wins_over_msmail_priority() -> None:
    assert parse(("X-MSMail-Priority", "Low"), ("Importance", "High")) == ({"priority": 2}, [])


def test_malformed_x_priority_is_reported_even_with_importance() -> None:
    partial, problems = parse(("X-Priority", "urgent"), ("Importance", "high"))
    assert partial == {"priority": 2}
    assert problems == ["X-Priority: expected a digit 1 (highest) to 5 (lowest), got 'urgent'"]


def test_repeated_x_priority_is_a_problem() -> None:
    assert parse(("X-Priority", "1"), ("x-priority", "5")) == (
        {},
        ["X-Priority: given 2 times; give it once"],
    )
