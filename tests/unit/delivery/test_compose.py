"""compose(): the render steps in order, DKIM last, checked with dkimpy as the verifier."""

from __future__ import annotations

import base64
import email.policy
import io
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postlane.delivery import compose as compose_module
from postlane.delivery.compose import compose
from postlane.errors import InvalidInput
from postlane.options.model import SendOptions
from postlane.render.content import header_section
from postlane.render.dkim import DkimKey
from postlane.store.accounts import Account

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA = DkimKey("shop.example", "pl1", RSA_KEY)
ED = DkimKey("shop.example", "pl1e", ed25519.Ed25519PrivateKey.generate())


def account(**changes: Any) -> Account:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    values: dict[str, Any] = {
        "id": 1,
        "name": "shop",
        "smtp_enabled": True,
        "allow_email_login": False,
        "unauthorised_sender_policy": "alert",
        "attachment_policy": "off",
        "attachment_archive_name": "attachments.zip",
        "attachment_password_enc": None,
        "track_opens": False,
        "track_clicks": False,
        "timezone": "UTC",
        "trusted_networks": (),
        "default_options": {},
        "created_at": now,
        "updated_at": now,
    }
    values.update(changes)
    return Account(**values)


def dns_for(*keys: DkimKey) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc: the keys' TXT records, nothing else."""
    table = {}
    for key in keys:
        public = key.private_key.public_key()
        if isinstance(key.private_key, rsa.RSAPrivateKey):
            der = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
        else:
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
        table[f"{key.selector}._domainkey.{key.domain}"] = record

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        text = table.get(name.decode().rstrip("."))
        return None if text is None else text.encode()

    return lookup


def verifies(message: bytes, *keys: DkimKey) -> bool:
    return bool(dkim.verify(message, dnsfunc=dns_for(*keys)))


def parsed(message: bytes) -> EmailMessage:
    result = BytesParser(policy=email.policy.default).parsebytes(message)
    assert isinstance(result, EmailMessage)
    return result


PLAIN = (
    b"From: Shop <news@shop.example>\r\n"
    b"To: ann@example.test, bob@example.test\r\n"
    b"Cc: carl@example.test\r\n"
    b"Bcc: hidden@example.test\r\n"
    b"Subject: Hello %recipient.name%\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <m1@shop.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Dear %recipient.name%,\r\nyour code is %recipient.code%.\r\n"
)

VARIABLES = SendOptions(
    recipient_variables={
        "ann@example.test": {"name": "Ann", "code": 1234},
        "bob@example.test": {"name": "Bob", "code": 5678},
    }
)


def test_copy_is_personalised_rewritten_and_signed_last() -> None:
    out = compose(
        PLAIN,
        recipient="ann@example.test",
        options=VARIABLES,
        account=account(),
        dkim_keys=[RSA],
        recipients_in_message=2,
    )
    assert out.startswith(b"DKIM-Signature:")
    assert verifies(out, RSA)
    message = parsed(out)
    assert message["Subject"] == "Hello Ann"
    assert message["To"] == "ann@example.test"
    assert message["Cc"] is None and message["Bcc"] is None
    assert "your code is 1234." in message.get_content()


def test_each_recipient_gets_its_own_copy() -> None:
    copies = {
        rcpt: compose(
            PLAIN,
            recipient=rcpt,
            options=VARIABLES,
            account=account(),
            dkim_keys=[RSA],
            recipients_in_message=2,
        )
        for rcpt in ("ann@example.test", "bob@example.test")
    }
    bob = parsed(copies["bob@example.test"])
    assert bob["To"] == "bob@example.test" and bob["Subject"] == "Hello Bob"
    assert all(verifies(copy, RSA) for copy in copies.values())


def test_rsa_and_ed25519_signatures_rsa_first() -> None:
    out = compose(
        PLAIN,
        recipient="ann@example.test",
        options=SendOptions(),
        account=account(),
        dkim_keys=[ED, RSA],
        recipients_in_message=2,
    )
    message = parsed(out)
    signatures = message.get_all("DKIM-Signature")
    assert signatures is not None and len(signatures) == 2
    assert "a=rsa-sha256" in str(signatures[0])
    assert "a=ed25519-sha256" in str(signatures[1])
    assert verifies(out, RSA, ED)  # dkimpy checks the first (RSA) signature


