"""Recipient variables: %recipient.KEY% in Subject and body text, per recipient."""

from __future__ import annotations

import email.policy
from collections.abc import Mapping
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest

from postlane.options.model import SendOptions
from postlane.render.personalise import substitute_recipient_variables

VARIABLES: Mapping[str, Mapping[str, Any]] = SendOptions(
    recipient_variables={
        "ann@example.org": {"first": "Ann", "id": 7, "vip": True, "tags": ["a", "b"]},
        "zoe@example.org": {"first": "Zoë", "company": "Tom & Jerry <Ltd>"},
        "nil@example.org": {"first": None},
    }
).recipient_variables


def parse(data: bytes) -> EmailMessage:
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def body_of(data: bytes, subtype: str) -> str:
    part = parse(data).get_body(preferencelist=(subtype,))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")  # CRLF on the wire; compare text


def part_header(data: bytes, subtype: str, name: str) -> str:
    part = parse(data).get_body(preferencelist=(subtype,))
    assert part is not None
    return str(part[name])


def batch(
    text: str = "Dear %recipient.first%,\n",
    html: str | None = None,
    *,
    subject: str = "Hello %recipient.first%",
    text_cte: str | None = None,
    html_cte: str | None = None,
    charset: str = "utf-8",
) -> bytes:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "shop@example.com"
    message["To"] = "ann@example.org, zoe@example.org"
    message["Subject"] = subject
    message.set_content(text, charset=charset, cte=text_cte)
    if html is not None:
        message.add_alternative(html, subtype="html", cte=html_cte)
    return message.as_bytes()


def test_no_variables_returns_the_message_itself() -> None:
    data = batch()
    assert substitute_recipient_variables(data, "ann@example.org", {}) is data


def test_nothing_to_substitute_returns_the_message_itself() -> None:
    data = batch("Plain text without placeholders\n", subject="Plain subject")
    assert substitute_recipient_variables(data, "ann@example.org", VARIABLES) is data


def test_subject_and_text_body_are_filled_in() -> None:
    copy = substitute_recipient_variables(batch(), "ann@example.org", VARIABLES)
    assert parse(copy)["Subject"] == "Hello Ann"
    assert body_of(copy, "plain") == "Dear Ann,\n"


def test_each_recipient_gets_its_own_values() -> None:
    data = batch()
    assert body_of(substitute_recipient_variables(data, "zoe@example.org", VARIABLES), "plain") == (
        "Dear Zoë,\n"
    )
    assert body_of(substitute_recipient_variables(data, "ann@example.org", VARIABLES), "plain") == (
        "Dear Ann,\n"
    )


def test_non_ascii_value_in_subject_is_rfc2047_encoded() -> None:
    copy = substitute_recipient_variables(batch(), "zoe@example.org", VARIABLES)
    assert parse(copy)["Subject"] == "Hello Zoë"
    subject_line = next(line for line in copy.split(b"\r\n") if line.startswith(b"Subject:"))
    assert subject_line.isascii() and b"=?utf-8?" in subject_line


def test_encoded_non_ascii_subject_is_decoded_filled_and_encoded_again() -> None:
    data = batch(subject="Grüße, %recipient.first% — 你好")
    copy = substitute_recipient_variables(data, "zoe@example.org", VARIABLES)
    assert parse(copy)["Subject"] == "Grüße, Zoë — 你好"


def test_missing_key_and_missing_recipient_give_empty_text() -> None:
    data = batch("[%recipient.first%|%recipient.nope%]\n")
    assert body_of(substitute_recipient_variables(data, "ann@example.org", VARIABLES), "plain") == (
        "[Ann|]\n"
    )
    assert body_of(substitute_recipient_variables(data, "who@example.org", VARIABLES), "plain") == (
        "[|]\n"
    )


def test_null_is_empty_and_other_values_are_json() -> None:
    data = batch("%recipient.first%|%recipient.id%|%recipient.vip%|%recipient.tags%\n")
    assert body_of(substitute_recipient_variables(data, "nil@example.org", VARIABLES), "plain") == (
        "|||\n"
    )
    assert body_of(substitute_recipient_variables(data, "ann@example.org", VARIABLES), "plain") == (
        'Ann|7|true|["a", "b"]\n'
    )


def test_recipient_and_recipient_email_give_the_address() -> None:
    data = batch("To %recipient% / %recipient_email%\n")
    copy = substitute_recipient_variables(data, "ann@example.org", VARIABLES)
    assert body_of(copy, "plain") == "To ann@example.org / ann@example.org\n"


def test_recipient_is_matched_ignoring_case() -> None:
    copy = substitute_recipient_variables(batch(), "Ann@Example.ORG", VARIABLES)
    assert body_of(copy, "plain") == "Dear Ann,\n"


def test_values_are_html_escaped_in_html_but_not_in_text() -> None:
    data = batch(
        "From %recipient.company%\n",
        '<p title="%recipient.company%">From %recipient.company%</p>\n',
    )
    copy = substitute_recipient_variables(data, "zoe@example.org", VARIABLES)
    assert body_of(copy, "plain") == "From Tom & Jerry <Ltd>\n"
    assert body_of(copy, "html") == (
        '<p title="Tom &amp; Jerry &lt;Ltd&gt;">From Tom &amp; Jerry &lt;Ltd&gt;</p>\n'
    )


