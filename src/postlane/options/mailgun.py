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

_HTML_ONLY: Final = ("yes", "no", "htmlonly")


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
    # Mailgun's scheduled delivery over SMTP (the API's o:deliverytime): the
    # time the message is to go out, not a deadline.
    reading.take("scheduled_at", "x-mailgun-deliver-by", partial(when, tz=tz, iso=False))
    reading.take("require_tls", "x-mailgun-require-tls", partial(flag, words=YES_NO_TRUE_FALSE))
    reading.take("template", "x-mailgun-template-name", text)
    reading.take("template_variables", "x-mailgun-template-variables", json_object)
    return reading


def _read_tracking(reading: Reading) -> None:
    yes_no = partial(flag, words=YES_NO)
    general = _yes_no_html_only(reading, "x-mailgun-track")
    clicks = _yes_no_html_only(reading, "x-mailgun-track-clicks")
    set_tracking(
        reading,
        general=("x-mailgun-track", general),
        opens=("x-mailgun-track-opens", reading.value("x-mailgun-track-opens", yes_no)),
        clicks=("x-mailgun-track-clicks", clicks),
    )


def _yes_no_html_only(reading: Reading, key: str) -> bool | None:
    # Mailgun's o:tracking and o:tracking-clicks take htmlonly too; Postlane
    # has no HTML-only mode, so it is recorded as a yes.
    word = reading.value(key, partial(choice, allowed=_HTML_ONLY))
    if word == "htmlonly":
        reading.note(f"{reading.name(key)} htmlonly — treated as yes")
    return None if word is None else word != "no"
