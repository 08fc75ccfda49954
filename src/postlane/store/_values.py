"""Checking the shape of values before they are written.

Types are checked here, where the message can name the field; which values
are allowed (policies, priority range) is the database's CHECK constraints'
job, so there is one source of truth for them (see ``_constraints``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from postlane.errors import InvalidInput

Converter = Callable[[str, Any], Any]


def name(field: str, value: Any) -> str:
    """A name people type: non-empty text without surrounding whitespace."""
    if not isinstance(value, str) or not value or value != value.strip():
        raise InvalidInput(
            f"{field} must be non-empty text without surrounding spaces, got {value!r}"
        )
    return value


def optional_name(field: str, value: Any) -> str | None:
    return None if value is None else name(field, value)


def domain(field: str, value: Any) -> str:
    """A domain name, lower-cased because DNS names compare case-insensitively."""
    text_value = name(field, value)
    if any(ch.isspace() for ch in text_value):
        raise InvalidInput(f"{field} must be a domain name, got {value!r}")
    return text_value.lower()


def text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be text, got {type(value).__name__}")
    return value


def flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be true or false, got {value!r}")
    return value


def integer(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be a whole number, got {value!r}")
    return value


def blob(field: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise InvalidInput(f"{field} must be non-empty bytes, got {type(value).__name__}")
    return value


def optional_bytes(field: str, value: Any) -> bytes | None:
    if value is not None and not isinstance(value, bytes):
        raise InvalidInput(f"{field} must be bytes or None, got {type(value).__name__}")
    return value


def text_list(field: str, value: Any) -> list[str]:
    # A lone string is iterable too; taking it as a list of characters
    # would silently store nonsense.
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidInput(f"{field} must be a list of text, got {value!r}")
    items = list(value)
    for item in items:
        text(f"{field} item", item)
    return items


def domain_list(field: str, value: Any) -> list[str]:
    return [domain(f"{field} item", item) for item in text_list(field, value)]


def json_object(field: str, value: Any) -> dict[str, Any]:
    """A JSON object, copied so later changes by the caller are not stored."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidInput(f"{field} must be a mapping with text keys, got {value!r}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{field} is not JSON-serialisable: {e}") from e
    return copied


def changes(what: str, given: Mapping[str, Any], fields: Mapping[str, Converter]) -> dict[str, Any]:
    """``given`` checked field by field; a field not in ``fields`` is refused."""
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise InvalidInput(
            f"cannot change {what} field(s) {', '.join(unknown)}; "
            f"changeable: {', '.join(sorted(fields))}"
        )
    return {key: fields[key](key, value) for key, value in given.items()}
