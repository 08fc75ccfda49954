"""What a running server refuses, with exactly which reply, and that it stores nothing.

AUTH failures are counted per client IP (``[auth] max_failures``), so each
test that fails an AUTH connects from its own loopback address (any 127.x.y.z
reaches the listener on 127.0.0.1) and uses its own user names.
"""

from __future__ import annotations

import smtplib
import ssl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from integration.harness import (
    HOSTNAME,
    LoopbackSMTP_SSL,
    PostlaneServer,
    ServerConfig,
    auth_plain,
    connect,
    expect,
    send,
    wait_for,
)

MAX_SIZE = 1024 * 1024


def _prepare(server: PostlaneServer) -> None:
    server.add_user("acme", "leaver")
    server.add_user("acme", "dormant", active=False)
    server.add_user("acme", "rotated")
    server.add_user("acme", "limited", authorised_senders="info@acme.com")
    server.add_account("offco", "offco.example")
    server.add_user("offco", "off1")
    server.add_account("alertco", "alertco.example", unauthorised_sender_policy="alert")
    server.add_user("alertco", "alert1")


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(prepare=_prepare, max_message_size=MAX_SIZE)


def message(subject: str, *, sender: str = "news@acme.com", extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: reader@example.net\r\nSubject: {subject}\r\n{extra}\r\nHello.\r\n"
    ).encode()


@contextmanager
def logged_in(
    server: PostlaneServer, user: str = "app1", *, source: str = "127.0.0.1"
) -> Iterator[smtplib.SMTP]:
    with connect(server.ports.plain, source=source) as client:
        client.ehlo()
        expect(auth_plain(client, user, server.passwords[user]), 235, "2.7.0")
        yield client


# -- AUTH -----------------------------------------------------------------------------------


def test_wrong_password(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), connect(server.ports.plain, source="127.0.1.1") as client:
        client.ehlo()
        expect(
            auth_plain(client, "app1", "not-the-password"),
            535,
            "5.7.8",
            "Authentication credentials invalid",
        )
        expect(client.mail("news@acme.com"), 530, "5.7.0", "Authentication required")


def test_unknown_user_gets_the_same_reply(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), connect(server.ports.plain, source="127.0.1.2") as client:
        client.ehlo()
        expect(
            auth_plain(client, "nobody", "whatever"),
            535,
            "5.7.8",
            "Authentication credentials invalid",
        )


def test_inactive_user(server: PostlaneServer) -> None:
    with server.store.nothing_stored():
        reply = _auth_reply(server, "dormant", "127.0.1.6")
    expect(reply, 535, "5.7.8", "Authentication credentials invalid")


def _auth_reply(server: PostlaneServer, user: str, source: str) -> tuple[int, bytes]:
    with connect(server.ports.plain, source=source) as client:
        client.ehlo()
        return auth_plain(client, user, server.passwords[user])


def _auth_once_refused(server: PostlaneServer, user: str, source: str) -> tuple[int, bytes]:
    """AUTH with the user's password, again on a new connection until the server's
    refreshed tenants refuse it (bounded); the refusal."""

    def probe() -> tuple[int, bytes] | None:
        reply = _auth_reply(server, user, source)
        return None if reply[0] == 235 else reply

    return wait_for(probe)


def test_disabled_user(server: PostlaneServer) -> None:
    """`postlane smtp-user disable` on a running server: AUTH fails within a refresh."""
    expect(_auth_reply(server, "leaver", "127.0.1.3"), 235, "2.7.0")
    server.cli("smtp-user", "disable", "leaver")
    with server.store.nothing_stored():
        reply = _auth_once_refused(server, "leaver", "127.0.1.3")
    expect(reply, 535, "5.7.8", "Authentication credentials invalid")


def test_reset_password(server: PostlaneServer) -> None:
    """`postlane smtp-user reset-password`: the old password (remembered after its first
    use) stops working within a refresh, the new one works."""
    expect(_auth_reply(server, "rotated", "127.0.1.7"), 235, "2.7.0")
    out = server.cli("smtp-user", "reset-password", "rotated").stdout
    [new] = [line.removeprefix("password: ") for line in out.splitlines() if "password: " in line]
    reply = _auth_once_refused(server, "rotated", "127.0.1.7")
    expect(reply, 535, "5.7.8")
    server.passwords["rotated"] = new
    expect(_auth_reply(server, "rotated", "127.0.1.7"), 235, "2.7.0")


