"""A stored template in place of the body: what apply_template does to the Subject."""

from __future__ import annotations

import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from postlane.render.template_body import apply_template
from postlane.store.templates import Template

STORED = (
    b"From: Shop <news@shop.example>\r\n"
    b"To: ann@example.test\r\n"
    b"Subject: Sender's subject\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"The body the client sent, to be replaced.\r\n"
)


def template(subject: str) -> Template:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    return Template(
        id=1,
        account_id=1,
        name="welcome",
        subject=subject,
        html=None,
        text="x",
        created_at=now,
        updated_at=now,
    )


@pytest.mark.parametrize(
    "separator",
    ["\r\n", "\r", "\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"],
)
def test_any_line_separator_in_the_subject_becomes_a_space(separator: str) -> None:
    variables = {"name": f"Zoë{separator}Bcc: evil@example.test"}
    out = apply_template(STORED, template("Welcome, {{ name }}"), variables)
    parsed = BytesParser(policy=email.policy.default).parsebytes(out)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == "Welcome, Zoë Bcc: evil@example.test"
    assert parsed["Bcc"] is None
    assert len(parsed.get_all("Subject") or []) == 1
