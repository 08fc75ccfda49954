"""End to end: accepted over SMTP, delivered over the network to receivers in namespaces.

See ``conftest.py`` for the set-up. Each test uses its own recipient
domain(s), so the tests share one server and two receivers without reading
each other's mail. Results are read from the server's database (recipient
rows, events, suppressions) and from what the receivers recorded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from e2e.conftest import CRASH_DOMAINS, LEASE_SECONDS, MX1_NAME, MX3_NAME, SINK_DOMAIN
from e2e.netns import SMTP_SINK, Mx, unavailable
from integration.harness import HOSTNAME, PostlaneServer, connect, send, wait_for
from postlane.store.schema import suppressions
from postlane.tenants import admin

_REASON = unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

SENDER = "news@acme.com"
DRIVER = Path(__file__).parents[1] / "unit" / "render" / "opendkim_driver.py"
WAITING = ("queued", "sending")


# -- helpers ----------------------------------------------------------------------------------


def submit(
    server: PostlaneServer,
    rcpts: list[str],
    *,
    headers: Mapping[str, str] | None = None,
    subject: str | None = None,
    body: str = "Hello from Postlane.\r\n",
) -> str:
    """One message, submitted as app1 on the plaintext submission port; its queue id."""
    subject = subject or f"e2e {uuid.uuid4().hex}"
    head = f"From: {SENDER}\r\nTo: {rcpts[0]}\r\nSubject: {subject}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with connect(server.ports.plain) as client:
        client.ehlo()
        client.login("app1", server.passwords["app1"])
        sent = send(client, SENDER, rcpts, (head + "\r\n" + body).encode())
    assert sent.code == 250 and sent.queue_id, sent.text
    return sent.queue_id


def rows_by_address(server: PostlaneServer, queue_id: str) -> dict[str, Mapping[str, Any]]:
    return {r["address"]: r for r in server.store.recipients(queue_id)}


def wait_statuses(
    server: PostlaneServer,
    queue_id: str,
    done: Callable[[str], bool] = lambda status: status not in WAITING,
    timeout: float = 20,
) -> dict[str, Mapping[str, Any]]:
    """The recipient rows once every one's status satisfies ``done``."""

    def probe() -> dict[str, Mapping[str, Any]] | None:
        rows = rows_by_address(server, queue_id)
        return rows if rows and all(done(r["status"]) for r in rows.values()) else None

    return wait_for(probe, timeout=timeout)


def events_of(server: PostlaneServer, queue_id: str, recipient_id: int) -> list[Mapping[str, Any]]:
    return [e for e in server.store.events(queue_id) if e["recipient_id"] == recipient_id]


def last_event(
    server: PostlaneServer, queue_id: str, recipient_id: int, kind: str
) -> Mapping[str, Any]:
    found = [e for e in events_of(server, queue_id, recipient_id) if e["type"] == kind]
    assert found, f"no {kind} event: {events_of(server, queue_id, recipient_id)}"
    data = found[-1]["data"]
    return json.loads(data) if isinstance(data, str) else data


def dkim_table(server: PostlaneServer, domain: str) -> dict[str, str]:
    """The DKIM TXT records the domain publishes, as ``postlane domain dns`` prints them."""
    return {
        record.name.rstrip("."): record.value
        for record in admin.domain_records(server.db, domain, HOSTNAME)
        if record.type == "TXT" and "._domainkey." in record.name
    }


def opendkim_unavailable() -> str | None:
    if shutil.which("opendkim-testmsg") is None:
        return "opendkim-testmsg is not installed (Debian package opendkim-tools)"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux) to give OpenDKIM a private DNS"
    return None


