"""AUTH guessing is cut off: ``[auth] max_failures`` per client IP and per user name.

This module has its own server (every module does), so the failures counted
here do not disturb other tests, and the tests below each use their own
client address and user names.
"""

from __future__ import annotations

import pytest

from integration.harness import (
    PostlaneServer,
    ServerConfig,
    auth_plain,
    closed_by_server,
    connect,
    expect,
)

MAX_FAILURES = 5


def _prepare(server: PostlaneServer) -> None:
    for name in ("victim", "bystander", "neighbour"):
        server.add_user("acme", name)


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(prepare=_prepare, max_failures=MAX_FAILURES)


def test_too_many_failures_from_one_address(server: PostlaneServer) -> None:
    attacker = "127.0.2.1"
    with server.store.nothing_stored():
        with connect(server.ports.plain, source=attacker) as client:
            client.ehlo()
            for attempt in range(1, MAX_FAILURES):
                reply = auth_plain(client, f"guess{attempt}", "wrong")
                expect(reply, 535, "5.7.8")
                assert not closed_by_server(client, timeout=0.1), f"closed after {attempt}"
            # The failure that reaches the limit is answered with 421 and a hang-up.
            expect(auth_plain(client, "guess5", "wrong"), 421, "4.7.0", "Too many failed")
            assert closed_by_server(client)

        # From that address even the right password is refused now, without a check.
        with connect(server.ports.plain, source=attacker) as client:
            client.ehlo()
            expect(
                auth_plain(client, "bystander", server.passwords["bystander"]),
                421,
                "4.7.0",
                "Too many failed authentications",
            )
            assert closed_by_server(client)

    # Another address is not affected.
    with connect(server.ports.plain, source="127.0.2.2") as client:
        client.ehlo()
        expect(auth_plain(client, "bystander", server.passwords["bystander"]), 235, "2.7.0")


def test_too_many_failures_for_one_user(server: PostlaneServer) -> None:
    """Guessing one user's password from many addresses locks that user name."""
    for n in range(MAX_FAILURES):
        with connect(server.ports.plain, source=f"127.0.3.{n + 1}") as client:
            client.ehlo()
            code, _ = auth_plain(client, "victim", f"wrong{n}")
            assert code in (535, 421)
    with connect(server.ports.plain, source="127.0.3.100") as client:
        client.ehlo()
        expect(
            auth_plain(client, "victim", server.passwords["victim"]),
            421,
            "4.7.0",
            "Too many failed authentications",
        )
        assert closed_by_server(client)
    # Other users from that fresh address are fine.
    with connect(server.ports.plain, source="127.0.3.100") as client:
        client.ehlo()
        expect(auth_plain(client, "neighbour", server.passwords["neighbour"]), 235, "2.7.0")