def test_single_recipient_named_in_to_keeps_cc() -> None:
    raw = (
        b"From: news@shop.example\r\nTo: Ann <ann@example.test>\r\n"
        b"Cc: boss@example.test\r\nSubject: hi\r\n\r\nBody\r\n"
    )
    out = compose(
        raw,
        recipient="ann@example.test",
        options=SendOptions(),
        account=account(),
        dkim_keys=[RSA],
        recipients_in_message=1,
    )
    assert out.endswith(raw)  # nothing but the signature added
    assert verifies(out, RSA)


BLIND = [
    b"Bcc: secret@example.test\r\n",
    b"Bcc: Secret <secret@example.test>,\r\n other@example.test,\r\n\tthird@example.test\r\n",
    b"Resent-Bcc: secret@example.test\r\n",
    b"BCC: secret@example.test\r\n",
]


@pytest.mark.parametrize("blind", BLIND)
def test_single_recipient_named_in_to_still_loses_bcc(blind: bytes) -> None:
    """The one-recipient path keeps To and Cc as written, but no blind copy shows."""
    head = b"From: news@shop.example\r\nTo: ann@example.test\r\nCc: boss@example.test\r\n"
    tail = b"Subject: hi\r\n\r\nBody\r\n"
    out = compose(
        head + blind + tail,
        recipient="ann@example.test",
        options=SendOptions(),
        account=account(),
        dkim_keys=[RSA],
        recipients_in_message=1,
    )
    assert out.endswith(head + tail)  # only the blind copies gone, the rest byte for byte
    assert b"secret@" not in out and b"other@" not in out and b"third@" not in out
    assert verifies(out, RSA)


@pytest.mark.parametrize("blind", BLIND)
def test_every_copy_of_a_multi_recipient_message_loses_bcc(blind: bytes) -> None:
    raw = b"From: news@shop.example\r\nTo: ann@example.test\r\n" + blind + b"\r\nBody\r\n"
    for recipient in ("ann@example.test", "secret@example.test"):
        out = compose(
            raw,
            recipient=recipient,
            options=SendOptions(keep_to=True, keep_cc=True),
            account=account(),
            dkim_keys=[RSA],
            recipients_in_message=2,
        )
        assert b"Bcc" not in out and b"BCC" not in out
        assert b"other@" not in out and b"third@" not in out


def test_single_recipient_not_in_to_gets_own_to() -> None:
    raw = b"From: news@shop.example\r\nTo: list@shop.example\r\nSubject: hi\r\n\r\nBody\r\n"
    out = compose(
        raw,
        recipient="ann@example.test",
        options=SendOptions(),
        account=account(),
        dkim_keys=[RSA],
        recipients_in_message=1,
    )
    assert parsed(out)["To"] == "ann@example.test"
    assert verifies(out, RSA)


def test_keep_to_keeps_the_jobs_to() -> None:
    out = compose(
        PLAIN,
        recipient="ann@example.test",
        options=SendOptions(keep_to=True, keep_cc=True),
        account=account(),
        dkim_keys=[RSA],
        recipients_in_message=2,
    )
    message = parsed(out)
    assert message["To"] == "ann@example.test, bob@example.test"
    assert message["Cc"] == "carl@example.test"
    assert message["Bcc"] is None


def test_a_template_the_account_does_not_have_fails_with_a_clear_reason() -> None:
    with pytest.raises(InvalidInput, match=r"^template 'welcome' does not exist for this account$"):
        compose(
            PLAIN,
            recipient="ann@example.test",
            options=SendOptions(template="welcome"),
            account=account(),
            dkim_keys=[RSA],
            recipients_in_message=1,
        )


def test_no_key_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no DKIM key"):
        compose(
            PLAIN,
            recipient="ann@example.test",
            options=SendOptions(),
            account=account(),
            dkim_keys=[],
            recipients_in_message=1,
        )


