"""Database: URLs, SQLite durability settings, transactions, errors."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from postlane.errors import AlreadyExists, StoreError
from postlane.store import (
    Database,
    create_account,
    get_account,
    list_accounts,
    mask_url,
    upgrade,
)


def test_sqlite_url_creates_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "postlane.db"
    db = Database.from_url(f"sqlite:///{path}")
    try:
        assert db.dialect_name == "sqlite"
        assert path.parent.is_dir()
    finally:
        db.dispose()


def test_sqlite_pragmas_in_effect_on_every_connection(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        with db.connect() as first, db.connect() as second:
            for conn in (first, second):
                pragma = conn.exec_driver_sql
                assert pragma("PRAGMA journal_mode").scalar() == "wal"
                assert pragma("PRAGMA synchronous").scalar() == 2  # FULL
                assert pragma("PRAGMA foreign_keys").scalar() == 1
                assert pragma("PRAGMA busy_timeout").scalar() == 10_000
    finally:
        db.dispose()


def test_sqlite_begin_takes_the_write_lock_at_once(tmp_path: Path) -> None:
    path = tmp_path / "lock.db"
    db = Database.from_url(f"sqlite:///{path}")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        # Nothing written yet, but BEGIN IMMEDIATE already holds the lock.
        with db.begin(), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        db.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database, whatever kinds the suite runs on."""
    db = Database.from_url(f"sqlite:///{tmp_path / 'p.db'}")
    upgrade(db)
    try:
        yield db
    finally:
        db.dispose()  # a second dispose, after a test's own, changes nothing


def _driver_connection(conn: sa.Connection) -> object:
    return conn.connection.driver_connection


def test_sqlite_writes_share_one_connection_until_one_fails(sqlite_db: Database) -> None:
    db = sqlite_db
    with db.begin() as conn:
        create_account(conn, "one")
        first = _driver_connection(conn)
    pool = db.engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    assert pool.checkedout() == 1  # kept out of the pool between writes
    with db.begin() as conn:
        create_account(conn, "two")
        assert _driver_connection(conn) is first
    with pytest.raises(RuntimeError, match="boom"):
        _create_then_fail(db, "dropped")
    with pytest.raises(StoreError), db.begin() as conn:
        conn.exec_driver_sql("SELECT * FROM no_such_table")
    assert pool.checkedout() == 0  # a failure gives the connection up
    with db.begin() as conn:  # the failed ones rolled back; this one starts afresh
        create_account(conn, "three")
        # no open transaction was left behind on the connection of the failure
        assert conn.exec_driver_sql("SELECT count(*) FROM accounts").scalar() == 3
    with db.connect() as conn:
        assert sorted(a.name for a in list_accounts(conn)) == ["one", "three", "two"]


def test_sqlite_kept_writer_connection_is_closed_by_dispose(sqlite_db: Database) -> None:
    db = sqlite_db
    with db.begin() as conn:
        create_account(conn, "one")
        kept = _driver_connection(conn)
    db.dispose()
    assert isinstance(kept, sqlite3.Connection)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        kept.execute("SELECT 1")


