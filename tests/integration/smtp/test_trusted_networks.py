"""Trusted networks: a connection from an account's network sends without AUTH.

The account is changed with the command line while the server runs, as an
operator would; the server picks the change up within a refresh. This module
has its own server, so trusting 127.0.0.1 here disturbs no other test.
"""

from __future__ import annotations

import uuid

from integration.harness import PostlaneServer, Sent, connect, expect, wait_for


def _message(subject: str) -> bytes:
    return (
        f"From: alarms@acme.com\r\nTo: ops@example.net\r\nSubject: {subject}\r\n\r\n"
        "Disk full on printer-3.\r\n"
    ).encode()


def _send_without_auth(server: PostlaneServer, port: int, source: str, subject: str) -> Sent | None:
    """A message sent without AUTH, or None while MAIL is still refused for lack of it."""
    with connect(port, source=source) as client:
        client.ehlo()
        code, text = client.mail("alarms@acme.com")
        if code == 530:
            return None
        expect((code, text), 250, "2.1.0")
        expect(client.rcpt("ops@example.net"), 250, "2.1.5")
        code, text = client.data(_message(subject))
        return Sent(code, text.decode())


def test_trusted_network_sends_as_the_account(server: PostlaneServer) -> None:
    subject = f"trusted {uuid.uuid4().hex}"
    with server.store.nothing_stored():
        assert _send_without_auth(server, server.ports.plain, "127.0.0.1", subject) is None

    server.cli("account", "update", "acme", "--trusted-networks", "127.0.0.1")
    sent = wait_for(lambda: _send_without_auth(server, server.ports.plain, "127.0.0.1", subject))
    assert sent.code == 250, sent.text

    [stored] = server.store.messages_with_subject(subject)
    assert stored["account_id"] == server.account_id("acme")
    assert stored["smtp_user_id"] is None
    assert b"ESMTP id " in stored["raw"]  # not ESMTPA: nobody authenticated
    assert [r["address"] for r in server.store.recipients(stored["id"])] == ["ops@example.net"]

    # Only that address is trusted ...
    with server.store.nothing_stored():
        assert _send_without_auth(server, server.ports.plain, "127.0.0.2", subject) is None
    # ... on every submission listener, also through STARTTLS's fresh session.
    with connect(server.ports.starttls) as client:
        client.starttls()
        client.ehlo()
        expect(client.mail("alarms@acme.com"), 250, "2.1.0")

    # The sender rules still apply to a trusted network.
    with server.store.nothing_stored(), connect(server.ports.plain) as client:
        client.ehlo()
        expect(client.mail("alarms@elsewhere.example"), 550, "5.7.1", "alarms@elsewhere.example")
