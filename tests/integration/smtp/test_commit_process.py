"""The commit process: killed while clients send, nothing acknowledged is lost.

Intake processes hand each message to the commit process and answer ``250``
only after it committed. Here four clients send as fast as they can; the
commit process is killed with SIGKILL mid-stream. Then:

* each client got only ``250`` or ``451 4.3.0`` (for what was in flight);
* every message that got ``250`` is stored, whole, under the id its reply named;
* the supervisor starts a new commit process and the same sessions go on
  getting ``250`` (their next commit reconnects);
* a stored message that got ``451`` was one some client had in flight.
"""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
import uuid
from dataclasses import dataclass, field

from integration.harness import PostlaneServer, connect, role_children, send, wait_for

CLIENTS = 4
RECIPIENTS = ["r1@example.net", "r2@example.org"]


@dataclass
class Client:
    number: int
    acknowledged: dict[str, str] = field(default_factory=dict)  # marker -> queue id
    deferred: list[tuple[str, str]] = field(default_factory=list)  # (marker, reply)
    error: BaseException | None = None


def _message(marker: str) -> bytes:
    return f"From: news@acme.com\r\nSubject: commit {marker}\r\n\r\nmarker {marker}\r\n".encode()


def _sender(server: PostlaneServer, client: Client, stop: threading.Event) -> None:
    try:
        with connect(server.ports.plain, timeout=30) as session:
            session.login("app1", server.passwords["app1"])
            while not stop.is_set():
                marker = f"{client.number}-{uuid.uuid4().hex}"
                sent = send(session, "news@acme.com", RECIPIENTS, _message(marker))
                if sent.code == 250:
                    assert sent.queue_id is not None
                    client.acknowledged[marker] = sent.queue_id
                else:
                    client.deferred.append((marker, f"{sent.code} {sent.text}"))
    except (AssertionError, smtplib.SMTPException, OSError) as exc:
        client.error = exc


def test_killing_the_commit_process_loses_nothing_acknowledged(server: PostlaneServer) -> None:
    assert server.process is not None
    assert "commit (own process)" in server.stdout
    pid = server.process.pid
    (commit,) = wait_for(lambda: role_children(pid, "commit") or None, timeout=10)
    clients = [Client(n) for n in range(CLIENTS)]
    stop = threading.Event()
    threads = [threading.Thread(target=_sender, args=(server, c, stop)) for c in clients]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(len(c.acknowledged) for c in clients) >= 20 or None)
    os.kill(commit, signal.SIGKILL)
    (again,) = wait_for(
        lambda: [c for c in role_children(pid, "commit") if c != commit] or None, timeout=15
    )
    before = {c.number: len(c.acknowledged) for c in clients}
    # every session gets 250 again, from the new commit process
    wait_for(lambda: all(len(c.acknowledged) > before[c.number] for c in clients) or None)
    time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()

    assert again != commit
    for client in clients:
        assert client.error is None, repr(client.error)
        for _, reply in client.deferred:
            assert reply.startswith("451 4.3.0"), reply
    stored = {m["id"]: m for m in server.store.all_messages()}
    rows: dict[str, list[str]] = {}
    for r in server.store.all_recipients():
        rows.setdefault(r["message_id"], []).append(r["address"])
    for client in clients:
        for marker, qid in client.acknowledged.items():
            assert qid in stored, f"acknowledged {qid} ({marker}) is missing"
            assert f"marker {marker}".encode() in stored[qid]["raw"]
            assert sorted(rows[qid]) == sorted(RECIPIENTS)
    # a deferred message may have been committed just before the kill: then it is whole
    deferred = {marker for c in clients for marker, _ in c.deferred}
    acknowledged = {qid for c in clients for qid in c.acknowledged.values()}
    for qid, message in stored.items():
        if qid in acknowledged or b"Subject: commit " not in message["raw"]:
            continue
        assert any(f"marker {m}".encode() in message["raw"] for m in deferred), qid
        assert sorted(rows[qid]) == sorted(RECIPIENTS)