def test_sqlite_writer_connection_serves_writes_from_other_threads(sqlite_db: Database) -> None:
    def write(name: str) -> None:
        with sqlite_db.begin() as conn:
            create_account(conn, name)

    write("main")
    workers = [threading.Thread(target=write, args=(f"t{i}",)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    with sqlite_db.connect() as conn:
        assert sorted(a.name for a in list_accounts(conn)) == ["main", "t0", "t1", "t2", "t3"]


def test_sqlite_reads_do_not_block_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "read.db"
    db = Database.from_url(f"sqlite:///{path}")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with db.connect() as conn, conn.begin():
            conn.exec_driver_sql("SELECT 1").scalar()
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()
        db.dispose()


def test_dialect_name(db: Database, database_url: str) -> None:
    assert db.dialect_name == database_url.split(":", 1)[0]


def test_begin_commits_on_success_and_rolls_back_on_error(db: Database) -> None:
    with db.begin() as conn:
        create_account(conn, "kept")
    with pytest.raises(RuntimeError, match="boom"):
        _create_then_fail(db, "dropped")
    with db.connect() as conn:
        assert [a.name for a in list_accounts(conn)] == ["kept"]


def _create_then_fail(db: Database, name: str) -> None:
    with db.begin() as conn:
        create_account(conn, name)
        raise RuntimeError("boom")


def test_a_refused_write_leaves_the_transaction_usable(db: Database) -> None:
    with db.begin() as conn:
        create_account(conn, "one")
        with pytest.raises(AlreadyExists):
            create_account(conn, "one")
        create_account(conn, "two")
    with db.connect() as conn:
        assert [a.name for a in list_accounts(conn)] == ["one", "two"]


def test_database_failure_inside_begin_is_store_error(db: Database) -> None:
    with pytest.raises(StoreError, match="database error") as info, db.begin() as conn:
        conn.exec_driver_sql("SELECT * FROM no_such_table")
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError)


def test_postgres_scheme_and_query_string_are_kept(database_url: str) -> None:
    if not database_url.startswith("postgresql://"):
        pytest.skip("PostgreSQL URL forms")
    schema = database_url.rsplit("%3D", 1)[1]
    db = Database.from_url("postgres://" + database_url.removeprefix("postgresql://"))
    try:
        assert db.engine.url.drivername == "postgresql+psycopg"
        with db.connect() as conn:
            assert conn.execute(sa.select(sa.func.current_schema())).scalar() == schema
    finally:
        db.dispose()


def test_url_property_masks_the_password(database_url: str) -> None:
    if not database_url.startswith("postgresql://postgres@"):
        pytest.skip("needs a PostgreSQL URL with a user to add a password to")
    # The test server trusts local connections, so any password is accepted.
    url = database_url.replace("postgres@", "postgres:s3cret-pw@", 1)
    db = Database.from_url(url)
    try:
        assert "s3cret-pw" not in db.url
        assert "postgres:***@" in db.url
        assert "s3cret-pw" not in repr(db)
    finally:
        db.dispose()


def test_unreachable_database_is_store_error_with_password_masked() -> None:
    url = "postgresql://postlane:s3cret-pw@127.0.0.1:1/postlane"
    with pytest.raises(StoreError) as info:
        Database.from_url(url)
    message = str(info.value)
    assert "s3cret-pw" not in message
    assert "postlane:***@127.0.0.1:1/postlane" in message


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "postgresql://postlane:s3cret-pw@host:port/db",
        "mysql://postlane:s3cret-pw@localhost/db",
        "sqlite://",
        "sqlite:///:memory:",
    ],
)
def test_malformed_or_unsupported_url_is_store_error(url: str) -> None:
    with pytest.raises(StoreError) as info:
        Database.from_url(url)
    assert "s3cret-pw" not in str(info.value)


def test_unopenable_sqlite_file_is_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open database"):
        Database.from_url(f"sqlite:///{blocker / 'sub' / 'x.db'}")


def test_mask_url_masks_passwords_even_in_broken_urls() -> None:
    assert mask_url("postgresql://u:pw@h/db?x=1") == "postgresql://u:***@h/db?x=1"
    assert "pw" not in mask_url("postgresql://u:pw@h:port/db")
    assert mask_url("sqlite:////var/lib/postlane.db") == "sqlite:////var/lib/postlane.db"


def test_connect_reads_committed_data(db: Database) -> None:
    with db.begin() as conn:
        created = create_account(conn, "visible")
    with db.connect() as conn:
        assert get_account(conn, "visible") == created


def test_mask_url_masks_up_to_the_last_at_sign() -> None:
    assert mask_url("postgresql://user:pa@ss@host/db") == "postgresql://user:***@host/db"
    assert mask_url("postgresql://u:p/a?s@h/db") == "postgresql://u:***@h/db"


def test_mask_url_masks_secret_query_parameters() -> None:
    url = "postgresql://u:s3cretpw@h/db?password=qsecret&x=1&sslpassword=a&pwd=b&api_key=c#f"
    assert mask_url(url) == (
        "postgresql://u:***@h/db?password=***&x=1&sslpassword=***&pwd=***&api_key=***#f"
    )
    kept = "postgresql://u@h/db?options=-csearch_path%3Dx"
    assert mask_url(kept) == kept


def test_a_new_sqlite_database_is_private_and_so_are_its_wal_files(tmp_path: Path) -> None:
    # Created with the process's umask (often 022): anyone on the host could
    # read the password hashes and every message.
    old = os.umask(0o022)
    try:
        db = Database.from_url(f"sqlite:///{tmp_path}/data/p.db")
        with db.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "data").iterdir()}
        db.dispose()
    finally:
        os.umask(old)
    assert modes["p.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


def test_a_sqlite_url_with_a_tilde_opens_the_file_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory was made under HOME, then the file was opened under "./~".
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    db = Database.from_url("sqlite:///~/sub/p.db")
    with db.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    db.dispose()
    assert (tmp_path / "sub" / "p.db").exists()
