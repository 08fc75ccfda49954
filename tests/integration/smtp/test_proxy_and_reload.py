"""PROXY protocol behind a load balancer, and certificate reload on SIGHUP.

Both are inputs from outside the SMTP dialogue: a balancer's header that
names the real client, and certificate files an operator renews in place.
"""

from __future__ import annotations

import signal
import socket
import ssl
import struct
import uuid

from cryptography import x509

from integration.harness import LOOPBACK, PostlaneServer, connect, expect, wait_for
from postlane.smtp import tls


def _dialogue(header: bytes, port: int, subject: str, password: str) -> bytes:
    """A whole SMTP session written after a PROXY header; the server's replies."""
    import base64

    token = base64.b64encode(f"\0app1\0{password}".encode()).decode()
    message = f"From: info@acme.com\r\nTo: a@example.net\r\nSubject: {subject}\r\n\r\nhi\r\n.\r\n"
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(header)
        replies = b""
        for line in (
            "EHLO proxied.example",
            f"AUTH PLAIN {token}",
            "MAIL FROM:<info@acme.com>",
            "RCPT TO:<a@example.net>",
            "DATA",
        ):
            replies += sock.recv(4096)
            sock.sendall(line.encode() + b"\r\n")
        replies += sock.recv(4096)
        sock.sendall(message.encode())
        replies += sock.recv(4096)
        sock.sendall(b"QUIT\r\n")
        replies += sock.recv(4096)
    return replies


def test_proxy_v1_header_names_the_client(server: PostlaneServer) -> None:
    subject = f"proxy v1 {uuid.uuid4().hex}"
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n"
    replies = _dialogue(header, server.ports.proxied, subject, server.passwords["app1"])
    assert b"250 2.0.0 Ok: queued as" in replies, replies
    [stored] = server.store.messages_with_subject(subject)
    assert stored["client_ip"] == "203.0.113.7"
    assert b"[203.0.113.7]" in stored["raw"]


def test_proxy_v2_header_names_the_client(server: PostlaneServer) -> None:
    subject = f"proxy v2 {uuid.uuid4().hex}"
    addresses = socket.inet_aton("198.51.100.9") + socket.inet_aton("192.0.2.1")
    addresses += struct.pack("!HH", 40000, 25)
    header = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses))
    replies = _dialogue(header + addresses, server.ports.proxied, subject, server.passwords["app1"])
    assert b"250 2.0.0 Ok: queued as" in replies, replies
    [stored] = server.store.messages_with_subject(subject)
    assert stored["client_ip"] == "198.51.100.9"


def test_malformed_proxy_header_closes_without_a_greeting(server: PostlaneServer) -> None:
    with socket.create_connection((LOOPBACK, server.ports.proxied), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 not-an-ip 192.0.2.1 1 25\r\n")
        assert sock.recv(4096) == b""  # closed, nothing said
    with socket.create_connection((LOOPBACK, server.ports.proxied), timeout=10) as sock:
        sock.sendall(b"EHLO no-header-at-all\r\n")  # a client that skipped the balancer
        assert sock.recv(4096) == b""


def test_a_proxy_header_from_a_peer_that_is_not_a_balancer_is_never_read(
    server: PostlaneServer,
) -> None:
    """Anyone reaching the port could claim a trusted network's address and send without AUTH."""
    header = b"PROXY TCP4 127.0.0.1 192.0.2.1 51234 25\r\n"
    with socket.create_connection(
        (LOOPBACK, server.ports.proxied), timeout=10, source_address=("127.0.0.2", 0)
    ) as sock:
        sock.sendall(header + b"EHLO sneaky.example\r\n")
        try:
            said = sock.recv(4096)
        except ConnectionResetError:  # aborted with our bytes unread
            said = b""
        assert said == b""  # closed, nothing said

    def refusal_logged() -> bool | None:
        log = server.log_path.read_text()
        return ("client=127.0.0.2" in log and "peer not in proxy_trusted_networks" in log) or None

    wait_for(refusal_logged)


def _peer_certificate(port: int) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((LOOPBACK, port), timeout=10) as raw,
        context.wrap_socket(raw) as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_sighup_reloads_the_certificate_for_new_connections(server: PostlaneServer) -> None:
    before = _peer_certificate(server.ports.implicit)
    with connect(server.ports.starttls) as open_session:  # a session open across the reload
        open_session.ehlo()
        key = server.cert_path.with_suffix(".key")
        tls.write_self_signed("mail.postlane.test", server.cert_path, key)
        server.send_signal(signal.SIGHUP)
        after = wait_for(
            lambda: (
                cert
                if (cert := _peer_certificate(server.ports.implicit)).serial_number
                != before.serial_number
                else None
            )
        )
        assert after.serial_number != before.serial_number
        expect(open_session.noop(), 250, "2.0.0")  # not dropped
