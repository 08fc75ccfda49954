"""curl's SMTP client against a running server, verifying the certificate by name.

``--resolve mail.postlane.test:PORT:127.0.0.1`` lets curl connect to the
loopback listener while checking the certificate against the name it was
issued for, with ``--cacert`` trusting only Postlane's self-signed certificate.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from integration.harness import HOSTNAME, PostlaneServer, queue_id

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

# curl's exit statuses (man curl, EXIT CODES)
CURLE_USE_SSL_FAILED = 64
CURLE_LOGIN_DENIED = 67
CURLE_PEER_FAILED_VERIFICATION = 60


def curl(
    server: PostlaneServer,
    url_scheme: str,
    port: int,
    message: Path,
    *args: str,
    password: str | None = None,
) -> tuple[int, str]:
    """curl sending ``message``; its exit status and verbose transcript."""
    secret = server.passwords["app1"] if password is None else password
    result = subprocess.run(
        [
            "curl",
            "--verbose",
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            "--url",
            f"{url_scheme}://{HOSTNAME}:{port}",
            "--resolve",
            f"{HOSTNAME}:{port}:127.0.0.1",
            "--user",
            f"app1:{secret}",
            "--mail-from",
            "news@acme.com",
            "--mail-rcpt",
            "a@example.net",
            "--mail-rcpt",
            "b@example.net",
            "--upload-file",
            str(message),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "message.eml"
    subject = f"curl {uuid.uuid4().hex}"
    path.write_bytes(
        b"From: News <news@acme.com>\r\nTo: a@example.net, b@example.net\r\n"
        + f"Subject: {subject}\r\n".encode()
        + b"X-JobName: spring-campaign\r\n\r\nHello from curl.\r\n.leading dot\r\n"
    )
    return path


def _subject(message: Path) -> str:
    for line in message.read_text().splitlines():
        if line.startswith("Subject: "):
            return line.removeprefix("Subject: ")
    raise AssertionError("no subject")


@pytest.mark.parametrize(
    ("scheme", "listener", "flags"),
    [
        pytest.param("smtp", "starttls", ["--ssl-reqd"], id="starttls"),
        pytest.param("smtps", "implicit", [], id="implicit"),
    ],
)
def test_send_over_verified_tls(
    server: PostlaneServer, message: Path, scheme: str, listener: str, flags: list[str]
) -> None:
    code, out = curl(
        server,
        scheme,
        getattr(server.ports, listener),
        message,
        "--cacert",
        str(server.cert_path),
        *flags,
    )
    assert code == 0, out
    assert f"subject: CN={HOSTNAME}" in out
    assert "SSL certificate verify ok" in out
    stored = server.store.message(queue_id(out))
    assert stored is not None, out
    assert stored["subject"] == _subject(message)
    assert str(stored["tls"]).startswith("TLSv1.")
    assert stored["options"]["job_name"] == "spring-campaign"
    assert b"X-JobName" not in stored["raw"]
    assert b"\r\n.leading dot\r\n" in stored["raw"]  # curl dot-stuffed it, Postlane undid it
    recipients = server.store.recipients(stored["id"])
    assert [r["address"] for r in recipients] == ["a@example.net", "b@example.net"]


def test_certificate_is_not_trusted_without_cacert(server: PostlaneServer, message: Path) -> None:
    with server.store.nothing_stored():
        code, out = curl(server, "smtps", server.ports.implicit, message)
    assert code == CURLE_PEER_FAILED_VERIFICATION, out


def test_ssl_reqd_on_a_listener_without_tls(server: PostlaneServer, message: Path) -> None:
    """--ssl-reqd means it: the plaintext listener offers no STARTTLS, curl sends nothing."""
    with server.store.nothing_stored():
        code, out = curl(server, "smtp", server.ports.plain, message, "--ssl-reqd")
    assert code == CURLE_USE_SSL_FAILED, out


def test_wrong_password(server: PostlaneServer, message: Path) -> None:
    with server.store.nothing_stored():
        code, out = curl(
            server,
            "smtps",
            server.ports.implicit,
            message,
            "--cacert",
            str(server.cert_path),
            password="not-the-password",
        )
    assert code == CURLE_LOGIN_DENIED, out
    assert "535 5.7.8 Authentication credentials invalid" in out