def opendkim_verify(message: bytes, table: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    """opendkim-testmsg's verdict, with a private DNS (see tests/unit/render/opendkim_driver.py)."""
    path = tmp_path / f"message-{len(list(tmp_path.iterdir()))}.eml"
    path.write_bytes(message)
    run = subprocess.run(
        ["unshare", "--mount", "--net", sys.executable, str(DRIVER), json.dumps(table), str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return run.returncode, run.stderr.decode(errors="replace")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


# -- 1. opportunistic TLS, DKIM ------------------------------------------------------------------


def test_delivered_over_starttls_and_dkim_verifies(
    server: PostlaneServer, mxs: dict[str, Mx], tmp_path: Path
) -> None:
    reason = opendkim_unavailable()
    if reason is not None:
        pytest.skip(reason)
    rcpt = "reader@tls.test"
    subject = f"tls {uuid.uuid4().hex}"
    queue_id = submit(server, [rcpt], subject=subject)
    row = wait_statuses(server, queue_id)[rcpt]
    assert row["status"] == "delivered", row

    data = last_event(server, queue_id, row["id"], "delivered")
    assert data["mx"] == MX1_NAME
    assert data["ip"] == mxs["mx1"].ip
    assert str(data["tls"]).startswith("TLSv1."), data
    assert str(data["reply"]).startswith("250"), data

    received = mxs["mx1"].received(rcpt)
    assert len(received) == 1, received
    copy = received[0]
    assert copy["tls"] is True, "the receiver did not see STARTTLS"
    assert subject.encode() in copy["data"]
    assert b"DKIM-Signature:" in copy["data"]

    table = dkim_table(server, "acme.com")
    assert table, "acme.com publishes no DKIM record"
    status, err = opendkim_verify(copy["data"], table, tmp_path)
    assert status == 0, f"opendkim-testmsg: {err}"
    # The verdict is real: a changed body does not verify.
    tampered = copy["data"].replace(b"Hello from Postlane", b"Hello from Mallory!")
    assert tampered != copy["data"]
    status, err = opendkim_verify(tampered, table, tmp_path)
    assert status != 0, "opendkim-testmsg accepted a tampered copy"


# -- 2. hard bounce -------------------------------------------------------------------------------


def test_delivered_to_postfix_smtp_sink_in_a_namespace(
    server: PostlaneServer, mxs: dict[str, Mx]
) -> None:
    """The production path (MX, A, port 25 of another host) to a Postfix component."""
    if "mx3" not in mxs:
        pytest.skip(f"{SMTP_SINK} is not installed (Debian package postfix)")
    queue_id = submit(server, [f"reader@{SINK_DOMAIN}"])
    rows = wait_statuses(server, queue_id)
    row = rows[f"reader@{SINK_DOMAIN}"]
    assert row["status"] == "delivered", row
    (delivered,) = [e for e in events_of(server, queue_id, row["id"]) if e["type"] == "delivered"]
    assert delivered["data"]["mx"] == MX3_NAME
    assert delivered["data"]["ip"] == mxs["mx3"].ip
    assert delivered["data"]["tls"] is None  # smtp-sink offers no STARTTLS
    assert str(delivered["data"]["reply"]).startswith("250")


def test_550_fails_suppresses_and_is_not_retried(
    server: PostlaneServer, mxs: dict[str, Mx]
) -> None:
    mx1 = mxs["mx1"]
    rcpt = "gone@bounce.test"
    mx1.add_replies({rcpt: ["550 5.1.1 <gone@bounce.test>: Recipient address rejected"]})
    queue_id = submit(server, [rcpt])
    row = wait_statuses(server, queue_id)[rcpt]
    assert row["status"] == "failed", row
    data = last_event(server, queue_id, row["id"], "failed")
    assert data.get("status") == "5.1.1", data
    assert data["mx"] == MX1_NAME

    with server.db.connect() as conn:
        suppressed = conn.execute(
            sa.select(suppressions.c.reason).where(
                suppressions.c.account_id == server.account_id("acme"),
                suppressions.c.address == rcpt,
            )
        ).all()
    assert suppressed, "no suppression row for the hard bounce"

    # No retry: the receiver saw exactly one RCPT; the row stays failed.
    time.sleep(1.5)
    assert mx1.rcpt_attempts(rcpt) == ["550"]
    assert rows_by_address(server, queue_id)[rcpt]["status"] == "failed"
    assert not any(e["type"] == "deferred" for e in events_of(server, queue_id, row["id"]))

    # And the next message to that address is not even offered to the MX.
    again = submit(server, [rcpt])
    assert wait_statuses(server, again)[rcpt]["status"] == "suppressed"
    time.sleep(0.5)
    assert mx1.rcpt_attempts(rcpt) == ["550"]


# -- 3. null MX, SERVFAIL -------------------------------------------------------------------------


def test_null_mx_fails_and_servfail_defers(server: PostlaneServer) -> None:
    null_rcpt, broken_rcpt = "someone@nullmx.test", "someone@broken.test"
    before = datetime.now(UTC)
    queue_id = submit(server, [null_rcpt, broken_rcpt])
    rows = wait_statuses(server, queue_id)
    assert rows[null_rcpt]["status"] == "failed", rows[null_rcpt]
    assert "5.1.10" in json.dumps(last_event(server, queue_id, rows[null_rcpt]["id"], "failed"))

    assert rows[broken_rcpt]["status"] == "deferred", rows[broken_rcpt]
    data = last_event(server, queue_id, rows[broken_rcpt]["id"], "deferred")
    assert str(data.get("status", "")).startswith("4."), data
    next_attempt = rows[broken_rcpt]["next_attempt_at"]
    if next_attempt.tzinfo is None:
        next_attempt = next_attempt.replace(tzinfo=UTC)
    assert next_attempt >= before + timedelta(seconds=59), next_attempt


# -- 4. 4xx, then delivered on the retry -----------------------------------------------------------


def test_451_defers_then_the_retry_delivers(server: PostlaneServer, mxs: dict[str, Mx]) -> None:
    mx1 = mxs["mx1"]
    rcpt = "later@retry.test"
    mx1.add_replies({rcpt: ["451 4.7.1 Greylisted, come back later", "250 2.1.5 Ok"]})
    queue_id = submit(server, [rcpt])
    row = wait_statuses(server, queue_id)[rcpt]
    assert row["status"] == "deferred", row
    assert mx1.rcpt_attempts(rcpt) == ["451"]
    assert mx1.received(rcpt) == []
    assert str(last_event(server, queue_id, row["id"], "deferred").get("status")) == "4.7.1"

    # The earliest retry is a minute away: make it due now, as an operator would.
    server.cli("queue", "retry", str(row["id"]))
    row = wait_statuses(server, queue_id)[rcpt]
    assert row["status"] == "delivered", row
    assert mx1.rcpt_attempts(rcpt) == ["451", "250"]
    assert len(mx1.received(rcpt)) == 1
    kinds = [e["type"] for e in events_of(server, queue_id, row["id"])]
    assert kinds.index("deferred") < kinds.index("delivered"), kinds


# -- 5. required TLS ------------------------------------------------------------------------------


def test_required_tls_is_not_sent_to_a_server_without_starttls(
    server: PostlaneServer, mxs: dict[str, Mx]
) -> None:
    mx2 = mxs["mx2"]
    # Control: without the header the same server gets the mail (in plaintext).
    control = submit(server, ["control@plain.test"])
    row = wait_statuses(server, control)["control@plain.test"]
    assert row["status"] == "delivered", row
    assert not last_event(server, control, row["id"], "delivered")["tls"]
    assert len(mx2.received("control@plain.test")) == 1

    rcpt = "secret@plain.test"
    queue_id = submit(server, [rcpt], headers={"X-OV-Require-TLS": "yes"})
    row = wait_statuses(server, queue_id)[rcpt]
    assert row["status"] == "deferred", row
    data = last_event(server, queue_id, row["id"], "deferred")
    assert "TLS" in json.dumps(data) or "TLS" in str(row["last_reply"]), (data, row)
    assert mx2.received(rcpt) == []


# -- 6. priority ---------------------------------------------------------------------------------


def test_priority_1_overtakes_a_bulk_send(server: PostlaneServer, mxs: dict[str, Mx]) -> None:
    mx1 = mxs["mx1"]
    later = iso(datetime.now(UTC) + timedelta(hours=1))
    bulk = [f"bulk{i}@prio.test" for i in range(8)]
    bulk_id = submit(server, bulk, headers={"X-NextLaunchTime": later})
    vip = "vip@prio.test"
    vip_id = submit(server, [vip], headers={"X-NextLaunchTime": later, "X-Priority": "1"})
    assert rows_by_address(server, vip_id)[vip]["priority"] == 1
    assert {r["priority"] for r in rows_by_address(server, bulk_id).values()} == {3}

    # Hold the domain and release it (the rows keep their launch time), then
    # retry it: every row becomes due at the same moment.
    server.cli("queue", "hold", "--domain", "prio.test")
    assert {r["status"] for r in rows_by_address(server, bulk_id).values()} == {"held"}
    assert rows_by_address(server, vip_id)[vip]["status"] == "held"
    server.cli("queue", "release", "--domain", "prio.test")
    assert {r["status"] for r in rows_by_address(server, bulk_id).values()} == {"queued"}
    server.cli("queue", "retry", "--domain", "prio.test")

    wait_statuses(server, bulk_id, lambda s: s == "delivered")
    wait_statuses(server, vip_id, lambda s: s == "delivered")
    order = [r["rcpts"][0] for r in mx1.received() if r["rcpts"][0].endswith("@prio.test")]
    assert sorted(order) == sorted([*bulk, vip]), order
    assert order[0] == vip, f"arrival order: {order}"


# -- 7. scheduled send, expiry ---------------------------------------------------------------------


def test_scheduled_send_waits_and_an_expired_one_is_not_retried(
    server: PostlaneServer, mxs: dict[str, Mx]
) -> None:
    mx1 = mxs["mx1"]
    rcpt = "scheduled@sched.test"
    launch = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)
    queue_id = submit(server, [rcpt], headers={"X-NextLaunchTime": iso(launch)})

    never = "never@sched.test"
    mx1.add_replies({never: ["451 4.2.1 Mailbox busy, try later"]})
    expiry = iso(datetime.now(UTC) + timedelta(seconds=30))
    doomed = submit(server, [never], headers={"X-LaunchExpireTime": expiry})

    time.sleep(2)
    assert rows_by_address(server, queue_id)[rcpt]["status"] == "queued"
    assert mx1.received(rcpt) == []

    row = wait_statuses(server, queue_id, timeout=15)[rcpt]
    assert row["status"] == "delivered", row
    (copy,) = mx1.received(rcpt)
    assert copy["at"] >= launch.timestamp() - 0.5, (copy["at"], launch.timestamp())

    # 451 with the expiry closer than the minimum retry delay: expired, not deferred.
    row = wait_statuses(server, doomed, timeout=10)[never]
    assert row["status"] == "expired", row
    assert mx1.rcpt_attempts(never) == ["451"]
    assert any(e["type"] == "expired" for e in events_of(server, doomed, row["id"]))


# -- 8. worker killed mid-batch -----------------------------------------------------------------


def test_killed_worker_loses_nothing_and_resends_only_what_was_in_flight(
    server: PostlaneServer, mxs: dict[str, Mx]
) -> None:
    mx1 = mxs["mx1"]
    for domain in CRASH_DOMAINS:
        mx1.add_delay(domain, 0.25)
    # Domain by domain, so each leased batch (10 rows) is mostly one domain's group.
    rcpts = [f"c{i:02d}@{domain}" for domain in CRASH_DOMAINS for i in range(10)]
    queue_id = submit(server, rcpts)

    def crash_copies() -> list[str]:
        return [r["rcpts"][0] for r in mx1.received() if r["rcpts"][0] in rcpts]

    wait_for(lambda: True if len(crash_copies()) >= 13 else None, timeout=20)
    server.kill()
    killed_at = time.monotonic()
    at_kill = rows_by_address(server, queue_id)
    in_flight = {a for a, r in at_kill.items() if r["status"] == "sending"}
    recorded = {a for a, r in at_kill.items() if r["status"] == "delivered"}
    statuses = Counter(r["status"] for r in at_kill.values())
    replies = Counter(str(r["last_reply"]) for r in at_kill.values())
    assert in_flight, f"nothing was in flight when the worker was killed: {statuses} {replies}"
    assert len(recorded) < len(rcpts)

    # Restart once the dead worker's leases have run out: its sweep takes them back.
    time.sleep(max(0.0, LEASE_SECONDS + 1 - (time.monotonic() - killed_at)))
    for domain in CRASH_DOMAINS:
        mx1.add_delay(domain, 0)
    server.start()
    rows = wait_statuses(server, queue_id, lambda s: s == "delivered", timeout=30)
    assert len(rows) == len(rcpts)

    copies = Counter(crash_copies())
    assert set(copies) == set(rcpts), sorted(set(rcpts) - set(copies))
    twice = {a for a, n in copies.items() if n > 1}
    # Never resent: anything the worker had recorded as delivered.
    assert twice <= in_flight, sorted(twice - in_flight)
    assert max(copies.values()) <= 2
    # Resent at most the copy each connection was sending when the worker died:
    # the last one the receiver took on that connection, one per connection.
    first_copies: dict[str, dict[str, Any]] = {}
    last_on: dict[int, str] = {}
    for record in mx1.received():  # in arrival order
        address = record["rcpts"][0]
        if address in rcpts:
            first_copies.setdefault(address, record)
            last_on[record["connection"]] = address
    resent_from = Counter(first_copies[a]["connection"] for a in twice)
    assert all(n == 1 for n in resent_from.values()), (
        f"recipients resent after the kill: {sorted(twice)}, "
        f"first sent over connections {dict(resent_from)}"
    )
    assert all(last_on[first_copies[a]["connection"]] == a for a in twice), sorted(twice)
