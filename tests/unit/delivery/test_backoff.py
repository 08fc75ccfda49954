from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from postlane.delivery.backoff import (
    MAX_DELAY,
    MAX_HINT,
    MIN_INTERVAL,
    next_attempt,
    parse_retry_hint,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FAR = NOW + timedelta(days=5)


def delay(
    attempts: int, *, retry_hint: timedelta | None = None, rng: random.Random | None = None
) -> timedelta:
    due = next_attempt(attempts, NOW, expires_at=FAR, retry_hint=retry_hint, rng=rng)
    assert due is not None
    return due - NOW


@pytest.mark.parametrize(
    ("attempts", "minutes"),
    [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 32), (7, 64), (8, 120), (9, 120), (50, 120)],
)
def test_schedule_doubles_from_one_minute_up_to_two_hours(attempts: int, minutes: int) -> None:
    assert delay(attempts) == timedelta(minutes=minutes)


def test_a_huge_attempt_count_does_not_overflow() -> None:
    assert delay(10**6) == MAX_DELAY


@pytest.mark.parametrize("attempts", [1, 2, 3, 6, 8, 20])
def test_jitter_stays_within_ten_percent_and_above_the_floor(attempts: int) -> None:
    base = delay(attempts)
    seen = {delay(attempts, rng=random.Random(seed)) for seed in range(200)}
    assert len(seen) > 1, "jitter must spread retries"
    for value in seen:
        assert base * 0.9 <= value <= base * 1.1 or value == MIN_INTERVAL
        assert value >= MIN_INTERVAL


def test_first_retry_is_never_sooner_than_one_minute_even_with_jitter() -> None:
    delays = [delay(1, rng=random.Random(seed)) for seed in range(500)]
    assert min(delays) == MIN_INTERVAL  # jitter below one minute is cut to the floor
    assert max(delays) > MIN_INTERVAL


def test_jitter_is_reproducible_with_the_same_seed() -> None:
    assert delay(4, rng=random.Random(7)) == delay(4, rng=random.Random(7))


def test_a_longer_retry_hint_wins() -> None:
    assert delay(1, retry_hint=timedelta(minutes=15)) == timedelta(minutes=15)
    assert delay(1, retry_hint=timedelta(minutes=15), rng=random.Random(3)) >= timedelta(minutes=15)


def test_a_shorter_retry_hint_does_not_shorten_the_schedule() -> None:
    assert delay(4, retry_hint=timedelta(minutes=1)) == timedelta(minutes=8)


@pytest.mark.parametrize("hint", [timedelta(0), timedelta(seconds=10)])
def test_a_hint_below_one_minute_is_raised_to_the_floor(hint: timedelta) -> None:
    assert delay(1, retry_hint=hint) == MIN_INTERVAL


def test_a_hint_beyond_a_day_is_cut_to_a_day() -> None:
    far = NOW + timedelta(days=30)
    due = next_attempt(1, NOW, expires_at=far, retry_hint=timedelta(days=9))
    assert due == NOW + MAX_HINT


def test_no_attempt_after_the_expiry() -> None:
    assert next_attempt(5, NOW, expires_at=NOW + timedelta(minutes=15)) is None
    assert next_attempt(1, NOW, expires_at=NOW) is None
    assert next_attempt(1, NOW, expires_at=NOW - timedelta(hours=1)) is None


def test_an_attempt_exactly_at_the_expiry_is_still_made() -> None:
    expiry = NOW + timedelta(minutes=16)
    assert next_attempt(5, NOW, expires_at=expiry) == expiry


def test_a_hint_that_passes_the_expiry_expires_the_recipient() -> None:
    expiry = NOW + timedelta(minutes=30)
    assert next_attempt(1, NOW, expires_at=expiry, retry_hint=timedelta(hours=1)) is None


def test_other_time_zones_compare_correctly() -> None:
    plus_two = timezone(timedelta(hours=2))
    expiry = (NOW + timedelta(minutes=1)).astimezone(plus_two)
    assert next_attempt(1, NOW, expires_at=expiry) == NOW + timedelta(minutes=1)


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_count_from_one(attempts: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        next_attempt(attempts, NOW, expires_at=FAR)


def test_naive_datetimes_are_refused() -> None:
    naive = datetime(2025, 3, 1, 12, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        next_attempt(1, naive, expires_at=FAR)
    with pytest.raises(ValueError, match="timezone-aware"):
        next_attempt(1, NOW, expires_at=naive)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4.7.1 Please try again in 5 minutes", timedelta(minutes=5)),
        ("451 retry in 300 seconds", timedelta(seconds=300)),
        ("Try again in 30s", timedelta(seconds=30)),
        ("Greylisted for 300 seconds (see http://postgrey.example/)", timedelta(seconds=300)),
        ("Greylisting in action, please come back in 00:05:00", timedelta(minutes=5)),
        ("Too many connections, wait 2 hrs", timedelta(hours=2)),
        ("deferred for 1 hour", timedelta(hours=1)),
        ("RETRY AFTER 10 MIN", timedelta(minutes=10)),
        ("try again in 2 minutes or in 10 minutes", timedelta(minutes=2)),
        ("421 4.7.0 Try again in 1.5 hours", timedelta(minutes=90)),  # once no hint at all
        ("retry in 0.5 min", timedelta(seconds=30)),
    ],
)
def test_retry_hints(text: str, expected: timedelta) -> None:
    assert parse_retry_hint(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail "
        "originating from your IP address. To protect our users from spam, mail sent from "
        "your IP address has been temporarily rate limited. Please try again later. "
        "For more information, go to https://support.google.com/mail/?p=UnsolicitedRateError",
        "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714)",
        "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected "
        "volume or user complaints - 4.16.55.1",
        "450 4.2.0 <x@example.org>: Recipient address rejected: Greylisted, see "
        "http://postgrey.schweikert.ch/help/example.org.html",
        "retry 3 times",
        "try again in 1234567 seconds",
        "",
    ],
)
def test_no_hint(text: str) -> None:
    assert parse_retry_hint(text) is None
