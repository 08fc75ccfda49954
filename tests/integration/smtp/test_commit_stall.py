"""A commit process that stops answering, and more connections than a listener takes.

With the commit process stopped (SIGSTOP), a session waited after DATA for as
long as the process stayed stopped: the client timed out, nothing was
logged, and the message was committed and logged ``accepted`` long after the
client had given up. Now each message gets ``451 4.3.0`` at
``[smtp] commit_timeout`` (1 s here), the stall is logged once as an ERROR,
what commits later is logged at INFO, and the client's retry of such a
message is recognised as a duplicate of what committed.

``[smtp] max_connections`` (3 here) refuses a listener's fourth connection
with ``421 4.7.0``.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

import pytest

from integration.harness import (
    LOOPBACK,
    PostlaneServer,
    ServerConfig,
    connect,
    role_children,
    send,
    wait_for,
)

MAX_CONNECTIONS = 3
RECIPIENTS = ["reader@example.net"]


def _limits(server: PostlaneServer) -> None:
    # The settings file's [smtp] table is the harness's: the environment adds to it.
    server.env["POSTLANE_SMTP__COMMIT_TIMEOUT"] = "1"
    server.env["POSTLANE_SMTP__MAX_CONNECTIONS"] = str(MAX_CONNECTIONS)


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(prepare=_limits)


def _message(subject: str) -> bytes:
    return (
        f"From: news@acme.com\r\nSubject: {subject}\r\nMessage-ID: <{subject}@acme.com>\r\n"
        "\r\nHello.\r\n"
    ).encode()


def _log_when(server: PostlaneServer, ready: Callable[[str], bool]) -> str:
    """The serve log once ``ready`` says so (INFO lines are written in batches)."""

    def probe() -> str | None:
        text = server.log_path.read_text()
        return text if ready(text) else None

    return wait_for(probe, timeout=15)


def test_a_stopped_commit_process_means_451_at_the_deadline_and_one_error_line(
    server: PostlaneServer,
) -> None:
    assert server.process is not None
    (commit,) = wait_for(lambda: role_children(server.process.pid, "commit") or None, 10)
    subjects = [f"stalled-{n}-{time.monotonic_ns()}" for n in range(2)]
    os.kill(commit, signal.SIGSTOP)
    try:
        with connect(server.ports.plain, timeout=60) as session:
            session.login("app1", server.passwords["app1"])
            started = time.monotonic()
            stalled = [send(session, "news@acme.com", RECIPIENTS, _message(s)) for s in subjects]
            took = time.monotonic() - started
    finally:
        os.kill(commit, signal.SIGCONT)
    for sent in stalled:
        assert (sent.code, sent.text.split(" ")[0]) == (451, "4.3.0"), sent
    assert took < 30  # two deadlines of 1 s, generously (the client would wait 60 s)

    # both were sent before their deadline, so both commit once the process runs again
    _log_when(server, lambda log: log.count("committed after its session gave up") == 2)
    with connect(server.ports.plain) as session:  # commits are answered again
        session.login("app1", server.passwords["app1"])
        fresh = send(session, "news@acme.com", RECIPIENTS, _message(f"fresh-{subjects[0]}"))
        assert fresh.code == 250, fresh
        # the client's retry of a message that committed after its 451
        stored = wait_for(lambda: server.store.messages_with_subject(subjects[0]) or None)
        retry = send(session, "news@acme.com", RECIPIENTS, _message(subjects[0]))
    assert retry.code == 250, retry
    assert retry.queue_id == stored[0]["id"]  # the one committed late: not queued twice
    assert len(server.store.messages_with_subject(subjects[0])) == 1

    log = _log_when(server, lambda log: f"duplicate_of={retry.queue_id}" in log)
    assert log.count("commit not answered in 1 s (smtp.commit_timeout)") == 1  # once a stall
    assert "commits are answered again after a stall" in log
    assert log.count("result=accepted") == 2  # the fresh one and the retry: never the stalled


def _greeting(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def test_a_connection_above_max_connections_gets_421_and_is_closed(
    server: PostlaneServer,
) -> None:
    address = (LOOPBACK, server.ports.plain)
    held = [socket.create_connection(address, timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        assert all(_greeting(s).startswith(b"220 ") for s in held)
        with socket.create_connection(address, timeout=10) as extra:
            assert _greeting(extra) == b"421 4.7.0 Too many connections, try again later\r\n"
            assert extra.recv(1024) == b""  # and closed
        held.pop().close()

        def admitted() -> bool | None:
            with socket.create_connection(address, timeout=10) as again:
                return True if _greeting(again).startswith(b"220 ") else None

        wait_for(admitted)  # once the server has seen the close, there is room again
    finally:
        for sock in held:
            sock.close()
    _log_when(server, lambda log: "has 3 connections (smtp.max_connections)" in log)
