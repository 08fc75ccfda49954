"""compose() with a stored template: the body it makes, what it keeps, its errors."""

from __future__ import annotations

import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest

from postlane.delivery.compose import compose
from postlane.errors import InvalidInput
from postlane.options import from_headers
from postlane.options.model import SendOptions
from postlane.store.templates import Template

from .test_compose import ED, RSA, account, parsed, record_steps, verifies

STORED = (
    b"From: Shop <news@shop.example>\r\n"
    b"To: ann@example.test\r\n"
    b"Subject: Sender's subject\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <m1@shop.example>\r\n"
    b"X-Campaign: autumn\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"Content-Language: de\r\n"
    b"\r\n"
    b"The body the client sent, to be replaced.\r\n"
)


def template(**sources: str | None) -> Template:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    values: dict[str, Any] = {"subject": None, "html": None, "text": None, **sources}
    return Template(id=1, account_id=1, name="welcome", created_at=now, updated_at=now, **values)


def make(
    stored: bytes = STORED,
    *,
    options: SendOptions | None = None,
    stored_template: Template | None = None,
    recipients_in_message: int = 1,
) -> bytes:
    return compose(
        stored,
        recipient="ann@example.test",
        options=options or SendOptions(template="welcome"),
        account=account(),
        dkim_keys=[RSA, ED],
        recipients_in_message=recipients_in_message,
        template=stored_template,
    )


def text_of(part: EmailMessage) -> str:
    """A text part's content with LF line ends and without the final line end a
    single-part message's body gets on the wire."""
    content: str = part.get_content()
    return content.replace("\r\n", "\n").removesuffix("\n")


def body_types(message: EmailMessage) -> list[str]:
    return [part.get_content_type() for part in message.walk()]


def test_html_only_template_replaces_the_body_and_keeps_other_headers() -> None:
    out = make(
        options=SendOptions(template="welcome", template_variables={"name": "Ann & Co"}),
        stored_template=template(html="<p>Hello {{ name }}</p>"),
    )
    assert verifies(out, RSA, ED)
    message = parsed(out)
    assert body_types(message) == ["text/html"]
    assert text_of(message) == "<p>Hello Ann &amp; Co</p>"  # escaped in HTML
    assert message.get_content_charset() == "utf-8"
    assert message["Subject"] == "Sender's subject"  # the template has none
    assert message["X-Campaign"] == "autumn" and message["Message-ID"] == "<m1@shop.example>"
    assert message["Content-Language"] is None  # described the body that went
    assert message.get_all("MIME-Version") == ["1.0"]
    assert b"client sent" not in out


def test_text_only_template() -> None:
    out = make(
        options=SendOptions(template="welcome", template_variables={"name": "Ann & Co"}),
        stored_template=template(text="Hello {{ name }}\n{{ missing }}end\n"),
    )
    assert verifies(out, RSA, ED)
    message = parsed(out)
    assert body_types(message) == ["text/plain"]
    assert text_of(message) == "Hello Ann & Co\nend"  # no escaping; missing is empty


def test_html_and_text_make_an_alternative_text_first() -> None:
    out = make(
        options=SendOptions(template="welcome", template_variables={"name": "Zoë"}),
        stored_template=template(
            html="<p>Danke für Ihre Bestellung vom 1. November, {{ name }}</p>",
            text="Danke für Ihre Bestellung vom 1. November, {{ name }}",
        ),
    )
    assert verifies(out, RSA, ED)
    message = parsed(out)
    assert body_types(message) == ["multipart/alternative", "text/plain", "text/html"]
    text, page = message.iter_parts()
    assert text_of(text) == "Danke für Ihre Bestellung vom 1. November, Zoë"
    assert text_of(page) == "<p>Danke für Ihre Bestellung vom 1. November, Zoë</p>"
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert out.isascii()  # 7-bit clean: every receiver takes it


def test_mostly_non_ascii_text_is_base64() -> None:
    out = make(stored_template=template(text="你好{{ name }}。歡迎光臨。"))
    message = parsed(out)
    assert message["Content-Transfer-Encoding"] == "base64"
    assert text_of(message) == "你好。歡迎光臨。"


def test_template_variables_win_over_general_variables() -> None:
    options = SendOptions(
        template="welcome",
        variables={"name": "general", "plan": "basic"},
        template_variables={"name": "Ann"},
    )
    out = make(options=options, stored_template=template(text="{{ name }}/{{ plan }}"))
    assert text_of(parsed(out)) == "Ann/basic"


def test_variables_from_the_option_headers() -> None:
    parsed_headers = from_headers(
        [
            ("X-Mailgun-Template-Name", "welcome"),
            ("X-Mailgun-Variables", '{"name": "general", "city": "Taipei"}'),
            ("X-Mailgun-Template-Variables", '{"name": "Ann", "user": {"plan": "pro"}}'),
        ],
        tz=UTC,
    )
    options = SendOptions().layer(parsed_headers.partial)
    out = make(
        options=options,
        stored_template=template(text="{{ name }} {{ city }} {{ user.plan }}"),
    )
    assert text_of(parsed(out)) == "Ann Taipei pro"


