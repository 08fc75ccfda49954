"""A session that logged in stops sending once its user's password is reset or the
user is disabled: its next MAIL gets ``421 4.7.0`` and the connection is closed.

Before, only new AUTHs were refused; a session kept alive with NOOPs sent on
with the old (perhaps leaked) password for as long as it liked.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable

import pytest

from integration.harness import (
    PostlaneServer,
    ServerConfig,
    auth_plain,
    closed_by_server,
    connect,
    expect,
    wait_for,
)


def _prepare(server: PostlaneServer) -> None:
    for name in ("leaked", "departed", "steady"):
        server.add_user("acme", name)


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(prepare=_prepare)


def _refused_within_a_refresh(client: smtplib.SMTP) -> tuple[int, bytes]:
    """MAIL (then RSET) on the open session until it is refused; that refusal."""

    def probe() -> tuple[int, bytes] | None:
        expect(client.noop(), 250, "2.0.0")
        reply = client.mail("news@acme.com")
        if reply[0] == 250:
            client.rset()
            return None
        return reply

    return wait_for(probe)


@pytest.mark.parametrize(
    ("user", "change"),
    [
        ("leaked", lambda server: server.cli("smtp-user", "reset-password", "leaked")),
        ("departed", lambda server: server.cli("smtp-user", "disable", "departed")),
    ],
)
def test_an_open_session_is_cut_off(
    server: PostlaneServer, user: str, change: Callable[[PostlaneServer], object]
) -> None:
    with server.store.nothing_stored(), connect(server.ports.plain) as client:
        client.ehlo()
        expect(auth_plain(client, user, server.passwords[user]), 235, "2.7.0")
        expect(client.mail("news@acme.com"), 250, "2.1.0")
        client.rset()
        change(server)
        reply = _refused_within_a_refresh(client)
        expect(reply, 421, "4.7.0", "Credentials changed or revoked")
        assert closed_by_server(client)


def test_other_sessions_go_on(server: PostlaneServer) -> None:
    with connect(server.ports.plain) as client:
        client.ehlo()
        expect(auth_plain(client, "steady", server.passwords["steady"]), 235, "2.7.0")
        server.cli("smtp-user", "reset-password", "leaked")  # somebody else's reset
        for _ in range(3):
            expect(client.mail("news@acme.com"), 250, "2.1.0")
            client.rset()
            assert not closed_by_server(client, timeout=0.5)
