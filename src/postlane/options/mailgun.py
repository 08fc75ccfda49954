"""The Mailgun dialect: the X-Mailgun-* headers many applications already emit.

Reading them lets a customer switch an application from Mailgun to Postlane by
changing only the SMTP host. Unknown X-Mailgun-* headers are recorded, not
refused, for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import tzinfo
from functools import partial
from typing import Any, Final

from postlane.errors import OptionError
from postlane.options._reading import Reading, set_tracking
from postlane.options._values import (
    YES_NO,
    YES_NO_TRUE_FALSE,
    choice,
    flag,
    json_object,
    recipient_variables,
    text,
    when,
)

_NAMES: Final = {
    name.lower(): name
    for name in (
        "X-Mailgun-Tag",
        "X-Mailgun-Track",
        "X-Mailgun-Track-Clicks",
        "X-Mailgun-Track-Opens",
        "X-Mailgun-Variables",
        "X-Mailgun-Recipient-Variables",
        "X-Mailgun-Deliver-By",
        "X-Mailgun-Require-TLS",
        "X-Mailgun-Template-Name",
        "X-Mailgun-Template-Variables",
    )
}

_CLICKS: Final = ("yes", "no", "htmlonly")


def parse(
    headers: Sequence[tuple[str, str]], *, tz: tzinfo
) -> tuple[dict[str, Any], list[OptionError]]:
    """Partial send options and problems from a message's X-Mailgun-* headers.

    ``tz`` is the account's zone, for an X-Mailgun-Deliver-By written without one.
    """
    reading = _read(headers, tz)
    return reading.partial, reading.problems


def _read(headers: Sequence[tuple[str, str]], tz: tzinfo) -> Reading:
    reading = Reading(headers, _NAMES, prefix="x-mailgun-")
    tags = [
        tag
        for value in reading.every("x-mailgun-tag")
        if (tag := reading.convert("x-mailgun-tag", value, text)) is not None
    ]
    if tags:
        reading.set("tags", tuple(dict.fromkeys(tags)), "x-mailgun-tag")
    _read_tracking(reading)
    reading.take("recipient_variables", "x-mailgun-recipient-variables", recipient_variables)
    reading.take("variables", "x-mailgun-variables", json_object)
    # "Deliver by" is a deadline: past it the message must not go out at all.
    reading.take("expires_at", "x-mailgun-deliver-by", partial(when, tz=tz, iso=False))
    reading.take("require_tls", "x-mailgun-require-tls", partial(flag, words=YES_NO_TRUE_FALSE))
    reading.take("template", "x-mailgun-template-name", text)
    reading.take("template_variables", "x-mailgun-template-variables", json_object)
    return reading


def _read_tracking(reading: Reading) -> None:
    yes_no = partial(flag, words=YES_NO)
    clicks = reading.value("x-mailgun-track-clicks", partial(choice, allowed=_CLICKS))
    if clicks == "htmlonly":
        # Postlane rewrites links in every part it can; it has no HTML-only mode.
        reading.note("X-Mailgun-Track-Clicks htmlonly — treated as yes")
    set_tracking(
        reading,
        general=("x-mailgun-track", reading.value("x-mailgun-track", yes_no)),
        opens=("x-mailgun-track-opens", reading.value("x-mailgun-track-opens", yes_no)),
        clicks=("x-mailgun-track-clicks", None if clicks is None else clicks != "no"),
    )
