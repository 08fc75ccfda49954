"""When to try a deferred recipient again.

A 4xx reply means "not now" (RFC 5321 §4.2.1). Retrying too soon wastes
connections and reads as abuse to the receiver; Omnivery's rule, which
Postlane keeps, is that retries are at least one minute apart. Retrying too
rarely delays mail that a greylisting server would take on the second try.
The schedule doubles from one minute and stops growing at two hours:

======== ======== ====================
attempts delay    jittered (±10 %)
======== ======== ====================
1        1 min    60 s to 66 s
2        2 min    108 s to 132 s
3        4 min    216 s to 264 s
4        8 min    7.2 to 8.8 min
5        16 min   14.4 to 17.6 min
6        32 min   28.8 to 35.2 min
7        64 min   57.6 to 70.4 min
8 +      120 min  108 to 132 min
======== ======== ====================

``attempts`` counts the attempts made so far, including the one that just
failed. Jitter spreads recipients deferred together (a whole batch greylisted
by one domain) so they do not all come back in the same second; it never takes
a delay below the one-minute floor, which is why the first row starts at 60 s.

A remote server may say how long to wait ("try again in 5 minutes");
:func:`parse_retry_hint` reads that, and :func:`next_attempt` waits at least
as long — a hint can lengthen the delay, never shorten it below the schedule
or the floor. Hints beyond a day are cut to a day: such a number is more
likely a misreading than a plan, and the message's expiry decides anyway.
When the next attempt would fall after the recipient's expiry there is none:
the recipient expires.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta
from typing import Final

__all__ = [
    "FIRST_DELAY",
    "JITTER",
    "MAX_DELAY",
    "MAX_HINT",
    "MIN_INTERVAL",
    "next_attempt",
    "parse_retry_hint",
]

FIRST_DELAY: Final = timedelta(minutes=1)
MAX_DELAY: Final = timedelta(hours=2)
MIN_INTERVAL: Final = timedelta(minutes=1)
MAX_HINT: Final = timedelta(days=1)
JITTER: Final = 0.1
# 2**7 minutes already passes MAX_DELAY; a bigger exponent only risks overflow.
_MAX_DOUBLINGS: Final = 7


def next_attempt(
    attempts: int,
    now: datetime,
    *,
    expires_at: datetime,
    retry_hint: timedelta | None = None,
    rng: random.Random | None = None,
) -> datetime | None:
    """When to try again after ``attempts`` failed attempts, or None to expire.

    ``now`` and ``expires_at`` must be timezone-aware. Without ``rng`` the
    delay is exactly the schedule's, which tests and reports can predict.
    """
    if attempts < 1:
        raise ValueError(f"attempts counts the attempts made so far, at least 1; got {attempts}")
    if now.tzinfo is None or expires_at.tzinfo is None:
        raise ValueError("now and expires_at must be timezone-aware datetimes")
    delay = min(FIRST_DELAY * 2 ** min(attempts - 1, _MAX_DOUBLINGS), MAX_DELAY)
    if rng is not None:
        delay *= rng.uniform(1 - JITTER, 1 + JITTER)
    if retry_hint is not None:
        delay = max(delay, min(retry_hint, MAX_HINT))
    due = now + max(delay, MIN_INTERVAL)
    return None if due > expires_at else due


_UNITS: Final = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
}
# A wait word, a few words without digits or sentence ends ("again in", "after",
# "for"), then a number: a count with a unit, or hh:mm:ss as some greylisters write.
_UNIT: Final = "|".join(sorted(_UNITS, key=len, reverse=True))  # longest first: "min" before "m"
_HINT: Final = re.compile(
    r"\b(?:try|retry|wait|come\s+back|greylist(?:ed|ing)?|deferred)\b[^\d.;,\n]{0,20}?"
    rf"(?:(\d{{1,2}}):(\d{{2}}):(\d{{2}})\b|(\d{{1,6}}(?:\.\d{{1,3}})?)\s*({_UNIT})\b)",
    re.IGNORECASE,
)


def parse_retry_hint(reply_text: str) -> timedelta | None:
    """How long a 4xx reply asks the sender to wait, or None if it does not say.

    Reads the usual forms: "try again in 5 minutes", "retry in 1.5 hours",
    "retry in 300 seconds",
    "Greylisted for 300 seconds", "please come back in 00:05:00". Texts that
    only say "later" — Gmail's ``4.7.28 ... Please try again later`` — give
    None, and the schedule decides. The first hint in the text wins.
    """
    match = _HINT.search(reply_text)
    if match is None:
        return None
    hours, minutes, seconds, count, unit = match.groups()
    if count is not None:  # "1.5 hours" as well as "90 minutes"
        return timedelta(seconds=round(float(count) * _UNITS[unit.lower()]))
    return timedelta(hours=int(hours), minutes=int(minutes), seconds=int(seconds))
