"""One ``postlane serve`` with both roles: accepted over SMTP, delivered to an MX.

Everything is on loopback: DNS comes from the test DNS server (MX for
example.test -> mx.example.test -> 127.0.0.1), and the MX is Postfix's
smtp-sink on the port set as ``[delivery] mx_port``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from dnsserver import DnsServer
from integration.harness import PostlaneServer, ServerConfig, connect, send, wait_for

SMTP_SINK = "/usr/sbin/smtp-sink"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mx_port() -> Iterator[int]:
    if shutil.which(SMTP_SINK) is None:
        pytest.skip(f"{SMTP_SINK} is not installed (Debian package postfix)")
    port = _free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(
        [SMTP_SINK, *user, f"127.0.0.1:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sink.kill()
                pytest.fail("smtp-sink did not start")
            time.sleep(0.05)
    try:
        yield port
    finally:
        sink.terminate()
        sink.wait(timeout=10)


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    records = {
        ("example.test", "MX"): ["10 mx.example.test"],
        ("mx.example.test", "A"): ["127.0.0.1"],
        ("nullmx.test", "MX"): ["0 ."],
    }
    with DnsServer(records) as server:
        yield server


@pytest.fixture(scope="module")
def server_config(dns: DnsServer, mx_port: int) -> ServerConfig:
    return ServerConfig(
        roles=("smtp", "delivery"),
        extra_toml=(
            f'\n[delivery]\nnameservers = ["{dns.nameserver}"]\nmx_port = {mx_port}\n'
            "allow_internal_mx = true\n"
            "poll_interval = 0.1\n"
        ),
    )


def _status(server: PostlaneServer, queue_id: str) -> dict[str, str] | None:
    rows = server.store.recipients(queue_id)
    states = {r["address"]: r["status"] for r in rows}
    return states if all(s not in ("queued", "sending") for s in states.values()) else None


def test_accepted_message_is_delivered_to_the_mx(server: PostlaneServer) -> None:
    subject = f"end to end {uuid.uuid4().hex}"
    # A null MX suppresses the address, and the server may be shared with
    # another test that sends the same message: each run fails a new one.
    nobody = f"nobody-{uuid.uuid4().hex[:8]}@nullmx.test"
    with connect(server.ports.plain) as client:
        client.ehlo()
        client.login("app1", server.passwords["app1"])
        sent = send(
            client,
            "news@acme.com",
            ["reader@example.test", nobody],
            f"From: news@acme.com\r\nTo: reader@example.test\r\nSubject: {subject}\r\n\r\n"
            "Hello.\r\n".encode(),
        )
    assert sent.code == 250, sent.text
    assert sent.queue_id is not None
    states = wait_for(lambda: _status(server, sent.queue_id or ""), timeout=30)
    assert states == {"reader@example.test": "delivered", nobody: "failed"}
    events = {e["type"]: e for e in server.store.events(sent.queue_id)}
    assert {"accepted", "delivered", "failed"} <= set(events)
    delivered = events["delivered"]["data"]
    assert delivered["mx"] == "mx.example.test"
    assert str(delivered["reply"]).startswith("250")
    assert "5.1.10" in str(events["failed"]["data"])
