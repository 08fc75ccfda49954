"""``[smtp] commit_process = false``: intake commits in a thread of its own process."""

from __future__ import annotations

import pytest

from integration.harness import PostlaneServer, ServerConfig, children, connect, send


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    return ServerConfig(commit_process=False)


def test_messages_are_committed_without_a_commit_process(server: PostlaneServer) -> None:
    assert server.process is not None
    assert "commit (own process)" not in server.stdout
    assert children(server.process.pid) == []
    with connect(server.ports.plain) as session:
        session.login("app1", server.passwords["app1"])
        sent = send(
            session,
            "news@acme.com",
            ["reader@example.org"],
            b"From: news@acme.com\r\nSubject: in a thread\r\n\r\nHi.\r\n",
        )
    assert sent.code == 250, sent.text
    assert sent.queue_id is not None
    assert server.store.recipients(sent.queue_id)[0]["address"] == "reader@example.org"
