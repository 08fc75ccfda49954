"""The Jinja2 sandbox account templates run in, bounded in what they cost.

A template's text comes from a customer, so it is untrusted code run inside
the delivery worker. It runs in Jinja's ImmutableSandboxedEnvironment, which
refuses access to internals (``''.__class__.__mro__``), unsafe callables,
huge ``range()`` and changing lists or dicts in place (one recipient's
rendering must not change the variables the next one sees; ``namespace()``
still works). The sandbox guards access, not size: a single filter, format or
method call could build gigabytes (``"x"|center(10**9)``, ``"%999999999s" %
x``) and a cheap-looking loop could run for hours. On top of it this module:

- raises on every refused attribute, where Jinja would quietly render an
  empty string, so an escape attempt is reported rather than hidden;
- checks, before it is built, every value whose size an argument multiplies:
  widths, fills and precisions (``center``, ``indent``, ``ljust``, ``%10s``,
  ``{:>10}``) above :data:`MAX_WIDTH` are refused, and ``*``, ``+``, ``~``,
  ``replace``, ``join``, ``wordwrap``, ``urlize``, ``tojson``, ``pprint``,
  ``expandtabs``, ``translate`` and ``to_bytes`` results over
  :data:`MAX_OUTPUT_CHARS` are refused before they exist; a value that only
  grows by a constant factor (escaping, ``upper``) is checked after;
- stops a list that repeats itself (``{% set a = [a, a] %}`` forty times)
  before it is printed, compared or hashed: its text, counting repeats, would
  not fit in memory;
- stops a render after :data:`MAX_STEPS` steps of work, so that what one
  recipient's copy can cost is bounded (see :data:`MAX_STEPS` for what a
  step is).

Nothing of a template runs when it is compiled: Jinja's optimizer (which
would run constant filter calls such as ``"x"|center(10**9)`` when the
template is stored, and keep the result in the compiled-template cache) is
off, and every filter, test and the output hook take the render context, which
Jinja takes as "cannot be evaluated at compile time".

Rendering, the output limit and error messages are
:mod:`postlane.render.templates`'s; it calls :func:`start_render` and
:func:`end_render` around each render, and runs :class:`Metering` over each
parsed template before compiling it.
"""

from __future__ import annotations

import codecs
import functools
import re
import textwrap
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from itertools import chain
from typing import Any, Final, NamedTuple, NoReturn

from jinja2 import ChainableUndefined, nodes
from jinja2.exceptions import FilterArgumentError, SecurityError
from jinja2.filters import (
    do_batch,
    do_indent,
    do_pprint,
    do_tojson,
    do_urlize,
    make_attrgetter,
    sync_do_join,
    sync_do_slice,
)
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, Macro, markup_join, str_join
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import (
    Namespace,
    _PassArg,
    generate_lorem_ipsum,
    pass_context,
    pass_environment,
    pass_eval_context,
)
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, escape, soft_str

__all__ = [
    "MAX_OUTPUT_CHARS",
    "MAX_STEPS",
    "MAX_WIDTH",
    "Metering",
    "end_render",
    "environment",
    "start_render",
]

MAX_OUTPUT_CHARS: Final = 10_000_000
"""More output than this is a runaway loop, not an email (providers cap at 25-50 MB).

No single value a template builds may be longer either: it could not be sent.
"""
MAX_STEPS: Final = 200_000
"""Steps of work in one render, so that one recipient's copy costs well under a second.

A step is worth a loop iteration, and is charged for: each run of a loop
body, macro or block (a step per 2 syntax nodes and per 100 characters of
literal text in it, at least one), each call, each 100 characters printed or
read or built by a filter, method, operator or format (fewer for filters
written in Python: a step per character for ``urlize`` and per 4, 8, 16 and
32 for ``wordwrap``, ``title``, ``urlencode``, ``striptags``/``wordcount``),
each item of a list or mapping a filter, comparison or ``in`` goes through
(two for ``pprint``), each ``%`` conversion and each ``format()`` field (two).
Values that grow with an argument are charged before they are built.

Measured: the templates of ``test_every_kind_of_step_is_bounded`` and
``test_work_that_writes_nothing_is_stopped`` (tests/unit/render/test_templates.py),
each rendered until it hit this limit and timed with ``time.perf_counter``
(best of 3, Python 3.11, one core of a Xeon development VM), took 0.32 s at
most (20 filters or 20 method calls per loop iteration; 1.6 µs a step),
0.30 s for ``format()`` fields with an attribute each, 0.18 s for attribute
paths and for ``map`` of a filter, 0.1 s for a
macro calling itself, 0.07 s for ``urlize`` and recursive loops, 0.06 s
for ``pprint``, 0.04 s for plain loops, long loop bodies and ``sort``.
Before steps were weighted, 200 of the 200,000 took 10 s. A 300-row order
table with filters and formats in each row takes about 11,000 steps.
"""
MAX_WIDTH: Final = 1_000
"""Widths, fills and precisions above this are refused: RFC 5322 caps a line at 998."""