def test_subject_from_the_template_replaces_the_senders() -> None:
    out = make(
        options=SendOptions(
            template="welcome", template_variables={"name": "Zoë\r\nBcc: evil@example.test"}
        ),
        stored_template=template(subject="Welcome, {{ name }} & co", text="x"),
    )
    assert verifies(out, RSA, ED)
    message = parsed(out)
    assert message["Subject"] == "Welcome, Zoë Bcc: evil@example.test & co"  # no new field
    assert message["Bcc"] is None
    assert message.get_all("Subject") is not None and len(message.get_all("Subject")) == 1
    assert b"=?utf-8?" in out  # a non-ASCII subject is encoded, not sent raw


def test_a_subject_is_added_where_the_stored_message_had_none() -> None:
    stored = STORED.replace(b"Subject: Sender's subject\r\n", b"")
    out = make(stored, stored_template=template(subject="Hi", text="x"))
    assert parsed(out)["Subject"] == "Hi"


def _with_attachments() -> bytes:
    message = EmailMessage()
    message["From"] = "news@shop.example"
    message["To"] = "ann@example.test"
    message["Subject"] = "Invoice"
    message["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    message.set_content("old text")
    message.add_alternative("<p>old <img src='cid:logo'></p>", subtype="html")
    html = message.get_payload()[1]  # type: ignore[index]
    html.add_related(b"\x89PNG logo", maintype="image", subtype="png", cid="<logo>")
    message.add_attachment(
        b"%PDF-1.4 invoice", maintype="application", subtype="pdf", filename="invoice.pdf"
    )
    forwarded = EmailMessage()
    forwarded["Subject"] = "earlier"
    forwarded.set_content("quoted")
    message.add_attachment(forwarded)
    return message.as_bytes(policy=email.policy.SMTP)


def test_attachments_are_kept_after_the_new_body() -> None:
    out = make(
        _with_attachments(),
        stored_template=template(html="<p>new</p>", text="new"),
    )
    assert verifies(out, RSA, ED)
    message = parsed(out)
    assert message.get_content_type() == "multipart/mixed"
    body, pdf, forwarded = message.iter_parts()
    assert body_types(body) == ["multipart/alternative", "text/plain", "text/html"]
    assert pdf.get_filename() == "invoice.pdf" and pdf.get_content() == b"%PDF-1.4 invoice"
    assert forwarded.get_content_type() == "message/rfc822"
    assert b"old" not in out and b"PNG" not in out  # the old body and its inline image went


def test_a_stored_message_that_is_one_attached_file_keeps_it() -> None:
    stored = (
        b"From: news@shop.example\r\nTo: ann@example.test\r\nSubject: File\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: application/pdf; name="a.pdf"\r\n'
        b'Content-Disposition: attachment; filename="a.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        b"JVBERi0xLjQ=\r\n"
    )
    message = parsed(make(stored, stored_template=template(text="see the file")))
    body, attached = message.iter_parts()
    assert text_of(body) == "see the file"
    assert attached.get_filename() == "a.pdf" and attached.get_content() == b"%PDF-1.4"
    assert attached["Subject"] is None  # only the file's own fields went with it


def test_recipient_variables_are_filled_into_what_the_template_made() -> None:
    options = SendOptions(
        template="welcome",
        template_variables={"greeting": "Dear"},
        recipient_variables={"ann@example.test": {"first": "Ann"}},
    )
    out = make(options=options, stored_template=template(text="{{ greeting }} %recipient.first%"))
    assert text_of(parsed(out)) == "Dear Ann"


def test_content_options_act_on_the_template_body() -> None:
    options = SendOptions(template="welcome", html_to_text=True)
    out = make(options=options, stored_template=template(html="<p>Only <b>HTML</b></p>"))
    assert body_types(parsed(out)) == ["multipart/alternative", "text/plain", "text/html"]


def test_missing_template_fails_with_its_name() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'Promo' does not exist for this account$"):
        make(options=SendOptions(template="Promo"), stored_template=None)


def test_runtime_error_names_template_part_and_line() -> None:
    with pytest.raises(
        InvalidInput, match=r"^template 'welcome' \(html\): line 3: division by zero$"
    ):
        make(stored_template=template(html="<p>\n</p>\n{{ 1 / 0 }}", text="fine"))


def test_a_template_given_without_being_asked_for_is_not_used() -> None:
    out = make(options=SendOptions(), stored_template=template(text="not asked"))
    assert b"client sent" in out


def test_template_is_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_steps(
        monkeypatch, "apply_template", "apply_content_options", "substitute_recipient_variables"
    )
    make(stored_template=template(text="x"))
    assert calls == ["apply_template", "apply_content_options", "substitute_recipient_variables"]
