"""A silent client is told ``421 4.4.2`` and disconnected; a talking one is not.

``[smtp] command_timeout`` applies between commands, ``data_timeout`` while a
mail transaction is open (RFC 5321 4.5.3.2 gives DATA the longer wait), and
the command limit again once the message is answered.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from integration.harness import LOOPBACK, PostlaneServer, ServerConfig

COMMAND_TIMEOUT = 1.0
DATA_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(command_timeout=COMMAND_TIMEOUT, data_timeout=DATA_TIMEOUT)


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def reply(self) -> bytes:
        """One whole reply (every line of it); b"" at end of stream."""
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if len(line) < 4 or line[3:4] == b" ":
                return b"".join(lines)

    def say(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()


@contextmanager
def session(server: PostlaneServer) -> Iterator[Client]:
    with socket.create_connection((LOOPBACK, server.ports.plain), timeout=15) as sock:
        client = Client(sock)
        assert client.reply().startswith(b"220 ")
        yield client


def login(client: Client, server: PostlaneServer) -> None:
    assert client.say(b"EHLO client.test").startswith(b"250")
    token = base64.b64encode(f"\0app1\0{server.passwords['app1']}".encode())
    assert client.say(b"AUTH PLAIN " + token).startswith(b"235 ")


def timed_out_after(client: Client, since: float) -> float:
    """Seconds from ``since`` until the 421 came; asserts it is followed by the close."""
    reply = client.reply()
    waited = time.monotonic() - since
    assert reply.startswith(b"421 4.4.2 ") and b"Timeout exceeded" in reply, reply
    assert client.reply() == b""  # and the connection is closed
    return waited


def test_a_silent_client_is_told_421_and_disconnected(server: PostlaneServer) -> None:
    with session(server) as client:
        assert timed_out_after(client, time.monotonic()) >= COMMAND_TIMEOUT - 0.05


def test_a_client_that_keeps_talking_outlives_the_limit(server: PostlaneServer) -> None:
    with session(server) as client:
        started = last = time.monotonic()
        while last - started < 2.5 * COMMAND_TIMEOUT:
            time.sleep(COMMAND_TIMEOUT / 3)
            assert client.say(b"NOOP").startswith(b"250 ")
            last = time.monotonic()
        assert timed_out_after(client, last) >= COMMAND_TIMEOUT - 0.05


def test_an_open_transaction_gets_the_data_timeout_then_the_command_limit_again(
    server: PostlaneServer,
) -> None:
    with session(server) as client:
        login(client, server)
        assert client.say(b"MAIL FROM:<news@acme.com>").startswith(b"250 ")
        assert client.say(b"RCPT TO:<ann@example.net>").startswith(b"250 ")
        assert client.say(b"DATA").startswith(b"354 ")
        time.sleep(2 * COMMAND_TIMEOUT)  # longer than between commands, within DATA's limit
        message = b"From: news@acme.com\r\nTo: ann@example.net\r\nSubject: slow\r\n\r\nHi.\r\n."
        reply = client.say(message)
        answered = time.monotonic()
        assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
        # The message is answered: the command limit applies, not DATA's longer one.
        waited = timed_out_after(client, answered)
        assert COMMAND_TIMEOUT - 0.05 <= waited < DATA_TIMEOUT - 0.5
