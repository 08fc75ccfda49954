"""One recipient's copy of a stored message: every render step, in order, DKIM last.

The delivery worker calls :func:`compose` once per recipient; it is pure (no
clock but DKIM's ``t=``, no I/O), so the order of the steps and what each one
sees is tested on bytes alone. The order is the one :mod:`postlane.render`
and the design lay down, and each step's reason for its place:

1. **Template** (``options.template``): the account's stored template,
   rendered with the message's variables, replaces the body (and the Subject
   when it has one; :mod:`postlane.render.template_body` says what is kept).
   It comes before anything that reads or changes the body, so the content
   options and recipient variables act on what the template made. A message
   naming a template the account does not have, or whose template fails to
   render, fails *that recipient* with the reason, rather than leaving
   without the content the sender wanted.
2. **Content options** (html-to-text, UTF-8, receipts, ...): per message, not
   per recipient; text is re-encoded before recipient values are put into it.
3. **Recipient variables**: fill ``%recipient.KEY%`` into Subject and body.
4. **To/Cc view**: each copy of a multi-recipient message shows its own To.
   Applied only when the message went to more than one envelope recipient or
   its To does not name this recipient; a one-recipient message addressed to
   that recipient keeps its To and Cc as the sender wrote them. Bcc and
   Resent-Bcc never leave, on either path.
5. **Attachment policy** of the account (zip, unzip or off).
6. **DKIM**: last, because any byte changed after it breaks the signature.

The VERP return path is the envelope MAIL FROM only: ``Return-Path`` is a
header the *receiving* server adds at final delivery (RFC 5321 §4.4), so no
step writes one.
"""

from __future__ import annotations

import email.policy
from collections.abc import Sequence
from email.errors import HeaderParseError
from email.headerregistry import AddressHeader
from typing import Final

from postlane.errors import InvalidInput
from postlane.intake.headers import Field
from postlane.options.model import SendOptions
from postlane.render.attachments import apply_attachment_policy
from postlane.render.content import apply_content_options, header_section
from postlane.render.dkim import DkimKey, Unsigned, prepare
from postlane.render.personalise import substitute_recipient_variables
from postlane.render.recipients_view import view_for, without_bcc
from postlane.render.template_body import apply_template, template_variables
from postlane.store.accounts import Account
from postlane.store.templates import Template

__all__ = ["compose", "compose_unsigned"]


def compose(
    raw: bytes,
    *,
    recipient: str,
    options: SendOptions,
    account: Account,
    dkim_keys: Sequence[DkimKey],
    recipients_in_message: int,
    template: Template | None = None,
    attachment_password: str | None = None,
    timestamp: int | None = None,
) -> bytes:
    """The bytes that leave for ``recipient``: ``raw`` rendered and DKIM-signed.

    ``template`` is the account's template named by ``options.template``,
    loaded by the caller (None when the account has none of that name; not
    read when the options name none). ``attachment_password`` is the
    account's archive password, decrypted by the caller (this module holds no
    keys). ``timestamp`` is DKIM's ``t=`` (now when None). Raises
    :class:`InvalidInput` when the copy cannot be made (the named template
    does not exist or fails to render, the stored message is malformed, no
    DKIM key): the caller fails this recipient with the message's text.
    """
    unsigned = compose_unsigned(
        raw,
        recipient=recipient,
        options=options,
        account=account,
        dkim_keys=dkim_keys,
        recipients_in_message=recipients_in_message,
        template=template,
        attachment_password=attachment_password,
        timestamp=timestamp,
    )
    return unsigned.finish(unsigned.sign_all())


def compose_unsigned(
    raw: bytes,
    *,
    recipient: str,
    options: SendOptions,
    account: Account,
    dkim_keys: Sequence[DkimKey],
    recipients_in_message: int,
    template: Template | None = None,
    attachment_password: str | None = None,
    timestamp: int | None = None,
) -> Unsigned:
    """:func:`compose` up to the private-key operations, which the caller runs where it likes.

    Same arguments and errors as :func:`compose`; its result is
    ``unsigned.finish(unsigned.sign_all())``.
    """
    if not dkim_keys:
        raise InvalidInput("no DKIM key to sign with: the sending domain has none")
    message = raw
    if options.template is not None:
        if template is None:
            raise InvalidInput(f"template {options.template!r} does not exist for this account")
        message = apply_template(message, template, template_variables(options))
    message = apply_content_options(message, options)
    message = substitute_recipient_variables(message, recipient, options.recipient_variables)
    section = None if recipients_in_message > 1 else header_section(message)
    if section is None or not _to_names_only(section.fields, recipient):
        message = view_for(message, recipient, keep_to=options.keep_to, keep_cc=options.keep_cc)
    else:
        # To and Cc stay as written, but a Bcc here would show the recipient
        # who else was sent the message (and be signed below): it goes too.
        message = without_bcc(message, section)
    message = apply_attachment_policy(
        message,
        account.attachment_policy,
        archive_name=account.attachment_archive_name,
        password=attachment_password,
    )
    return prepare(message, dkim_keys, timestamp=timestamp)


def _to_names_only(fields: Sequence[Field], recipient: str) -> bool:
    """Whether ``fields`` hold one To field, naming exactly ``recipient`` and nobody else."""
    to_fields = [f for f in fields if f.name.lower() == "to"]
    if len(to_fields) != 1:
        return False
    simple = _simple_address(to_fields[0].value)
    if simple is not None:
        return simple.casefold() == recipient.casefold()
    try:
        header = email.policy.SMTP.header_factory(to_fields[0].name, to_fields[0].value)
    except (HeaderParseError, ValueError, IndexError):
        return False
    if not isinstance(header, AddressHeader):
        return False
    addresses = header.addresses
    return len(addresses) == 1 and addresses[0].addr_spec.casefold() == recipient.casefold()


_NOT_SIMPLE: Final = frozenset(',;:"()\\')


def _simple_address(value: str) -> str | None:
    """The address of a To value that can only name one, or None to ask the full parser.

    ``bob@example.org``, ``<bob@example.org>`` and ``Bob <bob@example.org>``
    are most of what applications send to one recipient. Measured at ~0.3 ms
    per copy, the email package's address parser was the largest render
    step after signing; a value with no quote, comment, comma, group or
    escape cannot hold a second address, so it is read here directly.
    """
    text = " ".join(value.split())
    if not text or any(char in _NOT_SIMPLE for char in text):
        return None
    if "<" in text:
        if text.count("<") != 1 or not text.endswith(">"):
            return None
        text = text[text.index("<") + 1 : -1].strip()
    if " " in text or "<" in text or ">" in text or text.count("@") != 1:
        return None
    return text
