"""Converters from one header value to one option value, shared by the dialects.

Each converter either returns a clean value or raises :class:`BadValue` whose
text becomes ``OptionError.problem``, so every dialect words the same mistake
the same way and a customer sees one vocabulary whatever headers they use.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, tzinfo
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import urlsplit

#: Deeper JSON than this is refused: nobody's variables need it, and the
#: recursive code that freezes and renders them must not run out of stack.
MAX_JSON_DEPTH: Final = 32
#: One JSON header larger than this is a mistake (or an attack), not options.
MAX_JSON_CHARS: Final = 1_000_000
MAX_MASK: Final = 2**32 - 1

YES_NO: Final = {"yes": True, "no": False}
YES_NO_TRUE_FALSE: Final = {**YES_NO, "true": True, "false": False}
YES_NO_TRUE_FALSE_1_0: Final = {**YES_NO_TRUE_FALSE, "1": True, "0": False}

_MASK = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_AFTER_TIME = re.compile(r"\d:\d\d(?::\d\d)?(.*)$")  # what follows an RFC 5322 time
_COMMENT = re.compile(r"\([^()]*\)")


class BadValue(Exception):
    """A header value is malformed; ``str(exc)`` says what is wrong."""


def flag(value: str, words: Mapping[str, bool]) -> bool:
    """Read a yes/no style value; ``words`` is the dialect's documented vocabulary."""
    word = value.strip().lower()
    if word in words:
        return words[word]
    raise BadValue(f"expected {_or_list(list(words))}, got {value.strip()!r}")


def text(value: str) -> str:
    """Free text such as a job name or tag, with RFC 2047 encoded words decoded.

    Mail libraries encode non-ASCII header values (a Chinese job name from the
    OMICard Python sample, say) as encoded words; the customer meant the text.
    """
    stripped = value.strip()
    if "=?" in stripped:
        try:
            stripped = str(make_header(decode_header(stripped))).strip()
        except (HeaderParseError, LookupError, UnicodeError) as exc:
            raise BadValue(f"malformed RFC 2047 encoded word: {exc}") from None
    if not stripped:
        raise BadValue("is empty")
    return stripped


def choice(value: str, allowed: tuple[str, ...]) -> str:
    """A case-insensitive keyword, returned lower-cased."""
    word = value.strip().lower()
    if word in allowed:
        return word
    raise BadValue(f"expected {_or_list(list(allowed))}, got {value.strip()!r}")


def http_url(value: str) -> str:
    """An absolute http(s) URL: Postlane will POST events to it from the server."""
    url = value.strip()
    problem = f"must be an absolute http or https URL, got {url!r}"
    if not url or any(ch.isspace() for ch in url):
        raise BadValue(problem)
    try:
        parts = urlsplit(url)  # ValueError for a bracketed host it cannot read
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise BadValue(problem) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise BadValue(problem)
    return url


def mask(value: str) -> int:
    """An OMICard option mask: an unsigned 32-bit integer, decimal or 0x hex."""
    raw = value.strip()
    if raw.startswith("-") and _MASK.fullmatch(raw[1:]):
        raise BadValue(f"must not be negative, got {raw}")
    if not _MASK.fullmatch(raw):
        raise BadValue(f"must be an unsigned integer (decimal or 0x hex), got {raw!r}")
    is_hex = raw[:2].lower() == "0x"
    digits = (raw[2:] if is_hex else raw).lstrip("0") or "0"
    # A bound on length first: int() refuses (or crawls through) huge digit strings.
    if len(digits) > 16:
        raise BadValue(f"is out of range (0 to {MAX_MASK}), got {raw[:24]}...")
    number = int(digits, 16 if is_hex else 10)
    if number > MAX_MASK:
        raise BadValue(f"is out of range (0 to {MAX_MASK}), got {raw}")
    return number


def when(value: str, tz: tzinfo, *, iso: bool = True) -> datetime:
    """A point in time as an aware UTC datetime.

    RFC 5322 dates are what mail software writes; ISO 8601 is what people and
    scripts write. A time without a zone is read in the account's zone ``tz``,
    because that is the clock the customer was looking at. A bare date is
    refused: midnight in which zone, start or end of the day, is a guess.
    """
    raw = value.strip()
    moment = _iso(raw) if iso else None
    if moment is None:
        try:
            moment = parsedate_to_datetime(raw)
        except OverflowError:
            raise BadValue(f"is out of range, got {raw!r}") from None
        except (ValueError, TypeError, IndexError):
            accepted = "an ISO 8601 or RFC 5322 date and time" if iso else "an RFC 5322 date"
            raise BadValue(f"expected {accepted}, got {raw!r}") from None
        if moment.tzinfo is None:
            moment = _rfc5322_zone(moment, raw)
    if moment.tzinfo is None:
        moment = _local(moment, tz, raw)
    try:
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):
        raise BadValue(f"is out of range, got {raw!r}") from None


