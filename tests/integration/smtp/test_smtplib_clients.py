"""Python's smtplib against a running server: TLS, 8-bit and SMTPUTF8, duplicates, bounces."""

from __future__ import annotations

import ssl
import uuid
from email.message import EmailMessage

import pytest

from integration.harness import (
    HOSTNAME,
    PostlaneServer,
    ServerConfig,
    connect,
    expect,
    queue_id,
    send,
)


def _prepare(server: PostlaneServer) -> None:
    server.add_account("globex", "globex.example")  # a second account with a bounce domain


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(prepare=_prepare)


def _message(subject: str, body: str = "Hello.\n", **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "News <news@acme.com>"
    msg["To"] = "reader@example.net"
    msg["Subject"] = subject
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


def test_starttls_with_a_verified_certificate(server: PostlaneServer) -> None:
    """The client trusts only selfsigned.crt and checks that it names mail.postlane.test."""
    context = ssl.create_default_context(cafile=str(server.cert_path))
    subject = f"starttls {uuid.uuid4().hex}"
    with connect(server.ports.starttls) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth"), "AUTH offered before TLS on a submission port"
        expect(client.starttls(context=context), 220, "2.0.0")
        peer = client.sock.getpeercert()  # type: ignore[union-attr]
        assert peer is not None
        assert peer["subjectAltName"] == (("DNS", HOSTNAME),)
        client.ehlo()
        assert client.has_extn("auth")
        client.login("app1", server.passwords["app1"])
        sent = send(
            client,
            "news@acme.com",
            ["reader@example.net", "other@example.org"],
            _message(subject).as_bytes(),
        )
    assert sent.code == 250, sent.text
    assert sent.text.startswith("2.0.0 Ok: queued as ")
    stored = server.store.message(sent.queue_id or "")
    assert stored is not None
    assert stored["subject"] == subject
    assert stored["account_id"] == server.account_id("acme")
    assert stored["mail_from"] == "news@acme.com"
    assert stored["header_from"] == "news@acme.com"
    assert str(stored["tls"]).startswith("TLSv1.")
    assert b"ESMTPSA" in stored["raw"]  # the Received header says TLS and AUTH
    assert [r["address"] for r in server.store.recipients(stored["id"])] == [
        "reader@example.net",
        "other@example.org",
    ]
    assert {r["status"] for r in server.store.recipients(stored["id"])} == {"queued"}
    assert [e["type"] for e in server.store.events(stored["id"])] == [
        "accepted",
        "queued",
        "queued",
    ]


def test_starttls_certificate_is_checked(server: PostlaneServer) -> None:
    """Nothing trusts the self-signed certificate by default, and it names only one host."""
    with connect(server.ports.starttls) as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError, match=r"self.signed"):
            client.starttls(context=ssl.create_default_context())
    trusting = ssl.create_default_context(cafile=str(server.cert_path))
    with connect(server.ports.starttls, host="smtp.elsewhere.test") as client:
        client.ehlo()
        with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
            client.starttls(context=trusting)


def test_plaintext_submission_port_allows_auth_without_tls(server: PostlaneServer) -> None:
    """OMICard's "port 25, no encryption": the operator allowed AUTH in plain text here."""
    subject = f"plaintext {uuid.uuid4().hex}"
    with connect(server.ports.plain) as client:
        client.ehlo()
        assert client.has_extn("auth")
        assert not client.has_extn("starttls")
        client.login("app1", server.passwords["app1"])
        sent = send(client, "news@acme.com", ["reader@example.net"], _message(subject).as_bytes())
    assert sent.code == 250, sent.text
    stored = server.store.message(sent.queue_id or "")
    assert stored is not None
    assert stored["tls"] is None
    assert stored["subject"] == subject


