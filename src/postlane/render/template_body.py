"""A stored template in place of a message's body (X-OV-Template, X-Mailgun-Template-Name).

The template's sources are rendered in the sandbox (:mod:`postlane.render.templates`)
with the message's variables: X-OV-Template-Variables /
X-Mailgun-Template-Variables laid over X-OV-Variables / X-Mailgun-Variables,
so the values meant for this template win over general ones of the same name.

What the new message keeps of the stored one, and why:

- **Headers**: every one, in its place and as written, except MIME-Version
  and the Content-* fields, which describe the body being replaced. Subject
  is replaced only when the template has a subject; otherwise the sender's
  stands.
- **Attached files**: kept, after the new body in a multipart/mixed, in their
  order and byte for byte. A sender who attaches an invoice to a templated
  notice wants it to arrive, and the template cannot supply it. Attached
  messages (message/rfc822) count as files.
- **Nothing of the old body**: its text and HTML, and the inline images of a
  multipart/related HTML body, which only that HTML could show (by cid:).

The new body is text/plain, text/html, or multipart/alternative with both
(text first: RFC 2046 puts alternatives from plainest to richest), in UTF-8,
built with the helpers every render step uses (:mod:`postlane.render.content`).
"""

from __future__ import annotations

from collections.abc import Mapping
from email.message import EmailMessage, MIMEPart
from typing import Any

from postlane.options.model import SendOptions
from postlane.render.content import (
    POLICY,
    is_attachment,
    leaves,
    message_bytes,
    new_text_part,
    one_line,
    parse_message,
)
from postlane.render.templates import render_template
from postlane.store.templates import Template

__all__ = ["apply_template", "template_variables"]


def template_variables(options: SendOptions) -> dict[str, Any]:
    """The variables a template sees: template variables over general ones."""
    return {**options.variables, **options.template_variables}


def apply_template(message: bytes, template: Template, variables: Mapping[str, Any]) -> bytes:
    """``message`` with its body made by ``template`` rendered with ``variables``.

    Raises :class:`~postlane.errors.InvalidInput` naming the template, the
    part and the line when a source fails to render.
    """
    name = template.name
    text = html = subject = None
    if template.text is not None:
        text = render_template(template.text, variables, name=name, html=False, part="text")
    if template.html is not None:
        html = render_template(template.html, variables, name=name, html=True, part="html")
    if template.subject is not None:
        subject = render_template(
            template.subject, variables, name=name, html=False, part="subject"
        )
    stored = parse_message(message)
    body = _body(text, html)
    files = _attached_files(stored)
    if files:
        body = _multipart("mixed", [body, *files])
    result = EmailMessage(policy=POLICY)
    for field, value in stored.raw_items():
        if not _describes_body(field):
            result.set_raw(field, value)
    if subject is not None:
        _set_subject(result, subject)
    result["MIME-Version"] = "1.0"
    for field, value in body.raw_items():
        result.set_raw(field, value)
    result.set_payload(body.get_payload())
    return message_bytes(result)


def _body(text: str | None, html: str | None) -> MIMEPart:
    parts = [new_text_part(text, "plain")] if text is not None else []
    if html is not None:
        parts.append(new_text_part(html, "html"))
    if len(parts) == 1:
        return parts[0]
    return _multipart("alternative", parts)


def _multipart(subtype: str, parts: list[MIMEPart]) -> MIMEPart:
    container = MIMEPart(policy=POLICY)
    container["Content-Type"] = f"multipart/{subtype}"
    for part in parts:
        container.attach(part)
    return container


def _attached_files(stored: EmailMessage) -> list[MIMEPart]:
    """The stored message's attached files and messages, in document order."""
    files: list[MIMEPart] = []
    for part, parent in leaves(stored):
        if not (is_attachment(part, parent) or part.get_content_maintype() == "message"):
            continue
        if part is stored:
            # The whole stored message is one file: its top-level headers are
            # the message's, so only its Content-* fields go with the file.
            part = _content_only(stored)
        files.append(part)
    return files


def _content_only(stored: EmailMessage) -> MIMEPart:
    part = MIMEPart(policy=POLICY)
    for field, value in stored.raw_items():
        if field.lower().startswith("content-"):
            part.set_raw(field, value)
    part.set_payload(stored.get_payload())
    return part


def _describes_body(field: str) -> bool:
    lowered = field.lower()
    return lowered == "mime-version" or lowered.startswith("content-")


def _set_subject(message: EmailMessage, subject: str) -> None:
    """A variable may hold a line break; in a header it would start a new field."""
    subject = one_line(subject)
    if "Subject" in message:
        message.replace_header("Subject", subject)
    else:
        message["Subject"] = subject
