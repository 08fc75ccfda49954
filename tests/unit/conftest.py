"""Fixtures for unit tests that touch storage: a migrated database of each kind."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postlane import cli
from postlane.store import Account, Database, create_account, upgrade


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A freshly migrated database (SQLite file or PostgreSQL schema)."""
    database = Database.from_url(database_url)
    upgrade(database)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def account(db: Database) -> Account:
    with db.begin() as conn:
        return create_account(conn, "acme")


@pytest.fixture
def run(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[int, str, str]]:
    """``run("account", "create", "acme")`` -> (exit code, stdout, stderr), on each database."""
    for key in list(os.environ):
        if key.startswith("POSTLANE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSTLANE_DATABASE_URL", database_url)
    monkeypatch.setenv("POSTLANE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("POSTLANE_HOSTNAME", "mail.postlane.test")
    monkeypatch.setenv("COLUMNS", "200")
    # `serve` points the root logger at the stderr of its run, which capsys
    # closes afterwards: later tests' log lines then failed on a closed file.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["postlane", *args])
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    if database_url.startswith("postgresql"):
        assert invoke("db", "upgrade")[0] == 0
    return invoke
