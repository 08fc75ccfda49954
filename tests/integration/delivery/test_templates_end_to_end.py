"""A stored template end to end: put with the CLI, named over SMTP, rendered on the way out.

One ``postlane serve`` with both roles. The template is stored with
``postlane template put`` before the server starts; a message naming it in
X-Mailgun-Template-Name is submitted over SMTP, and the receiving MX (the
worker tests' receiver, on loopback in a thread of its own) must get the
rendered body, signed.
"""

from __future__ import annotations

import asyncio
import email.policy
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser

import dkim
import pytest

from dnsserver import DnsServer
from integration.harness import PostlaneServer, ServerConfig, connect, send, wait_for
from postlane.store import domains as domain_store

from .test_worker import Receiver


@pytest.fixture(scope="module")
def mx() -> Iterator[tuple[Receiver, int]]:
    """The receiver, serving from its own event loop while the test blocks on SMTP."""
    receiver = Receiver()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(receiver.start(), loop).result(timeout=10)
        yield receiver, port
        asyncio.run_coroutine_threadsafe(receiver.stop(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    records = {
        ("example.test", "MX"): ["10 mx.example.test"],
        ("mx.example.test", "A"): ["127.0.0.1"],
    }
    with DnsServer(records) as server:
        yield server


def _put_template(server: PostlaneServer) -> None:
    (server.workdir / "welcome.html").write_text(
        "<p>Hello {{ name }}, welcome to {{ team }}.</p>\n", encoding="utf-8"
    )
    (server.workdir / "welcome.txt").write_text(
        "Hello {{ name }}, welcome to {{ team }}.\n", encoding="utf-8"
    )
    server.cli(
        "template", "put", "acme", "welcome", "--html", "welcome.html", "--text", "welcome.txt",
        "--subject", "Welcome, {{ name }}",
    )  # fmt: skip


@pytest.fixture(scope="module")
def server_config(dns: DnsServer, mx: tuple[Receiver, int]) -> ServerConfig:
    return ServerConfig(
        roles=("smtp", "delivery"),
        prepare=_put_template,
        extra_toml=(
            f'\n[delivery]\nnameservers = ["{dns.nameserver}"]\nmx_port = {mx[1]}\n'
            "allow_internal_mx = true\n"
            "poll_interval = 0.1\n"
        ),
    )


def _final(server: PostlaneServer, queue_id: str) -> dict[str, str] | None:
    states = {r["address"]: r["status"] for r in server.store.recipients(queue_id)}
    return states if all(s not in ("queued", "sending") for s in states.values()) else None


def _dkim_dns(server: PostlaneServer) -> Callable[..., bytes | None]:
    with server.db.connect() as conn:
        domain = domain_store.get_domain(conn, "acme.com")
    name = f"{domain.dkim_selector}._domainkey.acme.com"
    record = f"v=DKIM1; k=rsa; p={domain.dkim_public_key}".encode()

    def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
        return record if qname.decode().rstrip(".") == name else None

    return lookup


def test_mailgun_template_header_sends_the_rendered_template(
    server: PostlaneServer, mx: tuple[Receiver, int]
) -> None:
    receiver, _ = mx
    reader = f"reader-{uuid.uuid4().hex[:8]}@example.test"
    message = (
        f"From: news@acme.com\r\nTo: {reader}\r\nSubject: not this one\r\n"
        "X-Mailgun-Template-Name: welcome\r\n"
        f"X-Mailgun-Template-Variables: {json.dumps({'name': 'Ann'})}\r\n"
        f"X-Mailgun-Variables: {json.dumps({'name': 'nobody', 'team': 'Acme'})}\r\n"
        "\r\nThe body the client sent.\r\n"
    ).encode()
    with connect(server.ports.plain) as client:
        client.ehlo()
        client.login("app1", server.passwords["app1"])
        sent = send(client, "news@acme.com", [reader], message)
    assert sent.code == 250, sent.text
    assert wait_for(lambda: _final(server, sent.queue_id or ""), timeout=30) == {
        reader: "delivered"
    }

    (received,) = [m for m in receiver.messages if m.recipients == (reader,)]
    assert dkim.verify(received.data, dnsfunc=_dkim_dns(server))
    copy = BytesParser(policy=email.policy.default).parsebytes(received.data)
    assert isinstance(copy, EmailMessage)
    assert copy["Subject"] == "Welcome, Ann"
    assert copy["X-Mailgun-Template-Name"] is None  # option headers never leave
    assert copy["X-Mailgun-Template-Variables"] is None
    # ... but the message's variables do, as Mailgun delivers them.
    assert json.loads(copy["X-Mailgun-Variables"]) == {"name": "nobody", "team": "Acme"}
    text, page = copy.iter_parts()
    assert text.get_content().strip() == "Hello Ann, welcome to Acme."
    assert page.get_content().strip() == "<p>Hello Ann, welcome to Acme.</p>"
    assert b"the client sent" not in received.data
