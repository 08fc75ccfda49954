"""Account templates rendered with Jinja2 in a sandbox.

A template's text comes from a customer (stored per account, named by
X-OV-Template or X-Mailgun-Template-Name), so it is untrusted code run inside
the delivery worker. It runs in Jinja's ImmutableSandboxedEnvironment, which
refuses access to internals (``''.__class__.__mro__``), unsafe callables,
huge ``range()`` and changing lists or dicts in place (one recipient's
rendering must not change the variables the next one sees; ``namespace()``
still works). On top of that this module:

- raises on every refused attribute, where Jinja would quietly render an
  empty string, so an escape attempt is reported rather than hidden;
- refuses ``*`` and ``**`` results big enough to exhaust memory;
- stops output beyond :data:`MAX_OUTPUT_CHARS`;
- stops a render after :data:`MAX_STEPS` loop iterations and calls, since
  loops that write nothing (``{% for i in range(99999) %}{% for j in
  range(99999) %}{% endfor %}{% endfor %}``) or a macro calling itself twice
  over would otherwise hold a delivery thread for hours. Every ``for`` loop's
  iterable is wrapped in a counter when the template is compiled (Jinja has
  no hook inside a loop), and the sandbox's ``call`` counts calls.

Missing variables render as empty, also along a path (``{{ user.name }}``
with no ``user``): Mailgun's and Omnivery's Handlebars templates behave so,
templates moved from them rely on it, and one recipient without an optional
field must not fail the whole send. StrictUndefined would be stricter than
what customers know.

Every failure, syntax or runtime, becomes InvalidInput("template 'NAME': line
N: what"), or "template 'NAME' (PART): ..." when the caller names which of a
stored template's sources (subject, html, text) it is; the delivery worker
records it as that recipient's failure.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Final, NoReturn

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from postlane.errors import InvalidInput

__all__ = ["MAX_OUTPUT_CHARS", "MAX_STEPS", "check_template", "render_template"]

MAX_OUTPUT_CHARS: Final = 10_000_000
"""More output than this is a runaway loop, not an email (providers cap at 25-50 MB)."""
MAX_STEPS: Final = 200_000
"""Loop iterations and calls in one render: under a second of work, far beyond any email."""

_MAX_POWER_BITS: Final = 100_000
_TEMPLATE_FILE: Final = "<template>"  # Jinja's file name for code compiled from a string
_COMPILED_CACHE: Final = 256


class _Steps(threading.local):
    """Loop iterations and calls of the render running on this thread."""

    taken = 0


_steps: Final = _Steps()
_COUNTED: Final = "__postlane_counted__"  # the global every for-loop's iterable goes through


def _step() -> None:
    _steps.taken += 1
    if _steps.taken > MAX_STEPS:
        raise SecurityError(f"the template ran more than {MAX_STEPS} loop iterations and calls")


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        _step()
        yield item


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with refusals that raise and a guard on repetition, powers and steps."""

    intercepted_binops = frozenset(("*", "**"))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Count every call a template makes (a macro, range(), a method), then make it."""
        _step()
        return super().call(context, obj, *args, **kwargs)

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        """Raise at once: Jinja would return an undefined value that prints as nothing."""
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed"
        )

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """``left <operator> right``, refused when the result would be enormous."""
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | bytes | list | tuple)
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_OUTPUT_CHARS
                ):
                    raise SecurityError("the repeated value would be too large")
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * left.bit_length() > _MAX_POWER_BITS
        ):
            raise SecurityError("the power would be too large")
        return super().call_binop(context, operator, left, right)


_ENVIRONMENTS: Final = {
    escaped: _Sandbox(autoescape=escaped, undefined=ChainableUndefined) for escaped in (True, False)
}
for _environment in _ENVIRONMENTS.values():
    _environment.globals[_COUNTED] = _counted


def render_template(
    source: str,
    variables: Mapping[str, Any],
    *,
    name: str = "template",
    html: bool = True,
    part: str | None = None,
) -> str:
    """``source`` rendered with ``variables``; ``name`` and ``part`` are for error messages.

    ``html`` turns autoescaping on, so a variable holding ``<b>`` shows as
    text in an HTML body; pass False for a text/plain body or a Subject,
    where escaping would show ``&amp;`` to the reader. Compiled templates are
    cached, since one template is rendered once for every recipient.
    """
    label = _label(name, part)
    template = _compiled(label, source, html)
    written = 0
    chunks: list[str] = []
    _steps.taken = 0
    try:
        for chunk in template.generate(dict(variables)):
            written += len(chunk)
            if written > MAX_OUTPUT_CHARS:
                raise InvalidInput(f"{label}: output is longer than {MAX_OUTPUT_CHARS} characters")
            chunks.append(chunk)
    except InvalidInput:
        raise
    except Exception as exc:
        # A template can fail in any way Python code can (a SecurityError, an
        # undefined call, 1/0, a TypeError); each is the template's fault and
        # fails this recipient, not the worker.
        raise InvalidInput(_runtime_problem(label, exc)) from None
    return "".join(chunks)


def check_template(name: str, source: str, html: bool, *, part: str | None = None) -> None:
    """Refuse ``source`` now if it cannot compile, so a stored template has no syntax errors.

    Storing is the moment the author is there to fix it; the same error at
    delivery would fail every recipient of a send. Runtime errors (a call on
    a missing value, 1/0) depend on the variables and can only be found then.
    """
    _compiled(_label(name, part), source, html)


def _label(name: str, part: str | None) -> str:
    """How errors name the template: ``template 'welcome'``, with the part if one is named
    (``template 'welcome' (html)``), since one template has up to three sources."""
    return f"template {name!r}" + (f" ({part})" if part else "")


def _compiled(label: str, source: str, html: bool) -> Template:
    try:
        return _compile(source, html)
    except TemplateSyntaxError as exc:
        raise InvalidInput(f"{label}: line {exc.lineno}: {exc.message}") from None


@functools.lru_cache(maxsize=_COMPILED_CACHE)
def _compile(source: str, html: bool) -> Template:
    environment = _ENVIRONMENTS[html]
    tree = environment.parse(source)
    for loop in tree.find_all(nodes.For):
        counted = nodes.Call(nodes.Name(_COUNTED, "load"), [loop.iter], [], None, None)
        loop.iter = counted.set_lineno(loop.lineno).set_environment(environment)
    return environment.from_string(tree)


def _runtime_problem(label: str, exc: Exception) -> str:
    """The error message, with the template line Jinja's traceback rewriting points at."""
    what = str(exc) or type(exc).__name__
    line = _template_line(exc.__traceback__)
    where = f"line {line}: " if line is not None else ""
    return f"{label}: {where}{what}"


def _template_line(tb: TracebackType | None) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
