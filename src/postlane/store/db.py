"""The database handle: one engine, configured so commits mean durable.

SQLite is the embedded default and PostgreSQL the shared one; both are reached
through the same :class:`Database`, so the repositories never ask which one
they run on (the queue will, for ``SKIP LOCKED``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from postlane.errors import StoreError
from postlane.store._writer_lock import WriterLock

DialectName = Literal["sqlite", "postgresql"]

#: Execution option read by the SQLite ``begin`` hook: which kind of BEGIN.
_SQLITE_BEGIN = "postlane_sqlite_begin"
_BEGIN_STATEMENTS = {"DEFERRED": "BEGIN DEFERRED", "IMMEDIATE": "BEGIN IMMEDIATE"}

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 10

# Used only when a URL is too broken to parse: mask from the first
# "user:" to the last "@", which over-masks rather than leaks.


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe for logs and errors.

    Parsed by hand rather than with a URL parser, because the URLs that reach
    error messages are often the broken ones: a password with a raw ``@``
    (``u:pa@ss@host``) must be masked up to the *last* ``@`` of the authority,
    or its tail would read as the host name and be shown. Query parameters that
    carry credentials (``?password=``, libpq's ``sslpassword``, tokens, keys)
    are masked too.
    """

    def masked_item(item: str) -> str:
        name, eq, _value = item.partition("=")
        lowered = unquote(name).lower()
        secret = any(w in lowered for w in ("password", "passwd", "secret", "token"))
        secret = secret or lowered.endswith(("pass", "pwd", "key"))
        return f"{name}=***" if eq and secret else item

    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The user part ends at the last "@": an "@" in the path or query cannot
    # be told apart from one in a password, so this over-masks rather than leaks.
    at = rest.rfind("@")
    userinfo, host_and_rest = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    user, colon, _password = userinfo.partition(":")
    if colon and not any(c in user for c in "/?#"):
        userinfo = f"{user}:***"
    path, qmark, query = host_and_rest.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        query = "&".join(masked_item(item) for item in query.split("&")) + hash_ + fragment
    prefix = f"{userinfo}@" if at >= 0 else ""
    return f"{scheme}://{prefix}{path}{qmark}{query}"


