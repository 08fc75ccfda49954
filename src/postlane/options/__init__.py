"""Per-message send options: many header dialects in, one :class:`SendOptions` out.

Intake calls :func:`from_headers` once per message, refuses the message if
there are problems (each names its header, for a clear 5.6.x reply), strips the
control headers, and lays the partial over the account's and user's defaults
with :meth:`SendOptions.layer`. Everything after intake reads SendOptions only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Final

from postlane.errors import OptionError
from postlane.options import itpison, mailgun, omnivery, standard
from postlane.options._reading import Reading, order_problem
from postlane.options.model import SendOptions, validate_partial

__all__ = [
    "ParsedOptions",
    "SendOptions",
    "from_headers",
    "is_control_header",
    "validate_partial",
]

_READERS: Final = (itpison._read, omnivery._read, mailgun._read, standard._read)
_CONTROL_PREFIXES: Final = ("x-ov-", "x-mailgun-")
# Data the sender attaches to the message, which both vendors deliver with it:
# Mailgun's docs say X-Mailgun-Variables "will be included in the MIME of the
# delivered email", and Omnivery's that X-OV-Template-Variables, "unlike
# X-OV-Variables", is not passed in the message headers.
_DELIVERED: Final = frozenset({"x-ov-variables", "x-mailgun-variables"})
_ACCUMULATED: Final = ("tags", "unhandled")


@dataclass(frozen=True, slots=True)
class ParsedOptions:
    """What a message's headers ask for, what is wrong with them, and what to strip.

    ``control_headers`` holds the lower-cased names of the headers present that
    instruct Postlane rather than the recipient; they are removed before the
    message is stored so they never leak to recipients. Priority headers are
    not among them: the recipient's mail client uses them too; nor are the
    variables headers, which both vendors deliver with the message.
    """

    partial: dict[str, Any]
    problems: list[OptionError]
    control_headers: frozenset[str]


def is_control_header(name: str) -> bool:
    """Whether a header instructs Postlane and so must not reach the recipient."""
    key = name.lower()
    if key in _DELIVERED:
        return False
    return key.startswith(_CONTROL_PREFIXES) or key in itpison.HEADERS


def from_headers(headers: Sequence[tuple[str, str]], *, tz: tzinfo) -> ParsedOptions:
    """Read every dialect from ``headers`` ((name, unfolded value) in message order).

    ``tz`` is the account's zone, for times written without one. Dialects may
    be mixed; where two set the same field differently neither is taken and
    the problem names both headers, since Postlane cannot know which was meant.
    """
    # Every option header is an X- header or Importance; most messages carry
    # none, and then no dialect needs to look at them at all.
    relevant = [h for h in headers if h[0][:2] in ("X-", "x-") or h[0].lower() == "importance"]
    if not relevant:
        return ParsedOptions({}, [], frozenset())
    partial, problems = _combine([read(relevant, tz) for read in _READERS])
    control = frozenset(name.lower() for name, _ in relevant if is_control_header(name))
    return ParsedOptions(partial, problems, control)


def _combine(readings: list[Reading]) -> tuple[dict[str, Any], list[OptionError]]:
    problems = [problem for reading in readings for problem in reading.problems]
    partial: dict[str, Any] = {}
    first: dict[str, tuple[str, Any]] = {}
    disputed: set[str] = set()
    for reading in readings:
        for field, value in reading.partial.items():
            if field in _ACCUMULATED:
                partial[field] = tuple(dict.fromkeys(partial.get(field, ()) + value))
            elif field == "raw_masks":
                partial[field] = {**partial.get(field, {}), **value}
            elif field not in first:
                first[field] = (reading.sources[field], value)
                partial[field] = value
            elif value != first[field][1]:
                header, earlier = first[field]
                problems.append(
                    OptionError(
                        reading.sources[field],
                        f"sets {field} to {_show(value)}, but {header} sets it to {_show(earlier)}",
                    )
                )
                disputed.add(field)
    for field in disputed:
        del partial[field]
    _note_not_built(partial, first)
    if "scheduled_at" in partial and "expires_at" in partial:
        problem = order_problem(
            partial["scheduled_at"],
            partial["expires_at"],
            first["scheduled_at"][0],
            first["expires_at"][0],
        )
        if problem is not None:
            problems.append(problem)
            del partial["expires_at"]
    return partial, problems


# What a header may ask for that Postlane records but does not do yet.
_NOT_BUILT: Final = {
    "track_opens": "open tracking",
    "track_clicks": "click tracking",
    "track_mailto_links": "mailto link tracking",
    "callback_url": "event callbacks",
}


def _note_not_built(partial: dict[str, Any], first: dict[str, tuple[str, Any]]) -> None:
    """List a request for a feature Postlane lacks where unacted-on bits are listed.

    Only a request to turn one on: a header that turns tracking off is obeyed.
    """
    notes = [
        f"{first[field][0]} asks for {what} — Postlane does not do it yet"
        for field, what in _NOT_BUILT.items()
        if field in partial and partial[field] not in (False, None)
    ]
    if notes:
        partial["unhandled"] = tuple(dict.fromkeys((*partial.get("unhandled", ()), *notes)))


def _show(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    shown = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return shown if len(shown) <= 60 else shown[:57] + "..."