def test_8bitmime_body_is_stored_byte_for_byte(server: PostlaneServer) -> None:
    body = "Grüße aus Zürich, 東京からこんにちは\r\n".encode()
    subject = f"8bit {uuid.uuid4().hex}"
    raw = (
        b"From: news@acme.com\r\nTo: reader@example.net\r\n"
        + f"Subject: {subject}\r\n".encode()
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        + b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + body
    )
    with connect(server.ports.plain) as client:
        client.ehlo()
        assert client.has_extn("8bitmime")
        client.login("app1", server.passwords["app1"])
        sent = send(
            client, "news@acme.com", ["reader@example.net"], raw, mail_options=("BODY=8BITMIME",)
        )
    assert sent.code == 250, sent.text
    stored = server.store.message(sent.queue_id or "")
    assert stored is not None
    assert stored["raw"].endswith(body)


def test_8bit_body_without_8bitmime_is_refused(server: PostlaneServer) -> None:
    raw = "From: news@acme.com\r\nTo: reader@example.net\r\nSubject: x\r\n\r\nGrüße\r\n".encode()
    with connect(server.ports.plain) as client:
        client.ehlo()
        client.login("app1", server.passwords["app1"])
        with server.store.nothing_stored():
            sent = send(client, "news@acme.com", ["reader@example.net"], raw)
    expect((sent.code, sent.text.encode()), 550, "5.6.0", "8BITMIME")


def test_smtputf8_recipient(server: PostlaneServer) -> None:
    recipient = "josé.müller@example.net"
    subject = f"smtputf8 {uuid.uuid4().hex}"
    raw = (
        f"From: news@acme.com\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHallo José!\r\n"
    ).encode()
    with connect(server.ports.plain) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        client.login("app1", server.passwords["app1"])
        sent = send(client, "news@acme.com", [recipient], raw, mail_options=("SMTPUTF8",))
    assert sent.code == 250, sent.text
    stored = server.store.message(sent.queue_id or "")
    assert stored is not None
    assert f"To: {recipient}".encode() in stored["raw"]
    assert [r["address"] for r in server.store.recipients(stored["id"])] == [recipient]


def test_smtputf8_recipient_needs_smtputf8(server: PostlaneServer) -> None:
    with connect(server.ports.plain) as client:
        client.ehlo()
        client.login("app1", server.passwords["app1"])
        expect(client.mail("news@acme.com"), 250, "2.1.0")
        client.command_encoding = "utf-8"  # what a careless client sends anyway
        expect(client.rcpt("josé@example.net"), 553, "5.6.7", "SMTPUTF8")


def test_duplicate_submission_is_accepted_once(server: PostlaneServer) -> None:
    """Same Message-ID, sender and recipients twice: one message, the same queue id."""
    msg = _message(f"dup {uuid.uuid4().hex}", Message_ID=f"<{uuid.uuid4().hex}@acme.com>")
    recipients = ["a@example.net", "b@example.net"]
    replies = []
    for _ in range(2):  # separate sessions, as a client retrying after a lost reply does
        with connect(server.ports.plain) as client:
            client.login("app1", server.passwords["app1"])
            replies.append(send(client, "news@acme.com", recipients, msg.as_bytes()))
    assert [r.code for r in replies] == [250, 250], replies
    assert replies[0].queue_id == replies[1].queue_id
    stored = server.store.messages_with_subject(str(msg["Subject"]))
    assert [m["id"] for m in stored] == [replies[0].queue_id]
    assert len(server.store.recipients(stored[0]["id"])) == 2
    assert [e["type"] for e in server.store.events(stored[0]["id"])] == [
        "accepted",
        "queued",
        "queued",
        "duplicate",
    ]


def test_changed_recipients_are_not_a_duplicate(server: PostlaneServer) -> None:
    msg = _message(f"nodup {uuid.uuid4().hex}", Message_ID=f"<{uuid.uuid4().hex}@acme.com>")
    ids = []
    with connect(server.ports.plain) as client:
        client.login("app1", server.passwords["app1"])
        for recipients in (["a@example.net"], ["a@example.net", "b@example.net"]):
            sent = send(client, "news@acme.com", recipients, msg.as_bytes())
            assert sent.code == 250, sent.text
            ids.append(sent.queue_id)
    assert ids[0] != ids[1]
    assert len(server.store.messages_with_subject(str(msg["Subject"]))) == 2