_CHARS_PER_STEP: Final = 100
_NODES_PER_STEP: Final = 2
_MAX_POWER_BITS: Final = 100_000

# Filters the compiled template calls. A dot cannot be part of a filter name in
# template source; map("postlane.charge") can still reach them by name, which
# is harmless: each charges or checks, and a charge below one does nothing.
_CHARGE: Final = "postlane.charge"
_CONCAT: Final = "postlane.concat"
_SCAN: Final = "postlane.scan"
_SCAN_IN: Final = "postlane.scan_in"
_SLICE: Final = "postlane.slice"


class _Size(NamedTuple):
    """A value as its text or JSON would be, counting repeated parts each time."""

    items: int
    chars: int
    depth: int
    changing: bool  # holds a namespace(), whose attributes can still change


class _Render(threading.local):
    """The render running on this thread: its steps and the sizes of values it measured."""

    def __init__(self) -> None:
        self.taken = 0
        # id -> (value, size); the value is kept so that its id is not reused
        self.sizes: dict[int, tuple[object, _Size]] = {}


_render: Final = _Render()


def start_render() -> None:
    """Begin a render on this thread: no steps taken, no sizes known."""
    _render.taken = 0
    _render.sizes = {}


def end_render() -> None:
    """Let go of the sizes measured: they hold every list the template measured."""
    _render.sizes = {}


def _step(count: int = 1) -> None:
    if count <= 0:
        return
    _render.taken += count
    if _render.taken > MAX_STEPS:
        # A step is worth a loop iteration, so the message counts in those.
        raise SecurityError(
            f"the template's work came to more than {MAX_STEPS} loop iterations and calls"
        )


def _too_long(what: str) -> NoReturn:
    raise SecurityError(f"{what}: the result would be longer than {MAX_OUTPUT_CHARS} characters")


def _check_length(what: str, length: int) -> None:
    if length > MAX_OUTPUT_CHARS:
        _too_long(what)


def _check_width(what: str, width: object) -> None:
    if isinstance(width, int) and abs(width) > MAX_WIDTH:
        raise SecurityError(f"{what}: a width of {width} is over the limit of {MAX_WIDTH}")


# --- sizes of values ---------------------------------------------------------

_EMPTY: Final[dict[object, object]] = {}
_VIEWS: Final = (type(_EMPTY.keys()), type(_EMPTY.values()), type(_EMPTY.items()))
_CONTAINERS: Final = (list, tuple, dict, set, frozenset, range, Namespace, *_VIEWS)
_TEXTS: Final = (str, bytes, bytearray)
_SEQUENCES: Final = (*_TEXTS, list, tuple)


def _is_container(value: object) -> bool:
    # Concrete types only: measuring walks the value, and walking a loop
    # variable or a generator would consume it.
    return isinstance(value, _CONTAINERS)


def _children(value: object) -> Iterable[object]:
    if isinstance(value, dict):
        return chain(value.keys(), value.values())
    if isinstance(value, Namespace):
        attributes: dict[str, Any] = getattr(value, "_Namespace__attrs")  # noqa: B009
        return chain(attributes.keys(), attributes.values())
    if isinstance(value, range):
        return ()
    iterable: Iterable[object] = value  # type: ignore[assignment]
    return iterable


