"""``postlane serve`` stops cleanly on SIGINT (Ctrl-C), as it does on SIGTERM.

SIGTERM is what every integration module's server fixture stops its server
with, asserting exit status 0 and ``postlane stopped``; this module's test
stops its server itself, with SIGINT, and the fixture then has nothing to do.
"""

from __future__ import annotations

import signal
import uuid

from integration.harness import PostlaneServer, connect, expect, send


def test_sigint_stops_serve_cleanly(server: PostlaneServer) -> None:
    subject = f"before SIGINT {uuid.uuid4().hex}"
    with connect(server.ports.plain) as busy:
        busy.ehlo()
        busy.login("app1", server.passwords["app1"])
        sent = send(
            busy,
            "news@acme.com",
            ["reader@example.net"],
            f"From: news@acme.com\r\nSubject: {subject}\r\n\r\nx\r\n".encode(),
        )
        assert sent.code == 250, sent.text

        with connect(server.ports.relay) as idle:
            idle.ehlo()
            code, out = server.stop(signal.SIGINT)
            # An idle session is told the server is going away.
            expect(idle.getreply(), 421, "4.3.2", "shutting down")
        expect(busy.getreply(), 421, "4.3.2")

    assert code == 0, server.describe()
    lines = out.splitlines()
    assert lines[0].startswith("postlane running: ")
    assert lines[-1] == "postlane stopped"
    assert not server.running
    assert server.store.message(sent.queue_id or "") is not None
