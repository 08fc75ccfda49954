"""swaks, the SMTP test tool, against a running server.

swaks (20201014, Debian 12) has no option to send ``BODY=8BITMIME`` or
``SMTPUTF8``, so its 8-bit body is refused as RFC 6152 requires (the smtplib
tests cover accepted 8-bit and SMTPUTF8 mail). Its TLS needs the Perl module
Net::SSLeay (Debian: libnet-ssleay-perl, only a "Recommends" of swaks); the
TLS cases are skipped, saying so, where it is missing.
"""

from __future__ import annotations

import base64
import email
import hashlib
import os
import re
import shutil
import subprocess
import uuid
from email.message import Message
from pathlib import Path

import pytest

from integration.harness import HOSTNAME, PostlaneServer, Store, queue_id

pytestmark = pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (scripts/test installs it)"
)


def _has_ssleay() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MNet::SSLeay", "-e", "1"], capture_output=True).returncode == 0


needs_tls = pytest.mark.skipif(
    not _has_ssleay(),
    reason="swaks TLS needs the Perl module Net::SSLeay (apt install libnet-ssleay-perl)",
)


def swaks(server: PostlaneServer, port: int, *args: str) -> tuple[int, str]:
    """Run swaks against the server; its exit status and its transcript."""
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), "--ehlo", "client.test", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def login(server: PostlaneServer, mechanism: str, user: str = "app1") -> list[str]:
    return ["--auth", mechanism, "--auth-user", user, "--auth-password", server.passwords[user]]


def verify(server: PostlaneServer) -> list[str]:
    """Verify the certificate against selfsigned.crt (swaks checks the chain, not the name)."""
    return ["--tls-verify", "--tls-ca-path", str(server.cert_path), "--tls-sni", HOSTNAME]


def _stored(store: Store, transcript: str) -> dict[str, object]:
    message = store.message(queue_id(transcript))
    assert message is not None, transcript
    return dict(message)


@pytest.mark.parametrize(
    ("listener", "tls", "mechanism", "protocol"),
    [
        pytest.param("starttls", ["--tls"], "PLAIN", b"ESMTPSA", marks=needs_tls, id="starttls"),
        pytest.param("implicit", ["--tlsc"], "LOGIN", b"ESMTPSA", marks=needs_tls, id="implicit"),
        pytest.param("plain", [], "LOGIN", b"ESMTPA", id="plaintext-submission"),
        pytest.param("relay", [], "PLAIN", b"ESMTPA", id="port-25-role"),
    ],
)
def test_authenticated_submission(
    server: PostlaneServer, listener: str, tls: list[str], mechanism: str, protocol: bytes
) -> None:
    subject = f"swaks {listener} {uuid.uuid4().hex}"
    port = getattr(server.ports, listener)
    extra = verify(server) if tls else []
    code, out = swaks(
        server,
        port,
        *tls,
        *extra,
        *login(server, mechanism),
        "--from",
        "news@acme.com",
        "--to",
        "a@example.net,b@example.org",
        "--header",
        f"Subject: {subject}",
    )
    assert code == 0, out
    assert f"AUTH {mechanism}" in out
    message = _stored(server.store, out)
    assert message["subject"] == subject
    assert (message["tls"] is not None) == bool(tls)
    assert protocol + b" id " in message["raw"]  # type: ignore[operator]
    recipients = server.store.recipients(str(message["id"]))
    assert [r["address"] for r in recipients] == ["a@example.net", "b@example.org"]


@needs_tls
def test_pipelining(server: PostlaneServer) -> None:
    """MAIL, RCPT and DATA go out in one write; the replies come back in order."""
    subject = f"swaks pipeline {uuid.uuid4().hex}"
    code, out = swaks(
        server,
        server.ports.starttls,
        "--tls",
        *verify(server),
        "--pipeline",
        *login(server, "PLAIN"),
        "--from",
        "news@acme.com",
        "--to",
        "a@example.net,b@example.net,c@example.net",
        "--header",
        f"Subject: {subject}",
    )
    assert code == 0, out
    # The three commands (and DATA) were sent before the first reply was read.
    assert re.search(
        r"~> MAIL FROM:<news@acme.com>\n ~> RCPT TO:<a@example.net>\n"
        r" ~> RCPT TO:<b@example.net>\n ~> RCPT TO:<c@example.net>\n ~> DATA\n"
        r"<~  250 2\.1\.0 Ok\n<~  250 2\.1\.5 Ok\n<~  250 2\.1\.5 Ok\n<~  250 2\.1\.5 Ok\n"
        r"<~  354 ",
        out,
    ), out
    message = _stored(server.store, out)
    assert len(server.store.recipients(str(message["id"]))) == 3