def _leaf(value: object) -> _Size:
    if isinstance(value, _TEXTS):
        return _Size(1, len(value) + 2, 0, changing=False)
    if isinstance(value, int):
        return _Size(1, value.bit_length() // 3 + 2, 0, changing=False)
    return _Size(1, 24, 0, changing=False)


def _too_big() -> NoReturn:
    raise SecurityError(
        f"a value is too large to use: more than {MAX_STEPS} items or"
        f" {MAX_OUTPUT_CHARS} characters, counting repeated parts"
    )


def _measure(value: object) -> _Size:
    """The size of a list, mapping or namespace, computed once per value and render.

    Parts that appear many times (``[a, a]``) are counted each time, as their
    text would have them; the walk itself visits each part once and stops at
    the limits, so measuring costs at most what it may charge.
    """
    known = _render.sizes.get(id(value))
    if known is not None:
        return known[1]
    local: dict[int, _Size] = {}  # sizes that may change: not kept past this call
    open_ids: set[int] = set()
    stack: list[tuple[object, bool]] = [(value, False)]
    visits = 0
    while stack:
        item, children_done = stack.pop()
        key = id(item)
        if not children_done:
            if key in _render.sizes or key in local or key in open_ids:
                continue
            visits += 1
            if visits > MAX_STEPS:
                _too_big()
            open_ids.add(key)
            stack.append((item, True))
            stack.extend((child, False) for child in _children(item) if _is_container(child))
            continue
        open_ids.discard(key)
        items, chars, depth, changing = 1, 2, 0, isinstance(item, Namespace)
        if isinstance(item, range):
            items += len(item)
        for child in _children(item):
            size = _known_size(child, local, open_ids)
            items += size.items
            chars += size.chars + 2
            depth = max(depth, size.depth)
            changing = changing or size.changing
        if items > MAX_STEPS or chars > MAX_OUTPUT_CHARS:
            _too_big()
        size = _Size(items, chars, depth + 1, changing)
        if changing:
            local[key] = size
        else:
            _render.sizes[key] = (item, size)
    if id(value) in local:
        return local[id(value)]
    return _render.sizes[id(value)][1]


def _known_size(child: object, local: Mapping[int, _Size], open_ids: AbstractSet[int]) -> _Size:
    if not _is_container(child):
        return _leaf(child)
    key = id(child)
    if key in open_ids:  # a namespace holding itself: its repr prints "..."
        return _Size(1, 8, 0, changing=True)
    if key in local:
        return local[key]
    return _render.sizes[key][1]


def _text_size(value: object) -> int:
    """About how long ``str(value)`` is, without making it."""
    if isinstance(value, _TEXTS):
        return len(value)
    if _is_container(value):
        return _measure(value).chars
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, float):
        return 330  # "%f" of 1e308
    return 100