def test_quoted_printable_and_base64_bodies_keep_their_encoding() -> None:
    data = batch(
        "Grüße %recipient.first%, " + "a long line " * 10 + "\n",
        "<p>Liebe %recipient.first%, ça va?</p>\n",
        text_cte="quoted-printable",
        html_cte="base64",
    )
    copy = substitute_recipient_variables(data, "zoe@example.org", VARIABLES)
    assert part_header(copy, "plain", "Content-Transfer-Encoding") == "quoted-printable"
    assert part_header(copy, "html", "Content-Transfer-Encoding") == "base64"
    assert body_of(copy, "plain").startswith("Grüße Zoë, a long line")
    assert body_of(copy, "html") == "<p>Liebe Zoë, ça va?</p>\n"
    assert b"%recipient" not in copy


def test_placeholder_split_by_a_quoted_printable_soft_break_is_found() -> None:
    raw = (
        b"From: shop@example.com\r\nTo: ann@example.org\r\nSubject: s\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Dear %recipient.fi=\r\nrst%, hi=\r\n\r\n"
    )
    copy = substitute_recipient_variables(raw, "ann@example.org", VARIABLES)
    assert body_of(copy, "plain") == "Dear Ann, hi\n"


def test_latin1_part_becomes_utf8_when_the_value_does_not_fit() -> None:
    data = batch("Schöne Grüße, %recipient.first%\n", charset="iso-8859-1")
    copy = substitute_recipient_variables(data, "zoe@example.org", VARIABLES)
    assert body_of(copy, "plain") == "Schöne Grüße, Zoë\n"
    values = {"zoe@example.org": {"first": "Ωmega"}}
    copy = substitute_recipient_variables(data, "zoe@example.org", values)
    assert part_header(copy, "plain", "Content-Type") == 'text/plain; charset="utf-8"'
    assert body_of(copy, "plain") == "Schöne Grüße, Ωmega\n"


def test_ascii_part_holding_raw_utf8_keeps_its_bytes() -> None:
    raw = (
        b"From: shop@example.com\r\nTo: ann@example.org\r\nSubject: s\r\n"
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Caf\xc3\xa9 for %recipient.first%\r\n"
    )
    copy = substitute_recipient_variables(raw, "ann@example.org", VARIABLES)
    assert copy.endswith(b"\r\n\r\nCaf\xc3\xa9 for Ann\r\n")


def test_7bit_part_gets_quoted_printable_for_a_non_ascii_value() -> None:
    data = batch("Dear %recipient.first%\n", text_cte="7bit")
    copy = substitute_recipient_variables(data, "zoe@example.org", VARIABLES)
    assert part_header(copy, "plain", "Content-Transfer-Encoding") == "quoted-printable"
    assert copy.isascii()
    assert body_of(copy, "plain") == "Dear Zoë\n"


def test_line_breaks_in_a_value_cannot_add_header_fields() -> None:
    values = {"ann@example.org": {"first": "Ann\r\nBcc: victim@example.net"}}
    copy = substitute_recipient_variables(batch(), "ann@example.org", values)
    parsed = parse(copy)
    assert parsed["Bcc"] is None
    assert parsed["Subject"] == "Hello Ann Bcc: victim@example.net"


@pytest.mark.parametrize(
    "separator", ["\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_any_line_separator_in_a_value_becomes_a_space_in_the_subject(separator: str) -> None:
    values = {"ann@example.org": {"first": f"Ann{separator}Bcc: victim@example.net"}}
    parsed = parse(substitute_recipient_variables(batch(), "ann@example.org", values))
    assert parsed["Bcc"] is None
    assert parsed["Subject"] == "Hello Ann Bcc: victim@example.net"


@pytest.mark.parametrize("charset", ["hex", "rot13", "undefined"])
def test_part_in_a_charset_naming_no_text_codec_is_filled_in_as_ascii(charset: str) -> None:
    data = batch(text="Dear %recipient.first%,\n").replace(
        b'charset="utf-8"', f"charset={charset}".encode()
    )
    assert f"charset={charset}".encode() in data
    copy = substitute_recipient_variables(data, "ann@example.org", VARIABLES)
    assert b"\r\n\r\nDear Ann,\r\n" in copy


def test_attachments_and_attached_messages_are_left_alone() -> None:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = "shop@example.com"
    message["Subject"] = "s"
    message.set_content("Dear %recipient.first%\n")
    message.add_attachment("Attached %recipient.first%\n", filename="notes.txt")
    forwarded = EmailMessage(policy=email.policy.SMTP)
    forwarded["Subject"] = "fwd %recipient.first%"
    forwarded.set_content("Inner %recipient.first%\n")
    message.add_attachment(forwarded)
    copy = substitute_recipient_variables(message.as_bytes(), "ann@example.org", VARIABLES)
    parsed = parse(copy)
    assert body_of(copy, "plain") == "Dear Ann\n"
    attached = list(parsed.iter_attachments())
    assert attached[0].get_content() == "Attached %recipient.first%\r\n"
    inner = attached[1].get_content()
    assert inner["Subject"] == "fwd %recipient.first%"
    assert inner.get_content() == "Inner %recipient.first%\r\n"
