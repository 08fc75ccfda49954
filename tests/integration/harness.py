"""A real ``postlane serve`` process for the integration tests, and ways to talk to it.

:class:`PostlaneServer` writes a settings file with four listeners on free
loopback ports, creates tenants, runs ``python -m postlane serve`` as a
subprocess and stops it the way an operator would (a signal). :class:`Store`
reads what the server committed. :class:`LoopbackSMTP` is :mod:`smtplib` with
every host name resolved to 127.0.0.1, so that a client can verify the
server's certificate for ``mail.postlane.test`` (the name it was issued for)
without DNS: the equivalent of ``curl --resolve``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from postlane import crypto
from postlane.store import Database
from postlane.store.schema import alerts, events, messages, recipients
from postlane.tenants import admin

HOSTNAME = "mail.postlane.test"
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds for "postlane running" (PostgreSQL on a busy CI box)
STOP_TIMEOUT = 40.0  # the server waits up to 30 s for busy sessions
REFRESH_TIMEOUT = 5.0  # the server reloads tenants every second

_QUEUED = re.compile(r"Ok: queued as (\S+) LaunchID=(\S+)")

T = TypeVar("T")


# -- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """The listeners (and metrics port) every test server has."""

    relay: int  # tls = "none", submission = false: the port-25 role, plaintext AUTH allowed
    implicit: int  # tls = "implicit": like 465
    starttls: int  # tls = "starttls", submission: like 587
    plain: int  # tls = "none", submission, AUTH without TLS: OMICard "port 25, no encryption"
    http: int  # [http] port (Prometheus /metrics): never the default, which may be in use
    proxied: int  # tls = "none", submission, PROXY protocol header expected (behind a balancer)


@dataclass(frozen=True)
class ServerConfig:
    """What a test module may change about its server."""

    max_failures: int = 5
    max_message_size: int = 32 * 1024 * 1024
    #: ``[smtp] processes``: intake processes sharing the ports.
    smtp_processes: int = 1
    #: ``[smtp] commit_process``: commits in a process of their own, or in a thread of intake.
    commit_process: bool = True
    #: ``[smtp] command_timeout`` and ``data_timeout``, seconds.
    command_timeout: float = 300
    data_timeout: float = 600
    #: Called with the server before it starts, to create the module's own tenants.
    prepare: Callable[[PostlaneServer], None] | None = None
    #: ``serve --role`` values: intake only unless a module delivers (to loopback DNS).
    roles: tuple[str, ...] = ("smtp",)
    #: More settings (TOML tables) appended to the file.
    extra_toml: str = ""


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (all held open together, so they are distinct)."""
    with ExitStack() as stack:
        sockets = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]


def settings_toml(data_dir: Path, ports: Ports, config: ServerConfig) -> str:
    return f"""\
hostname = "{HOSTNAME}"
data_dir = "{data_dir}"
log_level = "info"

[smtp]
max_message_size = {config.max_message_size}
processes = {config.smtp_processes}
commit_process = {str(config.commit_process).lower()}
command_timeout = {config.command_timeout}
data_timeout = {config.data_timeout}

[auth]
max_failures = {config.max_failures}

[http]
address = "{LOOPBACK}"
port = {ports.http}

[[smtp.listeners]]
address = "{LOOPBACK}"
port = {ports.relay}
tls = "none"
submission = false
allow_plaintext_auth = true

[[smtp.listeners]]
address = "{LOOPBACK}"
port = {ports.implicit}
tls = "implicit"

[[smtp.listeners]]
address = "{LOOPBACK}"
port = {ports.starttls}
tls = "starttls"

[[smtp.listeners]]
address = "{LOOPBACK}"
port = {ports.plain}
tls = "none"
allow_plaintext_auth = true
require_tls_for_auth = false

[[smtp.listeners]]
address = "{LOOPBACK}"
port = {ports.proxied}
tls = "none"
allow_plaintext_auth = true
require_tls_for_auth = false
proxy_protocol = true
proxy_trusted_networks = ["127.0.0.1"]
{config.extra_toml}"""


# -- the server process ------------------------------------------------------------------