class Database:
    """A pool of connections to one Postlane database.

    On SQLite every connection runs in WAL mode with ``synchronous=FULL``:
    WAL lets readers proceed while one writer commits, and FULL makes each
    commit fsync the log, so a write acknowledged to an SMTP client (``250``)
    survives a crash or power loss. ``NORMAL`` would be faster and would lose
    the last transactions on power loss, which breaks the promise of ``250``.
    Foreign keys are enforced and a locked database is waited on for
    ten seconds before failing.
    """

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine; use :meth:`from_url`, which installs the SQLite settings."""
        name = engine.dialect.name
        if name not in ("sqlite", "postgresql"):
            raise StoreError(f"unsupported database dialect {name!r}")
        self._engine = engine
        self._dialect_name: DialectName = "sqlite" if name == "sqlite" else "postgresql"
        self._writer: WriterLock | None = None
        self._writing: Connection | None = None  # SQLite: kept between writes (see begin)
        database = engine.url.database
        if name == "sqlite" and database and database != ":memory:":
            self._writer = WriterLock(Path(database), SQLITE_BUSY_TIMEOUT_MS / 1000)

    @classmethod
    def from_url(cls, url: str) -> Database:
        """Open the database named by ``url`` and check that it answers.

        Accepts ``sqlite:///path`` (the directory is created) and
        ``postgresql://`` or ``postgres://`` (driven by psycopg 3, query
        options such as ``options=-csearch_path%3Dx`` kept). Fails here, with a
        :class:`StoreError` naming the URL without its password, rather than
        at the first query of the first client.
        """
        parsed = _parse(url)
        try:
            if parsed.drivername == "sqlite":
                engine = _sqlite_engine(parsed)
            else:
                engine = _postgresql_engine(parsed)
        except OSError as e:
            raise StoreError(f"cannot open database {mask_url(url)}: {e}") from e
        try:
            with engine.connect():
                pass
        except exc.DBAPIError as e:
            engine.dispose()
            raise StoreError(f"cannot open database {mask_url(url)}: {_reason(e)}") from e
        except StoreError as e:
            engine.dispose()
            raise StoreError(f"cannot open database {mask_url(url)}: {e}") from e
        return cls(engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def url(self) -> str:
        """The database URL with its password masked: safe to log."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def dialect_name(self) -> DialectName:
        return self._dialect_name

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction meant to write: committed on exit, rolled back on error.

        On SQLite it starts with ``BEGIN IMMEDIATE``, taking the write lock at
        once: a deferred transaction that reads and then writes can fail with
        "database is locked" without waiting, whereas an immediate one waits
        for the busy timeout. Writers of a SQLite file first take their turn
        from :class:`~postlane.store._writer_lock.WriterLock`, which wakes the
        next one as soon as a commit ends. A database failure escapes as
        :class:`StoreError` (the driver's exception is its ``__cause__``).

        Because a SQLite file has one writer at a time, a process's writes
        all go through one connection, kept between them while the writer
        turn is held: checking a connection out of the pool and back in
        (with the pool's rollback on return) cost 27 us of the 41 us of an
        empty write transaction, measured by hand, and intake commits one
        transaction for every one or two messages when few clients send.
        After any failure inside a transaction that connection is closed and
        the next write opens another.
        """
        if self._writer is None:
            with _store_errors(), self._connect_for_writing() as conn, conn.begin():
                yield conn
            return
        with self._writer.held():
            if self._writing is None:
                self._writing = self._connect_for_writing()
            conn = self._writing
            try:
                with _store_errors(), conn.begin():
                    yield conn
            except BaseException:
                self._writing = None
                conn.close()
                raise

    def _connect_for_writing(self) -> Connection:
        with _store_errors():
            conn = self._engine.connect()
        return conn.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reading; its transactions start deferred on SQLite.

        Deferred transactions let any number of readers run beside the
        writer. Anything that writes should use :meth:`begin` instead. A
        database failure escapes as :class:`StoreError`, as from :meth:`begin`.
        """
        with _store_errors(), self._engine.connect() as conn:
            yield conn

    def dispose(self) -> None:
        """Close every pooled connection (on shutdown, or after a fork)."""
        if self._writer is not None:
            # the writer's turn first: a thread may still be writing on it
            with contextlib.suppress(StoreError), self._writer.held():
                if self._writing is not None:
                    self._writing.close()
                    self._writing = None
        self._engine.dispose()
        if self._writer is not None:
            # a forked child must open its own: a shared open file shares the flock
            self._writer.close()

    def __repr__(self) -> str:
        return f"Database({self.url})"


@contextmanager
def _store_errors() -> Iterator[None]:
    """A driver's failure as :class:`StoreError` (the driver's exception its ``__cause__``)."""
    try:
        yield
    except exc.DBAPIError as e:
        raise StoreError(f"database error: {_reason(e)}") from e


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError) as e:
        raise StoreError(f"malformed database URL {mask_url(url)}") from e
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        if not parsed.database or parsed.database == ":memory:":
            raise StoreError(
                f"database URL {mask_url(url)} names no file: "
                "Postlane needs sqlite:///path/to/file.db"
            )
        # "~" is the user's home for the file, as for the directory made for it.
        return parsed.set(drivername="sqlite", database=str(Path(parsed.database).expanduser()))
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise StoreError(
        f"unsupported database URL {mask_url(url)}: use sqlite:///path or postgresql://..."
    )


def _reason(error: exc.DBAPIError) -> str:
    lines = str(error.orig).strip().splitlines()
    return lines[0] if lines else type(error.orig).__name__


def _sqlite_engine(url: URL) -> Engine:
    assert url.database is not None
    path = Path(url.database)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created private: it holds password hashes and every message. SQLite gives
    # its -wal and -shm files the database file's mode.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    engine = sa.create_engine(url)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # pysqlite's own transaction handling emits BEGIN late (only before DML)
    # and commits before DDL; switch it off and emit BEGIN ourselves, as the
    # SQLAlchemy documentation recommends for pysqlite.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        (mode,) = cursor.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"SQLite refused WAL mode (got {mode!r}); is the file on NFS?")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
    conn.exec_driver_sql(_BEGIN_STATEMENTS[mode])


def _postgresql_engine(url: URL) -> Engine:
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    # Nodes outlive database restarts and failovers; a stale pooled
    # connection is replaced instead of failing the next transaction.
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