def test_mail_to_a_bounce_domain_needs_no_auth(server: PostlaneServer) -> None:
    """The port-25 role takes mail for the account's return-path domain, e.g. a DSN."""
    subject = f"Undelivered Mail Returned to Sender {uuid.uuid4().hex}"
    raw = (
        "From: MAILER-DAEMON@mx.example.net\r\nTo: bounces+x@bounce.acme.com\r\n"
        f"Subject: {subject}\r\n\r\nThe mail system could not deliver your message.\r\n"
    ).encode()
    with connect(server.ports.relay) as client:
        client.ehlo("mx.example.net")
        expect(client.mail(""), 250, "2.1.0")
        expect(client.rcpt("anything@bounce.acme.com"), 250, "2.1.5")
        code, text = client.data(raw)
    assert code == 250, text
    stored = server.store.message(queue_id(text))
    assert stored is not None
    assert stored["account_id"] == server.account_id("acme")
    assert stored["subject"] == subject
    assert stored["smtp_user_id"] is None
    assert server.store.recipients(stored["id"]) == []
    events = server.store.events(stored["id"])
    assert [e["type"] for e in events] == ["inbound"]
    assert events[0]["data"]["recipients"] == ["anything@bounce.acme.com"]


def _bounce(subject: str) -> bytes:
    return (
        f"From: MAILER-DAEMON@mx.example.net\r\nSubject: {subject}\r\n\r\nNot delivered.\r\n"
    ).encode()


def test_two_bounces_for_one_account_over_one_connection(
    server: PostlaneServer,
) -> None:
    """An MTA reuses its connection for the next bounce; for one account that works."""
    with connect(server.ports.relay) as client:
        client.ehlo("mx.example.net")
        for _ in range(2):
            expect(client.mail(""), 250, "2.1.0")
            expect(client.rcpt("b@bounce.acme.com"), 250, "2.1.5")
            code, text = client.data(_bounce(f"bounce {uuid.uuid4().hex}"))
            assert code == 250, text


def test_bounces_for_two_accounts_over_one_connection(server: PostlaneServer) -> None:
    """A remote MTA reuses one connection for bounces to two accounts (connection caching)."""
    with connect(server.ports.relay) as client:
        client.ehlo("mx.example.net")
        expect(client.mail(""), 250, "2.1.0")
        expect(client.rcpt("b@bounce.acme.com"), 250, "2.1.5")
        code, text = client.data(_bounce(f"bounce {uuid.uuid4().hex}"))
        assert code == 250, text
        expect(client.mail(""), 250, "2.1.0")
        expect(client.rcpt("b@bounce.globex.example"), 250, "2.1.5")
        code, text = client.data(_bounce(f"bounce {uuid.uuid4().hex}"))
        assert code == 250, text
    stored = server.store.message(queue_id(text))
    assert stored is not None
    assert stored["account_id"] == server.account_id("globex")


def test_bdat_chunks(server: PostlaneServer) -> None:
    """CHUNKING (RFC 3030): the message in two BDAT chunks, taken as sent (no dot-stuffing)."""
    subject = f"bdat {uuid.uuid4().hex}"
    head = f"From: news@acme.com\r\nTo: reader@example.net\r\nSubject: {subject}\r\n\r\n"
    chunks = [head.encode(), b".a line that starts with a dot\r\nend\r\n"]
    with connect(server.ports.plain) as client:
        client.ehlo()
        assert client.has_extn("chunking")
        client.login("app1", server.passwords["app1"])
        expect(client.mail("news@acme.com"), 250, "2.1.0")
        expect(client.rcpt("reader@example.net"), 250, "2.1.5")
        client.putcmd("BDAT", str(len(chunks[0])))
        client.send(chunks[0])
        expect(client.getreply(), 250, "2.0.0", f"{len(chunks[0])} octets received")
        client.putcmd("BDAT", f"{len(chunks[1])} LAST")
        client.send(chunks[1])
        code, text = client.getreply()
    assert code == 250, text
    stored = server.store.message(queue_id(text))
    assert stored is not None
    assert stored["subject"] == subject
    assert stored["raw"].endswith(b"\r\n\r\n.a line that starts with a dot\r\nend\r\n")
