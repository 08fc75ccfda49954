"""postlane message archive: listing and writing the copies X-JobOption 128 kept."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cli_runner import Run, fails, ok

from postlane.store import Database
from postlane.store import accounts as account_store
from postlane.store.archive import archive_copy

COPY = b"From: info@acme.com\r\nTo: bob@example.org\r\n\r\nhello bob\r\n"


def seed(run: Run, database_url: str) -> None:
    ok(run("account", "create", "acme"))
    db = Database.from_url(database_url)
    try:
        with db.begin() as conn:
            account = account_store.get_account(conn, "acme")
            archive_copy(
                conn,
                account_id=account.id,
                message_id="06H0TAD9G7NWMJKB",
                recipient_id=7,
                address="bob@example.org",
                data=COPY,
                now=datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
            )
    finally:
        db.dispose()


def test_lists_the_copies(run: Run, database_url: str) -> None:
    seed(run, database_url)
    listing = ok(run("message", "archive", "06h0tad9g7nwmjkb"))
    assert "bob@example.org" in listing
    assert str(len(COPY)) in listing and "2026-11-24 10:00:00" in listing


def test_writes_one_recipients_copy(run: Run, database_url: str, tmp_path: Path) -> None:
    seed(run, database_url)
    assert ok(run("message", "archive", "06H0TAD9G7NWMJKB", "--recipient", "Bob@Example.org")) == (
        COPY.decode()
    )
    target = tmp_path / "bob.eml"
    written = ok(
        run(
            "message",
            "archive",
            "06H0TAD9G7NWMJKB",
            "--recipient",
            "bob@example.org",
            "--output",
            str(target),
        )
    )
    assert f"{len(COPY)} bytes written" in written
    assert target.read_bytes() == COPY


def test_errors_name_the_problem(run: Run, database_url: str, tmp_path: Path) -> None:
    seed(run, database_url)
    fails(run("message", "archive", "NOPE"), "no archived copies of message NOPE")
    fails(
        run("message", "archive", "06H0TAD9G7NWMJKB", "--recipient", "ann@example.org"),
        "no archived copy of message 06H0TAD9G7NWMJKB for ann@example.org",
    )
    fails(
        run("message", "archive", "06H0TAD9G7NWMJKB", "--output", str(tmp_path / "x")),
        "--output needs --recipient",
    )
    fails(
        run(
            "message",
            "archive",
            "06H0TAD9G7NWMJKB",
            "--recipient",
            "bob@example.org",
            "--output",
            str(tmp_path / "missing" / "x.eml"),
        ),
        "cannot write",
    )
