"""``[smtp] processes = 2``: two intake processes share every listening port.

The first ``postlane serve`` starts the second (``serve --role smtp
--no-metrics``); the kernel spreads connections over both (SO_REUSEPORT), and
each accepts mail into the same queue.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from contextlib import ExitStack

import pytest

from integration.harness import (
    PostlaneServer,
    ServerConfig,
    connect,
    role_children,
    send,
    wait_for,
)
from postlane.smtp import tls

from .test_proxy_and_reload import _peer_certificate


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(smtp_processes=2)


def _owners(port: int) -> set[int]:
    """Pids of the processes holding established connections on ``port`` (from ss)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(part.split("pid=")[1].split(",")[0]) for part in out.split() if "pid=" in part}


def test_connections_are_spread_over_both_processes_and_all_accepted(
    server: PostlaneServer,
) -> None:
    assert server.process is not None
    assert "smtp 2 (own process)" in server.stdout
    (child,) = wait_for(lambda: role_children(server.process.pid, "smtp") or None, timeout=10)
    subject = f"two processes {uuid.uuid4().hex}"
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(server.ports.plain)) for _ in range(24)]
        for client in clients:
            client.ehlo()
        # 24 connections all on one of two sockets: about 1 in 8 million.
        assert _owners(server.ports.plain) == {server.process.pid, child}
        for client in clients:
            client.login("app1", server.passwords["app1"])
            sent = send(
                client,
                "news@acme.com",
                ["reader@example.org"],
                f"From: news@acme.com\r\nTo: reader@example.org\r\nSubject: {subject}\r\n\r\n"
                "Hi.\r\n".encode(),
            )
            assert sent.code == 250, sent.text
    assert len(server.store.messages_with_subject(subject)) == 24


def test_sighup_reaches_the_second_process(server: PostlaneServer) -> None:
    """A renewed certificate is served by both processes after one SIGHUP to the first."""
    assert server.process is not None
    (child,) = wait_for(lambda: role_children(server.process.pid, "smtp") or None, timeout=10)
    before = _peer_certificate(server.ports.implicit).serial_number
    key = server.cert_path.with_suffix(".key")
    tls.write_self_signed("mail.postlane.test", server.cert_path, key)
    server.send_signal(signal.SIGHUP)
    wait_for(lambda: _peer_certificate(server.ports.implicit).serial_number != before or None)
    # 16 new connections, spread over both processes: each shows the new certificate
    serials = {_peer_certificate(server.ports.implicit).serial_number for _ in range(16)}
    assert before not in serials and len(serials) == 1
    assert role_children(server.process.pid, "smtp") == [child]  # reloaded, not restarted