class PostlaneServer:
    """One Postlane installation (settings, database, data_dir) and its serve process."""

    def __init__(self, workdir: Path, database_url: str, config: ServerConfig) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.config = config
        self.data_dir = workdir / "var"
        self.config_path = workdir / "postlane.toml"
        self.ports = Ports(*free_ports(6))
        self.config_path.write_text(settings_toml(self.data_dir, self.ports, config))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POSTLANE_")}
        self.env.update(
            POSTLANE_CONFIG=str(self.config_path),
            POSTLANE_DATABASE_URL=database_url,
            PYTHONUNBUFFERED="1",
            COLUMNS="200",
        )
        self.passwords: dict[str, str] = {}
        self.process: subprocess.Popen[str] | None = None
        self.stdout_lines: list[str] = []
        self.log_path = workdir / "serve.log"
        self._running = threading.Event()
        self._reader: threading.Thread | None = None
        self._db: Database | None = None
        self._store: Store | None = None
        self._box: crypto.SecretBox | None = None
        self.runs = 0

    # -- the command line and tenants ----------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python -m postlane ARGS`` with this installation's settings."""
        result = subprocess.run(
            [sys.executable, "-m", "postlane", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert result.returncode == 0, (
                f"postlane {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database.from_url(self.database_url)
        return self._db

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.db)
        return self._store

    @property
    def box(self) -> crypto.SecretBox:
        if self._box is None:
            self._box = crypto.SecretBox(crypto.load_or_create_master_key(None, self.data_dir))
        return self._box

    def add_account(self, name: str, domain: str, **changes: Any) -> int:
        """An account with one sending domain (and settings, as admin.AccountChanges)."""
        account = admin.create_account(self.db, name)
        admin.add_domain(self.db, self.box, name, domain)
        if changes:
            admin.update_account(self.db, self.box, name, admin.AccountChanges(**changes))
        return account.id

    def update_account(self, name: str, **changes: Any) -> None:
        """Change account settings in the database (admin.AccountChanges fields)."""
        admin.update_account(self.db, self.box, name, admin.AccountChanges(**changes))

    def add_user(self, account: str, username: str, **options: Any) -> str:
        """An SMTP user; its password is returned and kept in ``passwords``."""
        creds = admin.create_smtp_user(self.db, account, username, **options)
        self.passwords[username] = creds.password
        return creds.password

    def account_id(self, name: str) -> int:
        return admin.get_account(self.db, name).id

    @property
    def cert_path(self) -> Path:
        """The self-signed certificate the server made for mail.postlane.test."""
        return self.data_dir / "tls" / "selfsigned.crt"

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run ``postlane serve`` and wait (bounded) for its ``postlane running`` line.

        The ports were free when chosen, but this box is shared: if one was
        taken meanwhile, new ports are chosen and the start is tried again.
        """
        for attempt in range(3):
            try:
                self._start_once()
                return
            except AssertionError:
                if attempt == 2 or "address already in use" not in self.describe():
                    raise
                self.ports = Ports(*free_ports(6))
                self.config_path.write_text(settings_toml(self.data_dir, self.ports, self.config))

    def _start_once(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.runs += 1
        self.stdout_lines = []
        self._running.clear()
        with self.log_path.open("a") as log_file:
            log_file.write(f"--- run {self.runs}\n")
            log_file.flush()
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "postlane",
                    "serve",
                    *(arg for role in self.config.roles for arg in ("--role", role)),
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log_file,  # the child has its own copy of the descriptor
                stdin=subprocess.DEVNULL,
                text=True,
            )
        self._reader = threading.Thread(target=self._read_stdout, args=(self.process,), daemon=True)
        self._reader.start()
        if not self._running.wait(START_TIMEOUT) or self.process.poll() is not None:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"postlane serve did not start:\n{self.describe()}")

    def _read_stdout(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if line.startswith("postlane running"):
                self._running.set()
        self._running.set()  # the process ended: let start() look at it

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        """Send ``signum``, wait for the exit; the exit status and everything printed."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            message = f"postlane serve ignored signal {signum}:\n{self.describe()}"
            raise AssertionError(message) from None
        if self._reader is not None:
            self._reader.join(5)
        return code, self.stdout

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs at all; returns once its children are gone too.

        The children (the commit and delivery processes) notice their parent's
        death and stop, but one may still finish a commit it had begun, so a
        test that read the store before they were gone could see a message's
        recipient rows written after it read the messages.
        """
        assert self.process is not None
        orphans = children(self.process.pid)
        self.process.kill()
        self.process.wait()
        deadline = time.monotonic() + 10
        for pid in orphans:
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # still there after 10 s: as a crash would
        if self._reader is not None:
            self._reader.join(5)

    def describe(self) -> str:
        code = None if self.process is None else self.process.poll()
        log = self.log_path.read_text() if self.log_path.exists() else ""
        tail = "\n".join(log.split(f"--- run {self.runs}\n")[-1].splitlines()[-40:])
        return f"exit status: {code}\nstdout:\n{self.stdout}\nlog (tail):\n{tail}"

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
            self._db = None
            self._store = None


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    """The pids of a process's children (from /proc)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def role_children(pid: int, role: str) -> list[int]:
    """The children of ``pid`` running ``serve --role ROLE --no-metrics``."""
    found = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                command = handle.read().split(b"\0")
        except FileNotFoundError:  # it ended meanwhile
            continue
        if command[-5:-1] == [b"serve", b"--role", role.encode(), b"--no-metrics"]:
            found.append(child)
    return found


def wait_for(probe: Callable[[], T | None], timeout: float = REFRESH_TIMEOUT) -> T:
    """Call ``probe`` until it returns something other than None (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.1)


# -- reading what was stored ----------------------------------------------------------------


class Store:
    """Read-only queries on the server's database, one small method per question."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _rows(self, query: Any) -> list[Mapping[str, Any]]:
        with self.db.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def message(self, queue_id: str) -> Mapping[str, Any] | None:
        rows = self._rows(sa.select(messages).where(messages.c.id == queue_id))
        return rows[0] if rows else None

    def messages_with_subject(self, subject: str) -> list[Mapping[str, Any]]:
        return self._rows(sa.select(messages).where(messages.c.subject == subject))

    def all_messages(self) -> list[Mapping[str, Any]]:
        return self._rows(sa.select(messages).order_by(messages.c.id))

    def recipients(self, queue_id: str) -> list[Mapping[str, Any]]:
        query = (
            sa.select(recipients)
            .where(recipients.c.message_id == queue_id)
            .order_by(recipients.c.id)
        )
        return self._rows(query)

    def all_recipients(self) -> list[Mapping[str, Any]]:
        return self._rows(sa.select(recipients).order_by(recipients.c.id))

    def events(self, queue_id: str) -> list[Mapping[str, Any]]:
        return self._rows(
            sa.select(events).where(events.c.message_id == queue_id).order_by(events.c.id)
        )

    def alerts(self, account_id: int) -> list[Mapping[str, Any]]:
        return self._rows(
            sa.select(alerts).where(alerts.c.account_id == account_id).order_by(alerts.c.id)
        )

    def count(self, table: sa.Table) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())

    def message_count(self) -> int:
        return self.count(messages)

    @contextmanager
    def nothing_stored(self) -> Iterator[None]:
        """Asserts that the block adds no message, recipient, event or alert row."""
        tables = (messages, recipients, events, alerts)
        before = [self.count(t) for t in tables]
        yield
        after = [self.count(t) for t in tables]
        assert after == before, f"rows (messages, recipients, events, alerts): {before} -> {after}"


# -- SMTP clients ---------------------------------------------------------------------------


class _ToLoopback:
    """Connects to 127.0.0.1 whatever host name it is given; TLS still checks that name."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return super()._get_socket(LOOPBACK, port, timeout)  # type: ignore[misc, no-any-return]


class LoopbackSMTP(_ToLoopback, smtplib.SMTP):
    pass


class LoopbackSMTP_SSL(_ToLoopback, smtplib.SMTP_SSL):
    pass


def connect(
    port: int, *, source: str = LOOPBACK, host: str = HOSTNAME, timeout: float = 30
) -> smtplib.SMTP:
    """A plaintext SMTP session from ``source`` (any 127.x.y.z: AUTH is throttled per IP)."""
    return LoopbackSMTP(host, port, timeout=timeout, source_address=(source, 0))


def auth_plain(client: smtplib.SMTP, username: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN attempt and its raw reply (smtplib.login would also try LOGIN)."""
    token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


def queue_id(reply: bytes | str) -> str:
    """The queue id of a ``250 2.0.0 Ok: queued as ID LaunchID=ID`` reply."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    match = _QUEUED.search(text)
    assert match, f"not a queued reply: {text!r}"
    assert match.group(1) == match.group(2), text
    return match.group(1)


def expect(reply: tuple[int, bytes], code: int, enhanced: str, *contains: str) -> str:
    """Assert an SMTP reply's code, enhanced status code and text; the text."""
    text = reply[1].decode()
    assert reply[0] == code, f"expected {code} {enhanced}, got {reply[0]} {text}"
    assert text.startswith(enhanced + " "), f"expected {code} {enhanced}, got {reply[0]} {text}"
    for part in contains:
        assert part in text, f"{part!r} not in {text!r}"
    return text


def closed_by_server(client: smtplib.SMTP, timeout: float = 5) -> bool:
    """True when the server has closed the connection (EOF on read).

    Only peeks, so a reply that is waiting stays for smtplib to read: a reply
    without a close is "not closed" (False) once ``timeout`` passes.
    """
    sock = client.sock
    if sock is None:
        return True
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        data = sock.recv(1024, socket.MSG_PEEK)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.settimeout(previous)
    return data == b""


@dataclass
class Sent:
    """A message a client got a final reply for."""

    code: int
    text: str
    queue_id: str | None = None


def send(
    client: smtplib.SMTP,
    sender: str,
    recipients_: list[str],
    message: bytes,
    *,
    mail_options: tuple[str, ...] = (),
) -> Sent:
    """MAIL, RCPT and DATA one by one, every reply checked; the final reply."""
    expect(client.mail(sender, list(mail_options)), 250, "2.1.0")
    for rcpt in recipients_:
        expect(client.rcpt(rcpt), 250, "2.1.5")
    code, text = client.data(message)
    decoded = text.decode()
    return Sent(code, decoded, queue_id(decoded) if code == 250 else None)