def _charge(value: object, chars_per_step: int = _CHARS_PER_STEP, item_steps: int = 1) -> None:
    """Charge the work of reading ``value``: its characters, or its items and their text."""
    if isinstance(value, _TEXTS):
        _step(len(value) // chars_per_step)
    elif _is_container(value):
        size = _measure(value)
        _step(size.items * item_steps + size.chars // _CHARS_PER_STEP)


def _prepay(kind: object, size: int) -> None:
    """Charge a text of ``size`` characters, or a list of ``size`` items, before it is built."""
    _step(size // _CHARS_PER_STEP if isinstance(kind, _TEXTS) else size)


def _charge_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Charge what a call reads of its arguments; ``f(*items)`` passes every item."""
    _step((len(args) + len(kwargs)) // 10)
    for argument in chain(args, kwargs.values()):
        _charge(argument)


def _charge_result(what: str, result: object) -> None:
    """Charge a value that was built; texts longer than the output may be are refused."""
    if isinstance(result, _TEXTS):
        _check_length(what, len(result))
        _step(len(result) // _CHARS_PER_STEP)
    elif isinstance(result, list | tuple | dict | set | frozenset):
        _step(len(result))


# --- formatting -------------------------------------------------------------


_DIGITS: Final = re.compile(r"\d+")  # Unicode digits, as Python's format spec parser reads them


def _check_format_spec(spec: str) -> None:
    """Refuse a ``str.format`` field whose width or precision is over :data:`MAX_WIDTH`.

    Every number in a format spec is a width or a precision (a digit fill
    character is one digit), so checking each run of digits is enough.
    """
    for digits in _DIGITS.finditer(spec):
        _check_format_number(digits.group())


def _percent_number(
    text: str, index: int, positional: tuple[Any, ...], used: int
) -> tuple[int, int, int]:
    """A ``%`` width or precision at ``text[index]``: (value, index after it, arguments used)."""
    if index < len(text) and text[index] == "*":
        number = positional[used] if used < len(positional) else 0
        value = number if isinstance(number, int) else 0
        _check_format_number(str(value))
        return value, index + 1, used + 1
    end = index
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    digits = text[index:end]
    _check_format_number(digits)
    return (int(digits) if digits else 0), end, used


def _check_format_number(digits: str) -> None:
    digits = digits.lstrip("-")
    if len(digits) > 9 or (digits and int(digits) > MAX_WIDTH):
        raise SecurityError(
            f"format: a width or precision of {digits} is over the limit of {MAX_WIDTH}"
        )


def _percent_growth(text: str, values: object) -> int:
    """How many characters the conversions of ``text % values`` can add, widths checked.

    Mirrors CPython's parser: ``%``, an optional ``(key)`` (parentheses may
    nest), flags, width, ``.precision`` (either may be ``*``, taken from the
    arguments), a length modifier and the conversion character.
    """
    positional = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, Mapping) else None
    used = 0
    growth = 0
    index = text.find("%")
    while index >= 0:
        index += 1
        key = None
        if index < len(text) and text[index] == "(":
            depth, start = 1, index + 1
            index += 1
            while index < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[index], 0)
                index += 1
            key = text[start : index - 1]
        while index < len(text) and text[index] in "-+ #0":
            index += 1
        width, index, used = _percent_number(text, index, positional, used)
        precision = 0
        if index < len(text) and text[index] == ".":
            precision, index, used = _percent_number(text, index + 1, positional, used)
        if index < len(text) and text[index] in "hlL":
            index += 1
        if index >= len(text):
            break
        conversion = text[index]
        index += 1
        if conversion != "%":
            if key is not None and mapping is not None:
                value = mapping.get(key)
            else:
                value = positional[used] if used < len(positional) else None
                used += 1
            size = _text_size(value) * (10 if conversion in "ra" else 1)
            growth += abs(width) + precision + size
        index = text.find("%", index)
    return growth


def _percent(template: str | bytes, values: object) -> Any:
    """``template % values``, refused when a width is too wide or the result too long."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    _step(text.count("%"))  # each is parsed here in Python
    _check_length("format", len(text) + _percent_growth(text, values))
    return template % values


class _BoundedFormatting(SandboxedFormatter):
    """``str.format`` with each field's width checked and the result's length kept."""

    written = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self.written = 0
        return super().vformat(format_string, args, kwargs)

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        """The field's value, measured before ``{}`` or ``!r`` turns a list into text."""
        value, first = super().get_field(field_name, args, kwargs)
        _charge(value)
        return value, first

    def format_field(self, value: Any, format_spec: str) -> Any:
        """A field, its width checked first; two steps for the Python that handles it."""
        _step(2)
        _check_format_spec(format_spec)
        text = super().format_field(value, format_spec)
        self.written += len(text)
        _check_length("format", self.written)
        return text


class _BoundedFormatter(_BoundedFormatting):
    pass


class _BoundedEscapeFormatter(_BoundedFormatting, SandboxedEscapeFormatter):
    pass


# --- filters and globals that an argument can make huge ----------------------


def _center(value: Any, width: int = 80) -> str:
    """Jinja's ``center``: the width is the size of the result, so it is bounded."""
    _check_width("center", width)
    return soft_str(value).center(width)


_LINE_BREAKS: Final = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what splitlines() splits at


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    """Jinja's ``indent``: the indent is repeated on every line, so the total is checked."""
    if isinstance(width, str):
        indention = len(width)
    else:
        _check_width("indent", width)
        indention = width if isinstance(width, int) else 0
    if isinstance(s, str):
        lines = sum(s.count(char) for char in _LINE_BREAKS) + 2
        _step(lines)  # Jinja indents line by line in Python
        _check_length("indent", len(s) + max(indention, 0) * lines)
    return do_indent(s, width, first, blank)


@pass_environment
def _wordwrap(
    environment: Any,
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    """Jinja's ``wordwrap``, with the joined size known before it is joined.

    A width of 1 makes a line of each character, and ``wrapstring`` is put
    between every two of them. One wrapper serves every line, where Jinja
    makes one per line.
    """
    if wrapstring is None:
        wrapstring = environment.newline_sequence
    wrapper = textwrap.TextWrapper(
        width=width,
        expand_tabs=False,
        replace_whitespace=False,
        break_long_words=break_long_words,
        break_on_hyphens=break_on_hyphens,
    )
    given = s.splitlines()
    _step(len(given))  # each line is wrapped on its own, in Python
    paragraphs = [wrapper.wrap(line) for line in given]
    lines = sum(len(paragraph) for paragraph in paragraphs) + len(paragraphs)
    chars = sum(len(line) for paragraph in paragraphs for line in paragraph)
    _check_length("wordwrap", chars + lines * len(soft_str(wrapstring)))
    return wrapstring.join([wrapstring.join(paragraph) for paragraph in paragraphs])


def _check_replace(what: str, text: Any, old: Any, new: Any, count: Any) -> None:
    kinds = (str,) if isinstance(text, str) else (bytes, bytearray)
    if not isinstance(old, kinds) or not isinstance(new, kinds):
        return  # Python refuses the types
    growth = len(new) - len(old)
    if growth <= 0:
        return
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    _check_length(what, len(text) + growth * found)


@pass_eval_context
def _replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    """Jinja's ``replace``, with the size checked on the strings it would use."""
    if count is None:
        count = -1
    if not eval_ctx.autoescape:
        text, old, new = str(s), str(old), str(new)
    else:
        if hasattr(old, "__html__") or (hasattr(new, "__html__") and not hasattr(s, "__html__")):
            text = escape(s)
        else:
            text = soft_str(s)
        old, new = soft_str(old), soft_str(new)
        if isinstance(text, Markup):  # Markup.replace escapes its arguments
            old, new = escape(old), escape(new)
    _check_replace("replace", text, old, new, count)
    return text.replace(old, new, count)


@pass_eval_context
def _join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    """Jinja's ``join``: the separator is repeated between every two items, so it is counted."""
    if attribute is not None:
        value = map(make_attrgetter(eval_ctx.environment, attribute), value)
    items = list(value)
    chars = sum(_text_size(item) for item in items)
    _check_length("join", chars + len(soft_str(d)) * max(len(items) - 1, 0))
    return sync_do_join(eval_ctx, items, d)


def _format(value: Any, *args: Any, **kwargs: Any) -> Any:
    """Jinja's ``format`` filter, which is ``%`` and gets its checks."""
    if args and kwargs:
        raise FilterArgumentError("can't handle positional and keyword arguments at the same time")
    return _percent(soft_str(value), kwargs or args)


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None and isinstance(linecount, int):
        _step(linecount)  # the last batch is filled up to linecount items
    return do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if isinstance(slices, int):
        _step(slices)  # one list for each slice, even from an empty value
    return sync_do_slice(value, slices, fill_with)


@pass_eval_context
def _urlize(
    eval_ctx: EvalContext,
    value: Any,
    trim_url_limit: int | None = None,
    nofollow: bool = False,
    target: str | None = None,
    rel: str | None = None,
    extra_schemes: Iterable[str] | None = None,
) -> str:
    """Jinja's ``urlize``, refused when ``target`` and ``rel`` repeated on every link are too long.

    A link is a word with a dot, an ``@`` or a colon, so counting those
    characters counts at least the links.
    """
    text = soft_str(value)
    links = text.count(".") + text.count("@") + text.count(":")
    attributes = len(soft_str(target or "")) + len(soft_str(rel or "")) + 64
    _check_length("urlize", len(text) + links * attributes)
    return do_urlize(eval_ctx, value, trim_url_limit, nofollow, target, rel, extra_schemes)


def _nested(what: str, value: Any, indent: int) -> None:
    """Refuse when indenting every line by its depth would make the text too long."""
    if _is_container(value):
        size = _measure(value)
        _check_length(what, size.chars + size.items * size.depth * indent)


@pass_eval_context
def _tojson(eval_ctx: EvalContext, value: Any, indent: int | str | None = None) -> Markup:
    """Jinja's ``tojson``: an indent is repeated per level on every line."""
    width = len(indent) if isinstance(indent, str) else indent or 0
    _check_width("tojson", width)
    _nested("tojson", value, width)
    return do_tojson(eval_ctx, value, indent)  # type: ignore[arg-type]


def _pprint(value: Any) -> str:
    """Jinja's ``pprint``, which indents nested lines by their depth."""
    _nested("pprint", value, 1)
    return do_pprint(value)


@pass_environment
def _sum(environment: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
    """Jinja's ``sum``; lists and tuples are joined in one go.

    Python adds them pairwise, copying the growing result each time, so a
    few thousand lists took as many times their total length.
    """
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    values = list(iterable)
    for kind in (list, tuple):
        if isinstance(start, kind) and all(isinstance(value, kind) for value in values):
            _step(len(start) + sum(len(value) for value in values))
            return kind(chain(start, *values))
    return sum(values, start)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """Jinja's ``lipsum``, charged a step per word it may write before writing any."""
    if isinstance(n, int) and isinstance(max, int):
        _step(n * max)
    return generate_lorem_ipsum(n, html, min, max)


_REPLACED_FILTERS: Final[dict[str, Callable[..., Any]]] = {
    "batch": _batch,
    "center": _center,
    "format": _format,
    "indent": _indent,
    "join": _join,
    "pprint": _pprint,
    "replace": _replace,
    "slice": _slice,
    "sum": _sum,
    "tojson": _tojson,
    "urlize": _urlize,
    "wordwrap": _wordwrap,
}

# What reading a filter's first argument costs, as characters per step when it
# is text. Measured on a 1 MB text: filters working in Python cost 27-690 ns a
# character, the others 0.1-8 ns. Filters that go through text item by item
# cost a step per character, as they do per list item.
_FREE_FILTERS: Final = frozenset(
    {"abs", "attr", "count", "d", "default", "filesizeformat", "first", "last", "length"}
    | {"random", "round"}
)
_ITEM_FILTERS: Final = frozenset(
    {"batch", "dictsort", "groupby", "items", "join", "list", "map", "max", "min", "reject"}
    | {"rejectattr", "select", "selectattr", "slice", "sort", "sum", "unique", "xmlattr"}
)
_SLOW_TEXT_FILTERS: Final[dict[str, int]] = {
    "striptags": 32,
    "title": 8,
    "urlencode": 16,
    "urlize": 1,
    "wordcount": 32,
    "wordwrap": 4,
}
_COMPARING_TESTS: Final = frozenset(
    {"!=", "<", "<=", "==", ">", ">=", "eq", "equalto", "ge", "greaterthan", "gt", "in", "le"}
    | {"lessthan", "lower", "lt", "ne", "upper"}
)


def _delegate(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` called from a context-taking wrapper with what it asked Jinja for."""
    pass_arg = _PassArg.from_obj(function)

    def call(context: Context, *args: Any, **kwargs: Any) -> Any:
        if pass_arg is _PassArg.context:
            return function(context, *args, **kwargs)
        if pass_arg is _PassArg.eval_context:
            return function(context.eval_ctx, *args, **kwargs)
        if pass_arg is _PassArg.environment:
            return function(context.environment, *args, **kwargs)
        return function(*args, **kwargs)

    return call


def _metered_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` as a filter that charges what it reads and builds.

    Taking the context also keeps Jinja from calling it at compile time.
    """
    call = _delegate(function)
    if name in _FREE_FILTERS:
        return pass_context(functools.wraps(function)(call))
    chars_per_step = 1 if name in _ITEM_FILTERS else _SLOW_TEXT_FILTERS.get(name, _CHARS_PER_STEP)
    item_steps = 2 if name == "pprint" else 1

    @functools.wraps(function)
    def metered(context: Context, value: Any = None, /, *args: Any, **kwargs: Any) -> Any:
        _charge(value, chars_per_step, item_steps)
        _charge_arguments(args, kwargs)
        result = call(context, value, *args, **kwargs)
        _charge_result(name, result)
        return result

    return pass_context(metered)


def _metered_test(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    call = _delegate(function)
    if name not in _COMPARING_TESTS:
        return pass_context(functools.wraps(function)(call))

    @functools.wraps(function)
    def metered(context: Context, *args: Any, **kwargs: Any) -> Any:
        _charge_arguments(args, kwargs)
        return call(context, *args, **kwargs)

    return pass_context(metered)


# --- the hooks the compiled template calls ------------------------------------


@pass_context
def _charge_steps(context: Context, steps: int) -> bool:
    """A loop body's or macro's cost, charged each time it runs; true, to go in a loop test."""
    _step(steps)
    return True


@pass_context
def _concat(context: Context, *values: Any) -> str:
    """``a ~ b``, measured before it is joined."""
    for value in values:
        _charge(value)
    _check_length("~", sum(_text_size(value) for value in values))
    result = (markup_join if context.eval_ctx.autoescape else str_join)(values)
    _charge_result("~", result)
    return result


@pass_context
def _scan(context: Context, value: Any) -> Any:
    """A compared value, charged for the comparison going through it."""
    _charge(value)
    return value


@pass_context
def _scan_in(context: Context, value: Any) -> Any:
    """The right side of ``in``: a mapping or set looks up, anything else is searched."""
    if not isinstance(value, Mapping | AbstractSet | range):
        _charge(value)
    return value


@pass_context
def _slice_of(context: Context, value: Any, start: Any, stop: Any, step: Any) -> Any:
    """``value[start:stop:step]``, a copy, charged as one; Jinja slices without the sandbox."""
    result = value[start:stop:step]
    _charge_result("a slice", result)
    return result


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    """Every printed value, charged, a list measured before Jinja turns it into text.

    Output inside ``{% set %}...{% endset %}``, a macro or a ``{% filter %}``
    block goes to a buffer that is joined at its end, out of reach of the
    output limit, so printing must be paid for as it happens.
    """
    _charge(value)
    return value


# --- methods a template calls -------------------------------------------------

_WIDTH_METHODS: Final = frozenset({"center", "ljust", "rjust", "zfill"})
# Characters per step of text methods slower than a copy: splitting makes an
# object per part, translate looks each character up in a dict.
_SLOW_METHODS: Final[dict[str, int]] = {"split": 1, "rsplit": 1, "splitlines": 1, "translate": 16}
# Codecs written in Python whose time grows with the square of the text.
_SLOW_CODECS: Final = frozenset({"idna", "punycode"})


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _check_method(obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Charge a method of a text, list or number; refuse one an argument would make huge.

    Returns the arguments to call it with (``join`` gets its items as a list,
    so they can be measured first).
    """
    owner: Any = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, _TEXTS):
        _step(len(owner) // _SLOW_METHODS.get(name, _CHARS_PER_STEP))
        what = f"{name}()"
        if name in _WIDTH_METHODS:
            _check_width(what, _argument(args, kwargs, 0, "width"))
        elif name == "expandtabs":
            size = _argument(args, kwargs, 0, "tabsize")
            size = 8 if size is None else size
            _check_width(what, size)
            if isinstance(size, int):
                tab: Any = "\t" if isinstance(owner, str) else b"\t"
                tabs = owner.count(tab)
                _check_length(what, len(owner) + tabs * size)
        elif name == "replace":
            count = _argument(args, kwargs, 2, "count")
            old, new = _argument(args, kwargs, 0, "old"), _argument(args, kwargs, 1, "new")
            _check_replace(what, owner, old, new, -1 if count is None else count)
        elif name == "translate" and isinstance(table := _argument(args, kwargs, 0, ""), Mapping):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            _check_length(what, len(owner) * longest)
        elif name in ("encode", "decode"):
            encoding = _argument(args, kwargs, 0, "encoding") or "utf-8"
            if isinstance(encoding, str) and codecs.lookup(encoding).name in _SLOW_CODECS:
                raise SecurityError(f"{what}: the {encoding!r} codec is not allowed in templates")
        elif name == "join" and args:
            items = list(args[0])
            _step(len(items))
            chars = sum(len(item) for item in items if isinstance(item, _TEXTS))
            _check_length(what, chars + len(owner) * max(len(items) - 1, 0))
            return (items, *args[1:])
    elif isinstance(owner, int) and name == "to_bytes":
        length = _argument(args, kwargs, 0, "length")
        if isinstance(length, int):
            _check_length("to_bytes()", length)
    elif isinstance(owner, list | tuple) and name in {"index", "count"}:
        _charge(owner)
    _charge_arguments(args, kwargs)
    return args


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with refusals that raise and the checks and charges described above."""

    intercepted_binops = frozenset(("*", "**", "%", "+"))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Count every call a template makes (a macro, range(), a method), then make it."""
        _step()
        if isinstance(obj, Macro):  # its body is charged as it runs
            _step((len(args) + len(kwargs)) // 10)
        else:
            args = _check_method(obj, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        _charge_result(f"{getattr(obj, '__name__', type(obj).__name__)}()", result)
        return result

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        """Raise at once: Jinja would return an undefined value that prints as nothing."""
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed"
        )

    def getitem(self, obj: Any, argument: Any) -> Any:
        """``obj[argument]``, charged for hashing a tuple key (slices go to :func:`_slice_of`)."""
        _charge(argument)
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """``left <operator> right``, refused when the result would be enormous."""
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, _SEQUENCES) and isinstance(count, int):
                    size = len(sequence) * max(count, 0)
                    if size > MAX_OUTPUT_CHARS:
                        raise SecurityError("the repeated value would be too large")
                    _prepay(sequence, size)
                    return super().call_binop(context, operator, left, right)
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > _MAX_POWER_BITS
            ):
                raise SecurityError("the product would be too large")
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * left.bit_length() > _MAX_POWER_BITS
        ):
            raise SecurityError("the power would be too large")
        elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _check_length("+", len(left) + len(right))
            _prepay(left, len(left) + len(right))
            return super().call_binop(context, operator, left, right)
        elif operator == "%" and isinstance(left, str | bytes):
            _charge(right)
            result = _percent(left, right)
            _charge_result("%", result)
            return result
        result = super().call_binop(context, operator, left, right)
        _charge_result(operator, result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's sandboxed ``str.format``/``format_map``, with widths and length checked."""
        if not isinstance(
            value, types.MethodType | types.BuiltinMethodType
        ) or value.__name__ not in ("format", "format_map"):
            return None
        owner: Any = value.__self__
        if not isinstance(owner, str):
            return None
        formatter: _BoundedFormatting
        if isinstance(owner, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = _BoundedFormatter(self)
        text_type = type(owner)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            _step(len(owner) // _CHARS_PER_STEP)
            return text_type(formatter.vformat(owner, args, kwargs))

        return functools.update_wrapper(wrapper, value)


def environment(escaped: bool) -> _Sandbox:
    """A sandbox; ``optimized=False`` stops Jinja folding constant expressions when compiling.

    Missing values render as empty (ChainableUndefined); :mod:`postlane.render.templates`
    says why.
    """
    sandbox = _Sandbox(
        autoescape=escaped, undefined=ChainableUndefined, optimized=False, finalize=_finalize
    )
    sandbox.filters = {
        name: _metered_filter(name, _REPLACED_FILTERS.get(name, function))
        for name, function in sandbox.filters.items()
    }
    sandbox.filters.update(
        {
            _CHARGE: _charge_steps,
            _CONCAT: _concat,
            _SCAN: _scan,
            _SCAN_IN: _scan_in,
            _SLICE: _slice_of,
        }
    )
    tests: Mapping[str, Any] = sandbox.tests
    sandbox.tests = {name: _metered_test(name, function) for name, function in tests.items()}
    sandbox.globals["lipsum"] = _lipsum
    return sandbox


# --- compiling ------------------------------------------------------------------


def _hook(name: str, node: nodes.Expr, *args: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, list(args), [], None, None, lineno=node.lineno)


def _charge_node(steps: int, lineno: int) -> nodes.Filter:
    return _hook(_CHARGE, nodes.Const(steps, lineno=lineno))


def _weight(parts: Iterable[nodes.Node]) -> int:
    """Steps one run of these statements costs: one per 2 syntax nodes and 100 characters of
    literal text in them, at least one."""
    count = chars = 0
    for part in parts:
        for node in chain([part], part.find_all(nodes.Node)):
            count += 1
            if isinstance(node, nodes.TemplateData):
                chars += len(node.data)
    return max(1, count // _NODES_PER_STEP + chars // _CHARS_PER_STEP)


class Metering(NodeTransformer):
    """Rewrites a parsed template so that its repeated and sized work is charged.

    Jinja has no hook inside a loop, a macro or the ``~`` and comparison
    operators, so calls to the internal filters are put there.
    """

    def visit_For(self, node: nodes.For) -> nodes.Node:
        body, test = _weight(node.body), _weight([node.test]) if node.test else 0
        self.generic_visit(node)
        # The test runs for every item, the body for those that pass; a
        # recursive loop runs this same body again for each level.
        node.body.insert(0, nodes.ExprStmt(_charge_node(body, node.lineno), lineno=node.lineno))
        if node.test is not None:
            charged = _charge_node(test, node.lineno)
            node.test = nodes.And(charged, node.test, lineno=node.lineno)
        return node

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        return self._charge_body(node)

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        return self._charge_body(node)

    def visit_Block(self, node: nodes.Block) -> nodes.Node:
        """A block runs again for each ``self.name()`` call, like a macro."""
        return self._charge_body(node)

    def _charge_body(self, node: nodes.Macro | nodes.CallBlock | nodes.Block) -> nodes.Node:
        weight = _weight(node.body)
        self.generic_visit(node)
        node.body.insert(0, nodes.ExprStmt(_charge_node(weight, node.lineno), lineno=node.lineno))
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        first, *rest = node.nodes
        return _hook(_CONCAT, first, *rest)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        self.generic_visit(node)
        node.expr = _hook(_SCAN, node.expr)
        for operand in node.ops:
            operand.expr = _hook(_SCAN_IN if operand.op in ("in", "notin") else _SCAN, operand.expr)
        return node

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        self.generic_visit(node)
        if not isinstance(node.arg, nodes.Slice):
            return node
        bounds = [
            nodes.Const(None, lineno=node.lineno) if bound is None else bound
            for bound in (node.arg.start, node.arg.stop, node.arg.step)
        ]
        return _hook(_SLICE, node.node, *bounds)

    def visit_Pair(self, node: nodes.Pair) -> nodes.Node:
        """A dict literal's key is hashed; a constant one is as long as the source allows."""
        self.generic_visit(node)
        if not isinstance(node.key, nodes.Const):
            node.key = _hook(_SCAN, node.key)
        return node
