"""Message priority from the headers mail clients write: X-Priority and Importance.

Outlook, Thunderbird and most libraries mark urgent mail this way, so Postlane
takes it as the queue priority. These headers stay in the message: the
recipient's mail client shows them, so they are content, not control.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import tzinfo
from typing import Any, Final

from postlane.errors import OptionError
from postlane.options._reading import Reading
from postlane.options._values import BadValue

_NAMES: Final = {name.lower(): name for name in ("X-Priority", "Importance", "X-MSMail-Priority")}
# X-Priority is 1 (highest) to 5 (lowest), usually with a comment: "1 (Highest)".
_X_PRIORITY = re.compile(r"\s*([1-5])(?:[\s(].*)?", re.DOTALL)
_WORDS: Final = {"high": 2, "normal": 3, "low": 4}


def parse(
    headers: Sequence[tuple[str, str]], *, tz: tzinfo
) -> tuple[dict[str, Any], list[OptionError]]:
    """Partial send options (only ``priority``) and problems from priority headers.

    ``tz`` is accepted for a uniform dialect signature; no priority header is a time.
    """
    reading = _read(headers, tz)
    return reading.partial, reading.problems


def _read(headers: Sequence[tuple[str, str]], tz: tzinfo) -> Reading:
    reading = Reading(headers, _NAMES)
    # All three are read so each is checked; the most precise one present wins.
    found = [
        (key, reading.value(key, converter))
        for key, converter in (
            ("x-priority", _x_priority),
            ("importance", _word),
            ("x-msmail-priority", _word),
        )
    ]
    for key, priority in found:
        if priority is not None:
            reading.set("priority", priority, key)
            break
    return reading


def _x_priority(value: str) -> int:
    match = _X_PRIORITY.fullmatch(value)
    if match is None:
        raise BadValue(f"expected a digit 1 (highest) to 5 (lowest), got {value.strip()!r}")
    return int(match.group(1))


def _word(value: str) -> int:
    word = value.strip().lower()
    if word not in _WORDS:
        raise BadValue(f"expected high, normal or low, got {value.strip()!r}")
    return _WORDS[word]