def test_account_with_smtp_disabled(server: PostlaneServer) -> None:
    """`postlane account update --smtp-disabled`: no new AUTH, no MAIL in open sessions."""
    with logged_in(server, "off1", source="127.0.1.4") as session:
        server.cli("account", "update", "offco", "--smtp-disabled")
        with server.store.nothing_stored():
            reply = _auth_once_refused(server, "off1", "127.0.1.4")
            expect(reply, 535, "5.7.8", "Authentication credentials invalid")
            # A session that logged in before the change may not send either.
            expect(
                session.mail("news@offco.example"),
                550,
                "5.7.1",
                "Sending is disabled for this account",
            )


def test_auth_before_starttls_on_the_starttls_port(server: PostlaneServer) -> None:
    with (
        server.store.nothing_stored(),
        connect(server.ports.starttls, source="127.0.1.5") as client,
    ):
        client.ehlo()
        assert not client.has_extn("auth")
        expect(
            auth_plain(client, "app1", server.passwords["app1"]),
            538,
            "5.7.11",
            "Encryption required",
        )
        expect(client.docmd("AUTH", "LOGIN"), 538, "5.7.11")


@pytest.mark.parametrize("listener", ["starttls", "plain"])
def test_mail_without_auth_on_a_submission_port(server: PostlaneServer, listener: str) -> None:
    with server.store.nothing_stored(), connect(getattr(server.ports, listener)) as client:
        client.ehlo()
        expect(client.mail("news@acme.com"), 530, "5.7.0", "Authentication required")
        expect(client.rcpt("reader@example.net"), 503, "5.5.1", "Need MAIL")


def test_mail_without_auth_on_the_implicit_tls_port(server: PostlaneServer) -> None:
    context = ssl.create_default_context(cafile=str(server.cert_path))
    with (
        server.store.nothing_stored(),
        LoopbackSMTP_SSL(HOSTNAME, server.ports.implicit, context=context) as client,
    ):
        client.ehlo()
        assert client.has_extn("auth")
        expect(client.mail("news@acme.com"), 530, "5.7.0", "Authentication required")


# -- relaying --------------------------------------------------------------------------------


def test_relay_without_auth_is_denied(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), connect(server.ports.relay) as client:
        client.ehlo()
        expect(client.mail("news@acme.com"), 250, "2.1.0")
        expect(
            client.rcpt("reader@example.net"),
            554,
            "5.7.1",
            "<reader@example.net>: Relay access denied",
        )
        # A sending domain is not a bounce domain: no mail for it either.
        expect(client.rcpt("info@acme.com"), 554, "5.7.1", "Relay access denied")
        code, text = client.docmd("DATA")
        expect((code, text), 554, "5.5.1", "No valid recipients")


# -- sender policy ------------------------------------------------------------------------


def test_unauthorised_envelope_sender_is_blocked(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), logged_in(server) as client:
        expect(
            client.mail("ceo@bigbank.example"),
            550,
            "5.7.1",
            "<ceo@bigbank.example>",
            "not at a sending domain",
        )


def test_unaligned_header_from_is_blocked(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), logged_in(server) as client:
        sent = send(
            client,
            "news@acme.com",
            ["reader@example.net"],
            message("spoof", sender="ceo@bigbank.example"),
        )
    expect((sent.code, sent.text.encode()), 550, "5.7.1", "From <ceo@bigbank.example>")


def test_sender_outside_the_users_authorised_senders(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), logged_in(server, "limited") as client:
        expect(
            client.mail("news@acme.com"),
            550,
            "5.7.1",
            "<news@acme.com> is not an authorised sender of this SMTP user",
        )


def _send_unauthorised_under_alert(server: PostlaneServer) -> str:
    subject = f"alert {uuid.uuid4().hex}"
    with logged_in(server, "alert1") as client:
        sent = send(
            client,
            "news@alertco.example",
            ["reader@example.net"],
            message(subject, sender="ceo@bigbank.example"),
        )
    assert sent.code == 250, sent.text
    assert sent.queue_id is not None
    return sent.queue_id


