"""SendOptions: the one value the rest of Postlane reads about how to send a message.

Customers ask in many dialects (account defaults, user defaults, three header
dialects, API fields); each is turned into a *partial* — a plain dict holding
only the fields that layer sets — and the partials are laid over each other in
order, later wins. Keeping one frozen model means delivery, rendering and
reporting never need to know where a wish came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

from postlane.errors import InvalidInput
from postlane.options._values import (
    MAX_JSON_DEPTH,
    MAX_MASK,
    BadValue,
    http_url,
    json_type,
    looks_like_address,
)

CALLBACK_FORMATS: Final = ("native", "mailgun", "bloomreach")

_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class SendOptions:
    """How one message is to be sent, as asked by account, user, headers and API.

    Every default means "nothing asked": None where the account's own setting
    then applies, False for switches that only ever turn something on. Values
    are normalised and deeply frozen on construction (times in UTC, JSON data
    as read-only mappings and tuples), so a SendOptions shared between worker
    tasks cannot be changed under them.
    """

    job_name: str | None = None
    ref_number: str | None = None
    tags: tuple[str, ...] = ()
    scheduled_at: datetime | None = None
    expires_at: datetime | None = None
    priority: int | None = None  # 1 highest … 3 normal … 5 lowest
    track_opens: bool | None = None
    track_clicks: bool | None = None
    track_mailto_links: bool | None = None
    test_mode: bool = False
    require_tls: bool = False
    recipient_variables: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty)
    variables: Mapping[str, Any] = field(default_factory=_empty)
    template: str | None = None
    template_variables: Mapping[str, Any] = field(default_factory=_empty)
    callback_url: str | None = None
    callback_format: str | None = None  # one of CALLBACK_FORMATS
    keep_to: bool = False
    keep_cc: bool = False
    remove_duplicates: bool = False
    remove_unsubscribed: bool = False
    remove_blacklisted: bool = False
    remove_bounced: bool = False
    bypass_list_filters: bool = False
    html_to_text: bool = False
    text_to_html: bool = False
    convert_to_utf8: bool = False
    subject_from_html_title: bool = False
    archive_copy: bool = False
    delivery_receipt: bool = False
    read_receipt: bool = False
    launch_type: str | None = None
    launch_class: str | None = None
    raw_masks: Mapping[str, int] = field(default_factory=_empty)  # header → mask as given
    unhandled: tuple[str, ...] = ()  # what was asked that Postlane does not do

    def __post_init__(self) -> None:
        for item in fields(self):
            value = _COERCE[item.name](item.name, getattr(self, item.name))
            object.__setattr__(self, item.name, value)

    def layer(self, partial: Mapping[str, Any]) -> SendOptions:
        """These options with ``partial`` laid over them.

        Later wins, except that tags and unhandled entries accumulate (a user's
        tag does not erase the account's) and raw masks merge per header.
        """
        changes = _normalised(partial)
        for key in ("tags", "unhandled"):
            if key in changes:
                changes[key] = getattr(self, key) + changes[key]
        if "raw_masks" in changes:
            changes["raw_masks"] = {**self.raw_masks, **changes["raw_masks"]}
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON-safe data, for the message record and the API."""
        return {item.name: _plain(getattr(self, item.name)) for item in fields(self)}

    @classmethod
    def from_json(cls, data: object) -> SendOptions:
        """The inverse of :meth:`to_json`; fields left out take their defaults."""
        return cls(**_normalised(data))


def validate_partial(partial: object) -> dict[str, Any]:
    """Check a partial from outside (stored defaults, CLI or API JSON) and normalise it.

    Raises InvalidInput naming the offending key, so a bad ``default_options``
    is refused when it is set rather than when the first message is sent. The
    result is JSON data (times as UTC ISO 8601 strings), ready to be stored
    and later given to :meth:`SendOptions.layer` unchanged.
    """
    return {key: _plain(value) for key, value in _normalised(partial).items()}


def _normalised(partial: object) -> dict[str, Any]:
    if not isinstance(partial, Mapping):
        raise InvalidInput(f"send options must be an object, got {json_type(partial)}")
    clean: dict[str, Any] = {}
    for key, value in partial.items():
        coerce = _COERCE.get(key)
        if coerce is None:
            raise InvalidInput(f"{key}: not a send option")
        clean[key] = coerce(key, value)
    return clean


def _text(key: str, value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _wrong(key, "a string or null", value)


def _switch(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _wrong(key, "true or false", value)


def _tristate(key: str, value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _wrong(key, "true, false or null", value)


def _priority(key: str, value: object) -> int | None:
    if value is None or (
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5
    ):
        return value
    raise _wrong(key, "an integer from 1 (highest) to 5 (lowest) or null", value)


def _time(key: str, value: object) -> datetime | None:
    if value is None:
        return None
    moment = value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInput(f"{key}: not an ISO 8601 date and time: {value!r}") from None
    if not isinstance(moment, datetime):
        raise _wrong(key, "an ISO 8601 date and time or null", value)
    if moment.utcoffset() is None:
        raise InvalidInput(f"{key}: {value!r} has no time zone")
    return moment.astimezone(UTC)


def _texts(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(dict.fromkeys(value))
    raise _wrong(key, "an array of strings", value)


def _url(key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong(key, "a URL or null", value)
    try:
        return http_url(value)
    except BadValue as exc:
        raise InvalidInput(f"{key}: {exc}") from None


def _callback_format(key: str, value: object) -> str | None:
    if value is None or (isinstance(value, str) and value in CALLBACK_FORMATS):
        return value
    raise InvalidInput(f"{key}: expected one of {', '.join(CALLBACK_FORMATS)} or null")


def _object(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _wrong(key, "an object", value)
    frozen: Mapping[str, Any] = _frozen_json(key, value, MAX_JSON_DEPTH)
    return frozen


def _recipient_variables(key: str, value: object) -> Mapping[str, Mapping[str, Any]]:
    frozen = _object(key, value)
    for address, variables in frozen.items():
        if not looks_like_address(address):
            raise InvalidInput(f"{key}: key {address!r} is not an email address")
        if not isinstance(variables, Mapping):
            raise InvalidInput(
                f"{key}: the value for {address!r} must be an object, got {json_type(variables)}"
            )
    return frozen


def _masks(key: str, value: object) -> Mapping[str, int]:
    if not isinstance(value, Mapping):
        raise _wrong(key, "an object of header name to integer", value)
    for header, number in value.items():
        if not isinstance(header, str) or isinstance(number, bool) or not isinstance(number, int):
            raise _wrong(key, "an object of header name to integer", value)
        if not 0 <= number <= MAX_MASK:
            raise InvalidInput(f"{key}: {header} mask {number} is out of range (0 to {MAX_MASK})")
    return MappingProxyType(dict(value))


_SWITCHES: Final = (
    "test_mode",
    "require_tls",
    "keep_to",
    "keep_cc",
    "remove_duplicates",
    "remove_unsubscribed",
    "remove_blacklisted",
    "remove_bounced",
    "bypass_list_filters",
    "html_to_text",
    "text_to_html",
    "convert_to_utf8",
    "subject_from_html_title",
    "archive_copy",
    "delivery_receipt",
    "read_receipt",
)

_COERCE: Final[Mapping[str, Callable[[str, Any], Any]]] = {
    **dict.fromkeys(("job_name", "ref_number", "template", "launch_type", "launch_class"), _text),
    **dict.fromkeys(("tags", "unhandled"), _texts),
    **dict.fromkeys(("scheduled_at", "expires_at"), _time),
    **dict.fromkeys(("track_opens", "track_clicks", "track_mailto_links"), _tristate),
    **dict.fromkeys(_SWITCHES, _switch),
    **dict.fromkeys(("variables", "template_variables"), _object),
    "priority": _priority,
    "recipient_variables": _recipient_variables,
    "callback_url": _url,
    "callback_format": _callback_format,
    "raw_masks": _masks,
}


def _frozen_json(key: str, value: object, levels: int) -> Any:
    """A read-only deep copy of JSON data: mappings become proxies, lists tuples."""
    if isinstance(value, Mapping | list | tuple):
        if levels == 0:
            raise InvalidInput(f"{key}: nested deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(value, Mapping):
            return tuple(_frozen_json(key, item, levels - 1) for item in value)
        copy: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise InvalidInput(f"{key}: object keys must be strings, got {json_type(name)}")
            copy[name] = _frozen_json(key, item, levels - 1)
        return MappingProxyType(copy)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{key}: {value} is not a JSON number")
    if value is None or isinstance(value, str | int | float):
        return value
    raise InvalidInput(f"{key}: a {type(value).__name__} is not JSON data")


def _plain(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {name: _plain(item) for name, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _wrong(key: str, expected: str, value: object) -> InvalidInput:
    return InvalidInput(f"{key}: expected {expected}, got {json_type(value)}")
