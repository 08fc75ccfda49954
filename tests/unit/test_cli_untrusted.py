"""The CLI prints stored and outside text literally, and fails in one line, never a traceback."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from postlane.store import Database
from postlane.store.schema import events, recipients
from unit.cli_runner import Run, enqueue, fails, ok

HOSTILE = "[/hide] [bold red]x [link=https://evil.example]Invoice[/link] :warning:"


def store_hostile_message(database_url: str, queue_id: str) -> int:
    """A message whose subject, last reply and event data are markup; its recipient id."""
    (rid,) = enqueue(
        database_url,
        "acme",
        queue_id,
        "bob@example.org",
        header_from="[bold]boss[/bold] <info@acme.com>",
        message_id_header="<[/hide]@acme.com>",
        subject=HOSTILE,
    )
    db = Database.from_url(database_url)
    try:
        with db.begin() as conn:
            conn.execute(
                recipients.update()
                .where(recipients.c.id == rid)
                .values(last_reply="451 [/hide] try [bold red]later")
            )
            account_id = conn.execute(
                sa.select(recipients.c.account_id).where(recipients.c.id == rid)
            ).scalar_one()
            conn.execute(
                events.insert().values(
                    account_id=account_id,
                    message_id=queue_id,
                    recipient_id=rid,
                    type="deferred",
                    created_at=datetime.now(UTC),
                    data={"reply": "[/hide][bold red]x"},
                )
            )
    finally:
        db.dispose()
    return rid


def test_stored_markup_is_printed_literally(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    rid = store_hostile_message(database_url, "06H0T9T0KVCEJH8W")
    listed = ok(run("queue", "list"))
    assert "[/hide]" in listed
    assert "[bold red]x" in listed
    assert "[link=https://evil.example]Invoice[/link]" in listed
    assert ":warning:" in listed
    assert "\x1b]8;" not in listed  # no hidden terminal hyperlink
    shown = ok(run("queue", "show", str(rid)))
    assert "[bold red]later" in shown
    assert "[/hide][bold red]x" in shown  # the event's data
    message = ok(run("message", "show", "06H0T9T0KVCEJH8W"))
    assert "[bold]boss[/bold]" in message
    assert "[link=https://evil.example]Invoice[/link]" in message
    assert "[/hide][bold red]x" in message


def test_notes_and_suppression_details_are_printed_literally(run: Run) -> None:
    ok(run("account", "create", "acme"))
    ok(run("smtp-user", "create", "--account", "acme", "--note", "[/hide] [bold red]x", "app1"))
    assert "[/hide] [bold red]x" in ok(run("smtp-user", "list"))
    ok(run("suppression", "add", "acme", "bob@example.org", "--detail", "[/hide] [bold red]x"))
    assert "[/hide] [bold red]x" in ok(run("suppression", "list", "acme"))


def test_bad_environment_json_is_one_line(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLANE_SMTP", "{bad")
    fails(run("config", "show"), "POSTLANE_SMTP")
    monkeypatch.delenv("POSTLANE_SMTP")
    monkeypatch.setenv("POSTLANE_SMTP__LISTENERS", "notjson")
    fails(run("config", "show"), "is not valid JSON")


def test_config_errors_do_not_show_secrets(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "POSTLANE_DELIVERY__SMARTHOST",
        '{"host":"relay.example","username":"u","password":"Hunter2SecretPw"',
    )
    result = run("config", "show")
    fails(result, "delivery.smarthost")
    assert "Hunter2SecretPw" not in result[1] + result[2]
    monkeypatch.delenv("POSTLANE_DELIVERY__SMARTHOST")
    monkeypatch.setenv("POSTLANE_DATABASE_URL", "mysql://u:s3cretpw@h/db")
    result = run("config", "show")
    fails(result, "must start with sqlite:///")
    assert "s3cretpw" not in result[1] + result[2]


def test_deeply_nested_options_are_refused(run: Run) -> None:
    ok(run("account", "create", "acme"))
    deep = "[" * 100_000
    fails(run("account", "update", "acme", "--default-options", deep), "nested too deep")
    fails(
        run("smtp-user", "create", "--account", "acme", "--default-options", deep, "app1"),
        "nested too deep",
    )
    # Brackets inside strings are text, not nesting: refused for another reason.
    text = '{"tag": "' + "[" * 100 + '"}'
    fails(run("account", "update", "acme", "--default-options", text), "not a send option")


def test_init_into_a_missing_directory_is_one_line(run: Run, tmp_path: Path) -> None:
    fails(
        run("--config", str(tmp_path / "missing" / "x.toml"), "init"),
        "cannot write",
    )


def test_serve_on_a_busy_port_is_one_line(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv(
            "POSTLANE_SMTP__LISTENERS", f'[{{"address": "127.0.0.1", "port": {port}}}]'
        )
        monkeypatch.setenv("POSTLANE_SMTP__COMMIT_PROCESS", "false")
        monkeypatch.setenv("POSTLANE_LOG_LEVEL", "error")
        fails(
            run("serve", "--role", "smtp", "--no-metrics"),
            f"error: cannot listen on 127.0.0.1:{port}: address already in use",
        )