@needs_tls
def test_untrusted_certificate_is_refused_by_swaks(server: PostlaneServer) -> None:
    """--tls-verify without the certificate: the handshake fails, nothing is sent."""
    with server.store.nothing_stored():
        code, out = swaks(
            server,
            server.ports.starttls,
            "--tls",
            "--tls-verify",
            *login(server, "PLAIN"),
            "--from",
            "news@acme.com",
            "--to",
            "a@example.net",
        )
    assert code != 0
    assert "certificate verify failed" in out


def test_option_headers_from_a_data_file(server: PostlaneServer, tmp_path: Path) -> None:
    """A whole message from a file, with Mailgun and Omnivery option headers."""
    subject = f"swaks data {uuid.uuid4().hex}"
    data = tmp_path / "message.eml"
    data.write_text(
        "From: News <news@acme.com>\n"
        "To: reader@example.net\n"
        f"Subject: {subject}\n"
        "X-Mailgun-Tag: newsletter\n"
        "X-OV-Tag: spring\n"
        "X-Mailgun-Track-Clicks: yes\n"
        "\n"
        "..a line that starts with a dot\n"
        "Body.\n"
    )
    code, out = swaks(
        server,
        server.ports.plain,
        *login(server, "PLAIN"),
        "--from",
        "news@acme.com",
        "--to",
        "reader@example.net",
        "--data",
        f"@{data}",
    )
    assert code == 0, out
    message = _stored(server.store, out)
    raw = message["raw"]
    assert isinstance(raw, bytes)
    assert b"x-mailgun" not in raw.lower()
    assert b"x-ov-" not in raw.lower()
    assert b"\r\n..a line that starts with a dot\r\n" in raw  # dot-stuffing undone once
    options = message["options"]
    assert isinstance(options, dict)
    assert sorted(options["tags"]) == ["newsletter", "spring"]
    assert options["track_clicks"] is True


def test_8bit_body_without_8bitmime_is_refused(server: PostlaneServer) -> None:
    with server.store.nothing_stored():
        code, out = swaks(
            server,
            server.ports.plain,
            *login(server, "LOGIN"),
            "--from",
            "news@acme.com",
            "--to",
            "reader@example.net",
            "--body",
            "Grüße aus Zürich",
        )
    assert code != 0
    assert "550 5.6.0 Message contains 8-bit data but BODY=8BITMIME or SMTPUTF8" in out


@needs_tls
def test_20_mb_attachment(server: PostlaneServer, tmp_path: Path) -> None:
    """20 MiB of random bytes (about 28 MB as base64) fits under the 32 MiB limit."""
    payload = os.urandom(20 * 1024 * 1024)
    attachment = tmp_path / "report.bin"
    attachment.write_bytes(payload)
    subject = f"swaks attachment {uuid.uuid4().hex}"
    code, out = swaks(
        server,
        server.ports.starttls,
        "--tls",
        *verify(server),
        *login(server, "PLAIN"),
        "--from",
        "news@acme.com",
        "--to",
        "reader@example.net",
        "--header",
        f"Subject: {subject}",
        "--body",
        "The report is attached.",
        "--attach",
        f"@{attachment}",
        "--suppress-data",
    )
    assert code == 0, out
    message = _stored(server.store, out)
    raw = message["raw"]
    assert isinstance(raw, bytes)
    assert message["size"] == len(raw)
    assert len(raw) > len(base64.b64encode(payload))
    parsed = email.message_from_bytes(raw)
    parts = [p for p in parsed.walk() if p.get_filename() == "report.bin"]
    assert len(parts) == 1
    part: Message = parts[0]
    decoded = part.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert hashlib.sha256(decoded).digest() == hashlib.sha256(payload).digest()
