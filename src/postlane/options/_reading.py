"""What one dialect makes of a message's headers, and where each value came from.

The dialect modules share this bookkeeping so that repeats, problems and
unrecognised headers are handled the same way everywhere. It also remembers
which header set each field, so that when two dialects disagree the problem can
name both headers instead of leaving the customer to guess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from postlane.errors import OptionError
from postlane.options._values import BadValue

T = TypeVar("T")


class Reading:
    """One dialect's partial options, problems and provenance for one message.

    ``names`` maps the lower-cased header names the dialect knows to their
    documented spelling, which is what problems and provenance use. Headers that
    start with ``prefix`` but are not in ``names`` belong to the dialect's vendor
    and are recorded as not recognised rather than refused: vendors add headers,
    and a customer's mail should not bounce because of one Postlane ignores.
    """

    def __init__(
        self,
        headers: Sequence[tuple[str, str]],
        names: Mapping[str, str],
        prefix: str | None = None,
    ) -> None:
        self.partial: dict[str, Any] = {}
        self.problems: list[OptionError] = []
        self.sources: dict[str, str] = {}
        self._notes: list[str] = []
        self._names = names
        self._values: dict[str, list[str]] = {}
        for name, value in headers:
            key = name.lower()
            if key in names:
                self._values.setdefault(key, []).append(value)
            elif prefix is not None and key.startswith(prefix):
                self.note(f"{name} not recognised")

    def name(self, key: str) -> str:
        """The documented spelling of a known header."""
        return self._names[key]

    def every(self, key: str) -> list[str]:
        """All values of a repeatable header, in message order."""
        return self._values.get(key, [])

    def one(self, key: str) -> str | None:
        """The value of a single-valued header; a repeat is a problem, not a guess."""
        values = self._values.get(key, [])
        if len(values) > 1:
            self.problem(key, f"given {len(values)} times; give it once")
            return None
        return values[0] if values else None

    def convert(self, key: str, value: str, converter: Callable[[str], T]) -> T | None:
        """``converter(value)``, or None after recording why the value is malformed."""
        try:
            return converter(value)
        except BadValue as exc:
            self.problem(key, str(exc))
            return None

    def value(self, key: str, converter: Callable[[str], T]) -> T | None:
        """The converted value of the single-valued header ``key``; None if absent or bad."""
        value = self.one(key)
        return None if value is None else self.convert(key, value, converter)

    def take(self, field: str, key: str, converter: Callable[[str], Any]) -> None:
        """Set ``field`` from the single-valued header ``key`` if it is present and valid."""
        converted = self.value(key, converter)
        if converted is not None:
            self.set(field, converted, key)

    def set(self, field: str, value: Any, key: str) -> None:
        self.partial[field] = value
        self.sources[field] = self.name(key)

    def note(self, entry: str) -> None:
        """Record something the message asks for that Postlane does not do."""
        if entry not in self._notes:
            self._notes.append(entry)
            self.partial["unhandled"] = tuple(self._notes)

    def problem(self, key: str, problem: str) -> None:
        self.problems.append(OptionError(self._names.get(key, key), problem))


def set_tracking(
    reading: Reading,
    general: tuple[str, bool | None],
    opens: tuple[str, bool | None],
    clicks: tuple[str, bool | None],
) -> None:
    """Apply a vendor's tracking headers, each given as (header key, value or None).

    The general switch covers opens and clicks; a specific header overrides it
    for its own kind, whatever the order the headers came in, because that is
    what both vendors document and what customers who send both mean.
    """
    for field, specific in (("track_opens", opens), ("track_clicks", clicks)):
        key, value = specific if specific[1] is not None else general
        if value is not None:
            reading.set(field, value, key)


def order_problem(
    scheduled: datetime, expires: datetime, scheduled_by: str, expires_by: str
) -> OptionError | None:
    """A send that expires before it may start can never go out: say so up front."""
    if expires >= scheduled:
        return None
    return OptionError(
        expires_by,
        f"{expires.isoformat()} is before the time {scheduled_by} asks to send at"
        f" ({scheduled.isoformat()})",
    )