def _rfc5322_zone(moment: datetime, raw: str) -> datetime:
    """The zone the email package could not read: -0000, nothing, or a mistake.

    ``parsedate_to_datetime`` returns a naive time both for a date written
    without a zone and for a zone word it does not know ("CET"), and RFC 5322
    would read the unknown word as -0000. A launch time hours away from what
    the customer meant is worse than a refusal, so only -0000 (UTC) and no
    zone at all (the account's zone) are taken.
    """
    found = _AFTER_TIME.search(raw)
    zone = _COMMENT.sub("", found.group(1)).strip() if found else ""
    if not zone:
        return moment
    if zone == "-0000":
        return moment.replace(tzinfo=UTC)  # RFC 5322 3.3: -0000 is UTC
    raise BadValue(f"unknown time zone {zone!r} in {raw!r}; give a numeric offset such as +0100")


def _local(moment: datetime, tz: tzinfo, raw: str) -> datetime:
    """``moment`` on the account's clock, refusing a time that clock skips or repeats."""
    early, late = moment.replace(tzinfo=tz), moment.replace(tzinfo=tz, fold=1)
    if early.utcoffset() == late.utcoffset():
        return early
    # The two readings differ only around a change of offset: if the time
    # survives a round trip through UTC it happened twice, otherwise never.
    repeated = early.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == moment
    what = "happens twice" if repeated else "does not exist"
    raise BadValue(
        f"{raw!r} {what} in the account's time zone {tz} (its clocks change then);"
        " write the time with its UTC offset"
    )


def _iso(raw: str) -> datetime | None:
    try:
        date.fromisoformat(raw)
    except ValueError:
        pass
    else:
        raise BadValue(
            f"a date without a time is ambiguous, got {raw!r}; give a date and time"
            " such as 2024-05-01T09:30:00+08:00"
        )
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return None


def json_object(value: str) -> dict[str, Any]:
    """A JSON object, with a problem text that points at the mistake."""
    raw = value.strip()
    if len(raw) > MAX_JSON_CHARS:
        raise BadValue(f"is longer than {MAX_JSON_CHARS} characters")
    try:
        parsed = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise BadValue(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:  # ours, or int()'s limit on a number's digits
        raise BadValue(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise BadValue(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(parsed, dict):
        raise BadValue(f"must be a JSON object, got {json_type(parsed)}")
    if _too_deep(parsed):
        raise BadValue(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return parsed


def recipient_variables(value: str) -> dict[str, Any]:
    """Address → object: each recipient's copy is personalised from its own object."""
    parsed = json_object(value)
    for address, variables in parsed.items():
        if not looks_like_address(address):
            raise BadValue(f"key {address!r} is not an email address")
        if not isinstance(variables, dict):
            raise BadValue(
                f"the value for {address!r} must be a JSON object, got {json_type(variables)}"
            )
    return parsed


def looks_like_address(key: str) -> bool:
    """Whether a recipient-variables key could match a recipient at all.

    Only the shape is checked: the address itself was validated at RCPT TO.
    """
    local, at, domain = key.rpartition("@")
    return bool(at and local and domain)


def json_type(value: object) -> str:
    """The JSON word for a value's type: problems speak JSON to the customer."""
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _finite(literal: str) -> float:
    # JSON has no infinity, but 1e400 parses to one, and nothing downstream
    # (the options model, the database's JSON) can hold it.
    number = float(literal)
    if math.isinf(number):
        raise _NotJson(f"{literal} is too large for a JSON number")
    return number


def _too_deep(value: object) -> bool:
    # Level by level rather than recursively: json.loads builds structures
    # nearly as deep as the interpreter's recursion limit.
    level = [value]
    depth = 0
    while level:
        containers = [node for node in level if isinstance(node, dict | list)]
        if not containers:
            return False
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return True
        level = [
            child
            for node in containers
            for child in (node.values() if isinstance(node, dict) else node)
        ]
    return False


def _or_list(words: list[str]) -> str:
    if len(words) <= 2:
        return " or ".join(words)
    return f"one of {', '.join(words)}"
