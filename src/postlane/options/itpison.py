"""The ITPison OMICard dialect: X-JobName … X-SendOption (manual ch. 7, appendix A).

OMICard customers move to Postlane with mail that already carries these
headers, so every one is read. The option masks pack many unrelated switches
into one number; Postlane acts on the bits that mean something for email it
sends, and lists every other set bit by its appendix A name in ``unhandled`` so
nothing a customer asked for disappears without a trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from functools import partial
from typing import Any, Final

from postlane.errors import OptionError
from postlane.options import _omicard_bits as bits
from postlane.options._reading import Reading, order_problem
from postlane.options._values import mask, text, when

_NAMES: Final = {
    name.lower(): name
    for name in (
        "X-JobName",
        "X-RefNumber",
        "X-NextLaunchTime",
        "X-LaunchExpireTime",
        "X-LaunchType",
        "X-LaunchClass",
        "X-LaunchOption",
        "X-JobOption",
        "X-ListOption",
        "X-LinkOption",
        "X-SendOption",
    )
}

#: Lower-cased names of the ITPison control headers (they never reach recipients).
HEADERS: Final = frozenset(_NAMES)


@dataclass(frozen=True, slots=True)
class _Mask:
    """One option mask: what its bits are called and which of them Postlane acts on.

    A mask whose ``states_all`` is set is the message's whole word on its
    switches, as the option value of an OMICard job is: a bit left clear turns
    its switch off even where the account's or user's defaults turned it on.
    X-LinkOption's bits only forbid tracking, so a clear bit there leaves the
    decision to the defaults and the other dialects.
    """

    key: str
    names: Mapping[int, str]
    acts: Mapping[int, tuple[str, bool]]
    states_all: bool = True


_MASKS: Final = (
    # Every LaunchOption bit steers ITPison's launcher, which Postlane does not have.
    _Mask("x-launchoption", bits.LAUNCH_OPTION, {}),
    _Mask(
        "x-joboption",
        bits.JOB_OPTION,
        {
            8: ("html_to_text", True),
            128: ("archive_copy", True),
            512: ("convert_to_utf8", True),
            2048: ("subject_from_html_title", True),
            262144: ("text_to_html", True),
            268435456: ("delivery_receipt", True),
            536870912: ("read_receipt", True),
        },
    ),
    _Mask(
        "x-listoption",
        bits.LIST_OPTION,
        {
            1: ("keep_to", True),
            2: ("keep_cc", True),
            32: ("remove_unsubscribed", True),
            64: ("remove_duplicates", True),
            128: ("remove_blacklisted", True),
            512: ("remove_bounced", True),
            65536: ("bypass_list_filters", True),
        },
    ),
    _Mask(
        "x-linkoption",
        bits.LINK_OPTION,
        {
            64: ("track_opens", False),
            128: ("track_clicks", False),
            512: ("track_mailto_links", False),
        },
        states_all=False,
    ),
)

_SMS_SENDS: Final = {2: "SMS first", 4: "email and SMS"}
_SMS_ONLY: Final = 3


def parse(
    headers: Sequence[tuple[str, str]], *, tz: tzinfo
) -> tuple[dict[str, Any], list[OptionError]]:
    """Partial send options and problems from a message's ITPison headers.

    ``tz`` is the account's zone, used for launch times written without one.
    """
    reading = _read(headers, tz)
    return reading.partial, reading.problems


def _read(headers: Sequence[tuple[str, str]], tz: tzinfo) -> Reading:
    reading = Reading(headers, _NAMES)
    reading.take("job_name", "x-jobname", text)
    reading.take("ref_number", "x-refnumber", text)
    for field, key in (("launch_type", "x-launchtype"), ("launch_class", "x-launchclass")):
        reading.take(field, key, text)
        if field in reading.partial:
            reading.note(
                f"{reading.name(key)} {reading.partial[field]} — ITPison launcher setting,"
                " recorded only"
            )
    _read_times(reading, tz)
    raw_masks: dict[str, int] = {}
    for spec in _MASKS:
        number = _read_mask(reading, spec.key, raw_masks)
        if number is not None:
            _apply_bits(reading, spec, number)
    send = _read_mask(reading, "x-sendoption", raw_masks)
    if send is not None:
        _apply_send_option(reading, send)
    if raw_masks:
        reading.partial["raw_masks"] = raw_masks
    return reading


def _read_times(reading: Reading, tz: tzinfo) -> None:
    at = partial(when, tz=tz)
    reading.take("scheduled_at", "x-nextlaunchtime", at)
    reading.take("expires_at", "x-launchexpiretime", at)
    if "scheduled_at" in reading.partial and "expires_at" in reading.partial:
        problem = order_problem(
            reading.partial["scheduled_at"],
            reading.partial["expires_at"],
            reading.sources["scheduled_at"],
            reading.sources["expires_at"],
        )
        if problem is not None:
            reading.problems.append(problem)
            del reading.partial["expires_at"], reading.sources["expires_at"]


def _read_mask(reading: Reading, key: str, raw_masks: dict[str, int]) -> int | None:
    value = reading.one(key)
    number = None if value is None else reading.convert(key, value, mask)
    if number is not None:
        raw_masks[reading.name(key)] = number
    return number


def _apply_bits(reading: Reading, spec: _Mask, number: int) -> None:
    name = reading.name(spec.key)
    if spec.states_all:
        for bit, (field, value) in spec.acts.items():
            if not number & bit:
                reading.set(field, not value, spec.key)
    for bit in _bits(number):
        if bit in spec.acts:
            field, value = spec.acts[bit]
            reading.set(field, value, spec.key)
        else:
            reading.note(f"{name} {bit} {spec.names.get(bit, 'unknown bit')}")


def _apply_send_option(reading: Reading, number: int) -> None:
    # Email only (0) and email first (1) both mean "send this email": nothing to record.
    channel = number & bits.SEND_LIST_MASK
    if channel == _SMS_ONLY:
        # Sending the email would be doing something the customer did not ask for.
        reading.problem(
            "x-sendoption",
            f"{channel} ({bits.SEND_OPTION[channel]}) asks for SMS only; Postlane sends email only",
        )
    elif channel in _SMS_SENDS:
        reading.note(
            f"X-SendOption {channel} {bits.SEND_OPTION[channel]} ({_SMS_SENDS[channel]})"
            " — email is sent only via email channel"
        )
    elif channel not in bits.SEND_OPTION:
        reading.note(f"X-SendOption {channel} unknown value")
    for bit in _bits(number & ~bits.SEND_LIST_MASK):
        reading.note(f"X-SendOption {bit} unknown bit")


def _bits(number: int) -> list[int]:
    return [1 << i for i in range(number.bit_length()) if number >> i & 1]