def test_unauthorised_sender_under_alert_is_accepted(server: PostlaneServer) -> None:
    queue_id = _send_unauthorised_under_alert(server)
    stored = server.store.message(queue_id)
    assert stored is not None
    assert stored["header_from"] == "ceo@bigbank.example"
    assert len(server.store.recipients(queue_id)) == 1


def test_unauthorised_sender_under_alert_writes_an_alert(server: PostlaneServer) -> None:
    account_id = server.account_id("alertco")
    before = len(server.store.alerts(account_id))
    queue_id = _send_unauthorised_under_alert(server)
    alerts = server.store.alerts(account_id)
    assert len(alerts) == before + 1
    assert alerts[-1]["message_id"] == queue_id
    assert alerts[-1]["kind"] == "unauthorised_sender"
    assert "ceo@bigbank.example" in alerts[-1]["message"]


# -- the message ---------------------------------------------------------------------------------


def test_two_from_headers(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), logged_in(server) as client:
        sent = send(
            client,
            "news@acme.com",
            ["reader@example.net"],
            message("two froms", extra="From: other@acme.com\r\n"),
        )
    expect((sent.code, sent.text.encode()), 550, "5.6.0", "2 From headers")


@pytest.mark.parametrize(
    ("header", "value"),
    [
        pytest.param("X-JobOption", "abc", id="itpison"),
        pytest.param("X-OV-Variables", "{bad", id="omnivery"),
        pytest.param("X-Mailgun-Deliver-By", "notadate", id="mailgun"),
        # Python reads 1e400 as infinity; it once escaped as an exception and
        # dropped the session without a reply.
        pytest.param("X-Mailgun-Variables", '{"n": 1e400}', id="mailgun-number"),
    ],
)
def test_malformed_option_header(server: PostlaneServer, header: str, value: str) -> None:
    with logged_in(server) as client:
        with server.store.nothing_stored():
            sent = send(
                client,
                "news@acme.com",
                ["reader@example.net"],
                message("bad option", extra=f"{header}: {value}\r\n"),
            )
        expect((sent.code, sent.text.encode()), 550, "5.6.0", f"Invalid {header} header")
        # The session goes on: the next message is taken.
        again = send(client, "news@acme.com", ["reader@example.net"], message("good option"))
        assert again.code == 250, again.text


def test_header_text_that_is_not_utf8(server: PostlaneServer) -> None:
    # It was accepted, then failed at commit: 451 at every retry, for ever.
    latin1 = "Subject: café\r\n".encode("latin-1")
    data = b"From: news@acme.com\r\nTo: reader@example.net\r\n" + latin1 + b"\r\nHello.\r\n"
    with server.store.nothing_stored(), logged_in(server) as client:
        sent = send(
            client, "news@acme.com", ["reader@example.net"], data, mail_options=("BODY=8BITMIME",)
        )
    expect((sent.code, sent.text.encode()), 550, "5.6.0", "Subject header is not valid UTF-8")


def test_declared_size_over_the_limit(server: PostlaneServer) -> None:
    with server.store.nothing_stored(), logged_in(server) as client:
        assert client.esmtp_features["size"] == str(MAX_SIZE)
        expect(
            client.mail("news@acme.com", [f"SIZE={MAX_SIZE + 1}"]),
            552,
            "5.3.4",
            "exceeds fixed maximum message size",
        )


def test_message_over_the_limit(server: PostlaneServer) -> None:
    """No SIZE given: the server reads and discards the data, then refuses."""
    big = message("big", extra="") + b"x" * 76 + b"\r\n"
    big += (b"y" * 998 + b"\r\n") * (MAX_SIZE // 1000 + 1)
    with logged_in(server) as client:
        with server.store.nothing_stored():
            expect(client.mail("news@acme.com"), 250, "2.1.0")
            expect(client.rcpt("reader@example.net"), 250, "2.1.5")
            code, text = client.data(big)
        expect((code, text), 552, "5.3.4", "exceeds fixed maximum message size")
        # Just under the limit is fine, and the session is still usable.
        fits = message("fits") + (b"z" * 998 + b"\r\n") * (MAX_SIZE // 1000 - 20)
        assert len(fits) < MAX_SIZE
        sent = send(client, "news@acme.com", ["reader@example.net"], fits)
        assert sent.code == 250, sent.text
