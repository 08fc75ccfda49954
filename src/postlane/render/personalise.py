"""Per-recipient placeholders, Mailgun and Omnivery style.

A batch send is one message for many recipients with a JSON object of
variables per recipient (X-Mailgun-Recipient-Variables,
X-OV-Recipient-Variables). Each recipient's copy has these placeholders
replaced, in the Subject and in the text/plain and text/html body parts:

- ``%recipient.KEY%``: that recipient's value for KEY;
- ``%recipient%`` and ``%recipient_email%``: the recipient's address. Mailgun
  uses both names in mailing-list sends, ``%recipient%`` there being the full
  ``Name <address>``; a batch send knows only the envelope address, so both
  give that.

A recipient missing from the variables, or a KEY missing from a recipient's
object, gives the empty string, as Mailgun does: a batch where one recipient
lacks an optional field must still reach everyone, and a visible
``%recipient.first%`` in a greeting is worse than none. Values that are not
strings are written as JSON (``true``, ``12``, ``["a","b"]``); null is empty.

As at Mailgun, placeholders are substituted only in a batch send, that is when
recipient variables were given; without them the message is returned as it
is, without being parsed. Attached files, attached messages and other headers
are never changed.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any, Final

from postlane.render.content import (
    body_text_parts,
    message_bytes,
    one_line,
    parse_message,
    read_text,
    write_text,
)

__all__ = ["substitute_recipient_variables"]

_MARK: Final = "%recipient"
# Keys are JSON object keys, so anything but the closing % and whitespace.
_PLACEHOLDER: Final = re.compile(r"%recipient(?:(?P<email>_email)|\.(?P<key>[^%\s]{1,256}))?%")


def substitute_recipient_variables(
    message: bytes, recipient: str, variables: Mapping[str, Mapping[str, Any]]
) -> bytes:
    """``message`` as ``recipient`` gets it, with its placeholders filled in.

    ``variables`` maps recipient addresses to their variables (SendOptions'
    ``recipient_variables``). Values inserted into text/html parts are
    HTML-escaped: a value is data, not markup, so ``Tom & Jerry`` must show
    as written and a value such as ``"><script>`` must not be able to break
    out of an attribute or add elements to the sender's page. (A value put
    into a URL is escaped for HTML, not percent-encoded: send URL-safe values.)
    Values put into the Subject have line breaks replaced by spaces, so no
    value can add a header field.

    Returns ``message`` itself when there is nothing to substitute.
    """
    if not variables:
        return message
    own = _variables_of(recipient, variables)
    tree = parse_message(message)
    changed = _substitute_subject(tree, recipient, own)
    for part in body_text_parts(tree):
        text = read_text(part)
        if _MARK not in text:
            continue
        escape = part.get_content_subtype() == "html"
        filled = _fill(text, recipient, own, escape=escape)
        if filled != text:
            write_text(part, filled)
            changed = True
    return message_bytes(tree) if changed else message


def _variables_of(recipient: str, variables: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
    """The recipient's own variables; addresses are matched ignoring case if not exactly.

    The envelope may spell an address in other case than the JSON (``Ann@X``
    against ``ann@x``); both name the same mailbox in practice.
    """
    own = variables.get(recipient)
    if own is not None:
        return own
    folded = recipient.casefold()
    for address, values in variables.items():
        if address.casefold() == folded:
            return values
    return {}


def _substitute_subject(tree: EmailMessage, recipient: str, own: Mapping[str, Any]) -> bool:
    subject = tree.get("Subject")
    if subject is None or _MARK not in str(subject):
        return False
    filled = one_line(_fill(str(subject), recipient, own, escape=False))
    if filled == str(subject):
        return False
    tree.replace_header("Subject", filled)
    return True


def _fill(text: str, recipient: str, own: Mapping[str, Any], *, escape: bool) -> str:
    def value(found: re.Match[str]) -> str:
        key = found.group("key")
        written = recipient if key is None else _as_text(own.get(key))
        return html.escape(written) if escape else written

    return _PLACEHOLDER.sub(value, text)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    """Frozen SendOptions data holds read-only mappings, which json cannot write as such."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"a {type(value).__name__} is not JSON data")
