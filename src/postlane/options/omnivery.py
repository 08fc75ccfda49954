"""The Omnivery dialect: the X-OV-* headers of Omnivery's "Sending via SMTP" page.

Known headers are read strictly, because a malformed value the customer meant
(``X-OV-Track: of``) must bounce rather than be guessed at. Unknown X-OV-*
headers are only recorded: Omnivery may add headers Postlane has not heard of.
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
    YES_NO_TRUE_FALSE_1_0,
    choice,
    flag,
    http_url,
    json_object,
    recipient_variables,
    text,
)
from postlane.options.model import CALLBACK_FORMATS

_NAMES: Final = {
    name.lower(): name
    for name in (
        "X-OV-Tag",
        "X-OV-testmode",
        "X-OV-Track",
        "X-OV-tracking_click",
        "X-OV-tracking_open",
        "X-OV-Require-TLS",
        "X-OV-Recipient-Variables",
        "X-OV-Variables",
        "X-OV-Template",
        "X-OV-Template-Variables",
        "X-OV-Callback-URL",
        "X-OV-Callback-Format",
    )
}


def parse(
    headers: Sequence[tuple[str, str]], *, tz: tzinfo
) -> tuple[dict[str, Any], list[OptionError]]:
    """Partial send options and problems from a message's X-OV-* headers.

    ``tz`` is accepted for a uniform dialect signature; no X-OV-* header is a time.
    """
    reading = _read(headers, tz)
    return reading.partial, reading.problems


def _read(headers: Sequence[tuple[str, str]], tz: tzinfo) -> Reading:
    reading = Reading(headers, _NAMES, prefix="x-ov-")
    tags = [
        tag
        for value in reading.every("x-ov-tag")
        if (tag := reading.convert("x-ov-tag", value, text)) is not None
    ]
    if tags:
        reading.set("tags", tuple(dict.fromkeys(tags)), "x-ov-tag")
    reading.take("test_mode", "x-ov-testmode", partial(flag, words=YES_NO_TRUE_FALSE_1_0))
    yes_no = partial(flag, words=YES_NO)
    set_tracking(
        reading,
        general=("x-ov-track", reading.value("x-ov-track", yes_no)),
        opens=("x-ov-tracking_open", reading.value("x-ov-tracking_open", yes_no)),
        clicks=("x-ov-tracking_click", reading.value("x-ov-tracking_click", yes_no)),
    )
    reading.take("require_tls", "x-ov-require-tls", partial(flag, words=YES_NO_TRUE_FALSE))
    reading.take("recipient_variables", "x-ov-recipient-variables", recipient_variables)
    reading.take("variables", "x-ov-variables", json_object)
    reading.take("template", "x-ov-template", text)
    reading.take("template_variables", "x-ov-template-variables", json_object)
    reading.take("callback_url", "x-ov-callback-url", http_url)
    reading.take(
        "callback_format", "x-ov-callback-format", partial(choice, allowed=CALLBACK_FORMATS)
    )
    return reading
