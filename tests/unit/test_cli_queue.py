"""The `postlane queue` commands, run in-process against both databases."""

from __future__ import annotations

import re
import sys

import pytest
import sqlalchemy as sa

from postlane import cli
from postlane.store import Database
from postlane.store.schema import events, recipients
from unit.cli_runner import Run, enqueue, fails, ok


def statuses(database_url: str) -> dict[int, str]:
    db = Database.from_url(database_url)
    try:
        with db.connect() as conn:
            query = sa.select(recipients.c.id, recipients.c.status)
            return dict(conn.execute(query).tuples().all())
    finally:
        db.dispose()


def event_types(database_url: str, recipient_id: int) -> list[str]:
    db = Database.from_url(database_url)
    try:
        with db.connect() as conn:
            query = (
                sa.select(events.c.type)
                .where(events.c.recipient_id == recipient_id)
                .order_by(events.c.id)
            )
            return list(conn.execute(query).scalars())
    finally:
        db.dispose()


def test_queue_list_and_show(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    ok(run("account", "create", "globex"))
    a1, a2 = enqueue(database_url, "acme", "QACME", "ann@example.org", "bob@other.net")
    enqueue(database_url, "globex", "QGLOBEX", "cy@example.org")

    out = ok(run("queue", "list"))
    assert out.index("QGLOBEX") < out.index("QACME")  # newest first
    for text in ("ann@example.org", "bob@other.net", "cy@example.org", "info@acme.com"):
        assert text in out
    assert "Subject of QACME" in out and "globex" in out

    out = ok(run("queue", "list", "--account", "acme"))
    assert "ann@example.org" in out and "bob@other.net" in out and "cy@example.org" not in out
    out = ok(run("queue", "list", "--domain", "EXAMPLE.org"))
    assert "ann@example.org" in out and "cy@example.org" in out and "bob@" not in out
    out = ok(run("queue", "list", "--status", "held"))
    assert "@" not in out
    out = ok(run("queue", "list", "--limit", "1"))
    assert "cy@example.org" in out and "ann@" not in out

    out = ok(run("queue", "show", str(a1)))
    assert re.search(rf"id\s+│ {a1}\b", out)
    for text in ("QACME", "ann@example.org", "queued", "lease", "none", "accepted"):
        assert text in out
    assert "bob@other.net" not in out
    assert "QACME" in ok(run("queue", "show", str(a2)))


def test_queue_actions(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    ok(run("account", "create", "globex"))
    a1, a2, a3 = enqueue(
        database_url, "acme", "QACME", "ann@example.org", "bob@other.net", "cid@example.org"
    )
    (g1,) = enqueue(database_url, "globex", "QGLOBEX", "cy@example.org")

    assert "2 recipient(s) held" in ok(run("queue", "hold", str(a1), str(a2)))
    assert statuses(database_url) == {a1: "held", a2: "held", a3: "queued", g1: "queued"}
    assert "2 recipient(s) due now" in ok(run("queue", "retry", "--domain", "example.org"))
    assert "1 recipient(s) released" in ok(
        run("queue", "release", "--account", "acme", "--domain", "other.net")
    )
    assert statuses(database_url)[a2] == "queued"
    assert "1 recipient(s) cancelled" in ok(run("queue", "cancel", "--account", "globex"))
    assert "3 recipient(s) cancelled" in ok(run("queue", "cancel", "--all"))  # held ones too
    assert set(statuses(database_url).values()) == {"cancelled"}
    assert "0 recipient(s) released" in ok(run("queue", "release", "999"))
    assert event_types(database_url, a1) == ["queued", "held", "cancelled"]
    assert event_types(database_url, a2) == ["queued", "held", "released", "cancelled"]
    assert event_types(database_url, a3) == ["queued", "retried", "cancelled"]


def test_queue_bad_input(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    (a1,) = enqueue(database_url, "acme", "QACME", "ann@example.org")
    for action in ("retry", "hold", "release", "cancel"):
        fails(run("queue", action), "error: name ids, --account or --domain")
        fails(run("queue", action, "--account", "ghost"), "error: account 'ghost' not found")
        fails(run("queue", action, "12", "x1"), "error: recipient id 'x1' is not a number")
    fails(run("queue", "list", "--account", "ghost"), "error: account 'ghost' not found")
    fails(run("queue", "list", "--status", "lost"), "error: status 'lost' is invalid")
    fails(run("queue", "list", "--limit", "many"), "error: limit 'many' is not a number")
    fails(run("queue", "list", "--domain", "bad domain"), "domain")
    fails(run("queue", "show", "abc"), "error: recipient id 'abc' is not a number")
    fails(run("queue", "show", "987654"), "error: recipient 987654 not found")
    fails(run("queue", "show", "99999999999999999999"), "is not a number")
    assert statuses(database_url) == {a1: "queued"}


def test_every_queue_command_has_help_with_example(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("list", "show", "retry", "cancel", "hold", "release"):
        monkeypatch.setattr(sys, "argv", ["postlane", "queue", command, "--help"])
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert info.value.code in (0, None)
        assert "Example: postlane queue " in capsys.readouterr().out, command