def _with_attachment() -> bytes:
    message = EmailMessage()
    message["From"] = "news@shop.example"
    message["To"] = "ann@example.test"
    message["Subject"] = "Invoice for %recipient.name%"
    message["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    message.set_content("Hi %recipient.name%, see attached.")
    message.add_attachment(
        b"%PDF-1.4 invoice", maintype="application", subtype="pdf", filename="invoice.pdf"
    )
    return message.as_bytes(policy=email.policy.SMTP)


def test_attachment_policy_zip_with_password_then_signed() -> None:
    out = compose(
        _with_attachment(),
        recipient="ann@example.test",
        options=SendOptions(recipient_variables={"ann@example.test": {"name": "Ann"}}),
        account=account(attachment_policy="zip", attachment_archive_name="files"),
        attachment_password="s3cret",
        dkim_keys=[RSA],
        recipients_in_message=1,
    )
    assert verifies(out, RSA)
    message = parsed(out)
    assert message["Subject"] == "Invoice for Ann"
    attachments = list(message.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["files.zip"]
    content = attachments[0].get_content()
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        info = archive.infolist()[0]
        assert info.filename == "invoice.pdf"
        assert info.flag_bits & 0x1  # encrypted


def record_steps(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """Wrap compose's steps ``names``; the list they append their names to, as they run."""
    calls: list[str] = []

    def step(name: str, real: Callable[..., bytes]) -> Callable[..., bytes]:
        def wrapper(*args: Any, **kwargs: Any) -> bytes:
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    for name in names:
        monkeypatch.setattr(compose_module, name, step(name, getattr(compose_module, name)))
    return calls


def test_steps_run_in_the_documented_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_steps(
        monkeypatch,
        "apply_content_options",
        "substitute_recipient_variables",
        "view_for",
        "apply_attachment_policy",
        "prepare",
    )
    compose(
        PLAIN,
        recipient="ann@example.test",
        options=VARIABLES,
        account=account(),
        dkim_keys=[RSA],
        recipients_in_message=2,
    )
    assert calls == [
        "apply_content_options",
        "substitute_recipient_variables",
        "view_for",
        "apply_attachment_policy",
        "prepare",
    ]


# -- the one-recipient To check: the quick reading agrees with the email package's --------------

TO_VALUES = [
    "bob@example.org",
    "<bob@example.org>",
    "  Bob Smith <Bob@Example.ORG>",
    "=?utf-8?q?B=C3=B6b?= <bob@example.org>",
    '"Smith, Bob" <bob@example.org>',
    "bob@example.org, ann@example.org",
    "ann@example.org",
    "undisclosed-recipients:;",
    "bob@example.org (Bob)",
    "<bob@example.org> <ann@example.org>",
    "Bob\r\n <bob@example.org>",
    "bob",
]


def _parser_says(value: str, recipient: str) -> bool:
    header = email.policy.SMTP.header_factory("To", value.replace("\r\n", ""))  # unfolded
    addresses = getattr(header, "addresses", ())
    return len(addresses) == 1 and addresses[0].addr_spec.casefold() == recipient.casefold()


@pytest.mark.parametrize("value", TO_VALUES)
def test_to_names_only_agrees_with_the_email_parser(value: str) -> None:
    from postlane.delivery.compose import _to_names_only

    message = f"From: a@shop.example\r\nTo: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    fields = header_section(message).fields
    assert _to_names_only(fields, "bob@example.org") == _parser_says(value, "bob@example.org")


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("bob@example.org", "bob@example.org"),
        (" <bob@example.org> ", "bob@example.org"),
        ("Bob Smith <Bob@Example.ORG>", "Bob@Example.ORG"),
        ('"Smith, Bob" <bob@example.org>', None),
        ("a@example.org, b@example.org", None),
        ("group: a@example.org;", None),
        ("bob@example.org (comment)", None),
        ("<a@example.org> <b@example.org>", None),
    ],
)
def test_simple_address_reads_only_what_cannot_hold_two(value: str, address: str | None) -> None:
    from postlane.delivery.compose import _simple_address

    assert _simple_address(value) == address
