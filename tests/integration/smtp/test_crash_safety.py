"""``250`` means stored: a server killed with SIGKILL mid-stream has lost nothing it acknowledged.

Several clients send messages (three recipients each, a unique marker in each
body) as fast as they can over the plaintext submission port; after about two
seconds the server is killed with SIGKILL, so no shutdown code runs. Then:

* every message that got ``250`` is in the database under the queue id its
  reply named, with all three recipient rows and its marker in the raw bytes;
* every message in the database got ``250``, except at most one per client:
  the message that client had sent and was awaiting a reply for at the kill.
  A commit can finish just before the kill with its ``250`` never reaching the
  client, and the client cannot know; that message may be there or not, but
  if it is, it is whole (three recipients), never half written.

Finally the server starts again on the same database and takes mail.
"""

from __future__ import annotations

import smtplib
import threading
import time
import uuid
from dataclasses import dataclass, field

from integration.harness import PostlaneServer, connect, queue_id, send

CLIENTS = 4
SENDING_SECONDS = 2.0
RECIPIENTS = ["r1@example.net", "r2@example.org", "r3@example.com"]


@dataclass
class Client:
    """What one connection knows: the messages acknowledged, and the one in flight."""

    number: int
    acknowledged: dict[str, str] = field(default_factory=dict)  # marker -> queue id
    in_flight: str | None = None
    refused: list[str] = field(default_factory=list)
    error: BaseException | None = None


def _message(marker: str) -> bytes:
    return (
        f"From: news@acme.com\r\nTo: undisclosed-recipients:;\r\nSubject: crash {marker}\r\n"
        f"\r\nmarker {marker}\r\n"
    ).encode()


def _sender(server: PostlaneServer, client: Client, started: threading.Barrier) -> None:
    try:
        session = connect(server.ports.plain, timeout=30)
        session.login("app1", server.passwords["app1"])
    except BaseException as exc:
        client.error = exc
        started.abort()
        return
    started.wait()
    try:
        while True:
            marker = f"{client.number}-{uuid.uuid4().hex}"
            client.in_flight = marker
            sent = send(session, "news@acme.com", RECIPIENTS, _message(marker))
            if sent.code != 250:
                client.refused.append(f"{sent.code} {sent.text}")
                return
            assert sent.queue_id is not None
            client.acknowledged[marker] = sent.queue_id
            client.in_flight = None
    except (smtplib.SMTPException, OSError):
        return  # the server is gone; in_flight names what it may or may not have kept
    except BaseException as exc:
        client.error = exc


def test_nothing_acknowledged_is_lost(server: PostlaneServer) -> None:
    clients = [Client(n) for n in range(CLIENTS)]
    started = threading.Barrier(CLIENTS + 1, timeout=30)
    threads = [
        threading.Thread(target=_sender, args=(server, c, started), daemon=True) for c in clients
    ]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(SENDING_SECONDS)  # let them send; this is the test's subject, not a wait
    server.kill()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()

    for client in clients:
        assert client.error is None, repr(client.error)
        assert client.refused == []
    acknowledged = {m: q for c in clients for m, q in c.acknowledged.items()}
    in_flight = {c.in_flight for c in clients if c.in_flight is not None}
    assert len(acknowledged) > CLIENTS, "too few messages were sent to show anything"

    stored = {m["id"]: m for m in server.store.all_messages()}
    rows: dict[str, list[str]] = {}
    for r in server.store.all_recipients():
        rows.setdefault(r["message_id"], []).append(r["address"])

    # Everything acknowledged is there, whole.
    for marker, qid in acknowledged.items():
        assert qid in stored, f"acknowledged {qid} ({marker}) is missing"
        assert f"marker {marker}".encode() in stored[qid]["raw"]
        assert sorted(rows.get(qid, [])) == sorted(RECIPIENTS), qid

    # Everything there was acknowledged, or was some client's message in flight.
    extra = set(stored) - set(acknowledged.values())
    assert len(extra) <= len(in_flight)
    for qid in extra:
        markers = [m for m in in_flight if f"marker {m}".encode() in stored[qid]["raw"]]
        assert len(markers) == 1, f"{qid} was stored but never sent or acknowledged"
        assert sorted(rows.get(qid, [])) == sorted(RECIPIENTS), qid
    assert set(rows) <= set(stored)

    # The server starts again on the same database and takes mail.
    server.start()
    with connect(server.ports.plain) as session:
        session.login("app1", server.passwords["app1"])
        sent = send(session, "news@acme.com", RECIPIENTS, _message("after-restart"))
    assert sent.code == 250, sent.text
    assert server.store.message(queue_id(sent.text)) is not None
    assert len(server.store.all_messages()) == len(stored) + 1
