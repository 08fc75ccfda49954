"""Account templates rendered with Jinja2 in a sandbox.

A template's text comes from a customer (stored per account, named by
X-OV-Template or X-Mailgun-Template-Name), so it is untrusted code run inside
the delivery worker. It runs in the sandbox of
:mod:`postlane.render.template_sandbox`, which refuses escapes and bounds what
a single value and a whole render may cost; this module stops output beyond
:data:`MAX_OUTPUT_CHARS`, keeps compiled templates (one is rendered once for
every recipient) and turns every failure into an error naming the template.

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
import types
from collections.abc import Mapping
from typing import Any, Final

from jinja2 import Template, TemplateSyntaxError

from postlane.errors import InvalidInput
from postlane.render.template_sandbox import (
    MAX_OUTPUT_CHARS,
    MAX_STEPS,
    MAX_WIDTH,
    Metering,
    end_render,
    environment,
    start_render,
)

__all__ = ["MAX_OUTPUT_CHARS", "MAX_STEPS", "MAX_WIDTH", "check_template", "render_template"]

_TEMPLATE_FILE: Final = "<template>"  # Jinja's file name for code compiled from a string
_COMPILED_CACHE: Final = 256
_ENVIRONMENTS: Final = {escaped: environment(escaped) for escaped in (True, False)}


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
    start_render()
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
    finally:
        end_render()
    return "".join(chunks)


def check_template(name: str, source: str, html: bool, *, part: str | None = None) -> None:
    """Refuse ``source`` now if it cannot compile, so a stored template has no syntax errors.

    Storing is the moment the author is there to fix it; the same error at
    delivery would fail every recipient of a send. Runtime errors (a call on
    a missing value, 1/0, a width over the limit) depend on the variables or
    are only found by running, which storing does not do.
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
    except RecursionError:  # Jinja's parser and compiler recurse once per level of nesting
        raise InvalidInput(f"{label}: the template is nested too deeply") from None


@functools.lru_cache(maxsize=_COMPILED_CACHE)
def _compile(source: str, html: bool) -> Template:
    environment = _ENVIRONMENTS[html]
    tree = environment.parse(source)
    Metering().visit(tree)
    tree.set_environment(environment)
    return environment.from_string(tree)


def _runtime_problem(label: str, exc: Exception) -> str:
    """The error message, with the template line Jinja's traceback rewriting points at."""
    what = str(exc) or type(exc).__name__
    line = _template_line(exc.__traceback__)
    where = f"line {line}: " if line is not None else ""
    return f"{label}: {where}{what}"


def _template_line(tb: types.TracebackType | None) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
