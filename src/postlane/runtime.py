"""Starts and stops the roles of one Postlane process.

Plain ``postlane serve`` runs intake here, and in supervised child processes
(:mod:`postlane.child_role`) the commit process intake hands accepted
messages to (``smtp.commit_process``) and delivery (``delivery.own_process``).
``--role`` runs the roles named in this process (intake still starts its
commit process and any further intake processes, ``smtp.processes``);
larger installs run the same binary per role against PostgreSQL. Whatever
runs, SIGINT and SIGTERM stop it cleanly: listeners close first so no new
work is accepted, then work in flight is allowed to finish, so nothing a
client was told is accepted gets lost. A supervised child that cannot be
started again and without which no mail can be accepted (the commit process)
stops everything the same way, and serve then exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from postlane import heap, logs
from postlane.config import Settings
from postlane.errors import InvalidInput, PostlaneError
from postlane.store import Database

log = logging.getLogger("postlane")


class Role(Protocol):
    """A part of Postlane that runs inside the process (SMTP server, delivery, web)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@runtime_checkable
class Supervised(Protocol):
    """A role whose processes can end on their own (:class:`~postlane.child_role.ChildRole`).

    It is told when the service begins to stop, so that an exit from then on
    is expected rather than restarted, and it reports through ``on_fatal``
    when it cannot go on, so that the service stops instead of refusing mail
    for ever.
    """

    on_fatal: Callable[[PostlaneError], None] | None

    def stopping(self) -> None: ...


class MetricsEndpoint:
    """Prometheus metrics at http://<http.address>:<http.port>/metrics.

    Served from a thread by prometheus_client until the HTTP API role exists
    to mount it; scraping must work whatever else the process is doing.
    """

    name = "metrics"

    def __init__(self, address: str, port: int) -> None:
        self._address = address
        self._port = port
        self._server: Any = None

    async def start(self) -> None:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(self._port, self._address)
        log.info("metrics on http://%s:%d/metrics", self._address, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()


ROLES = ("smtp", "delivery")
# run only when asked for: the first intake process starts it as its child
HELPER_ROLES = ("commit",)


def parse_roles(names: list[str] | None) -> tuple[str, ...]:
    """The roles asked for on the command line (all when none), checked."""
    if not names:
        return ROLES
    known = ROLES + HELPER_ROLES
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInput(f"unknown role {unknown[0]!r}: choose from {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def build_roles(
    settings: Settings,
    db: Database,
    master_key: bytes,
    roles: tuple[str, ...] = ROLES,
    *,
    metrics: bool = True,
    first: Sequence[Role] = (),
    children: Sequence[Role] = (),
) -> list[Role]:
    """The roles to run: SMTP intake and/or delivery here, ``first`` and ``children`` in
    their processes.

    Metrics are served unless ``metrics`` is False (a child process: the
    first process serves them on the HTTP port). Roles start in list order
    and stop in reverse, and ``first`` come before the roles of this process:
    the commit process starts before the intake that needs it and stops after
    intake has finished its commits.
    """
    built: list[Role] = []
    if metrics:
        built.append(MetricsEndpoint(settings.http.address, settings.http.port))
    if "commit" in roles:
        built.append(_commit_role(settings, db))
    built.extend(first)
    if "smtp" in roles:
        built.append(_smtp_role(settings, db))
    if "delivery" in roles:
        from postlane.delivery.bounce_processor import BounceProcessor
        from postlane.delivery.worker import DeliveryWorker

        built.append(DeliveryWorker(settings, db, master_key))
        built.append(BounceProcessor(settings, db, master_key))
    built.extend(children)
    return built


def _commit_role(settings: Settings, db: Database) -> Role:
    from postlane.intake.commit_service import CommitService, socket_path

    return CommitService(
        db,
        socket_path(settings.data_dir),
        max_batch=settings.smtp.commit_max_batch,
        duplicate_window=settings.smtp.duplicate_window,
    )


def _smtp_role(settings: Settings, db: Database) -> Role:
    from postlane.intake.commit_service import socket_path
    from postlane.intake.committer import Committer, GroupCommitter
    from postlane.intake.remote_committer import RemoteCommitter
    from postlane.smtp.auth_guard import CredentialCache, FailureThrottle
    from postlane.smtp.authenticator import Authenticator
    from postlane.smtp.server import SmtpServer
    from postlane.smtp.tls import TlsContextHolder, certificate_paths
    from postlane.tenants.directory import TenantDirectory

    smtp = settings.smtp
    tls = TlsContextHolder(
        certificate_paths(settings.hostname, settings.data_dir, smtp.tls_cert, smtp.tls_key)
    )
    directory = TenantDirectory(db)
    authenticator = Authenticator(
        directory,
        CredentialCache(settings.auth.cache_ttl),
        FailureThrottle(settings.auth.max_failures, settings.auth.failure_window),
    )
    directory.on_change = authenticator.on_tenants_changed
    committer: Committer
    if smtp.commit_process:
        committer = RemoteCommitter(socket_path(settings.data_dir))
    else:
        committer = GroupCommitter(
            db,
            max_delay=smtp.commit_max_delay,
            max_batch=smtp.commit_max_batch,
            duplicate_window=smtp.duplicate_window,
        )
    return SmtpServer(settings, directory, authenticator, committer, tls)


async def serve(
    settings: Settings,
    db: Database,
    master_key: bytes,
    roles: tuple[str, ...] = ROLES,
    log_buffer: logging.Handler | None = None,
    *,
    metrics: bool = True,
    first: Sequence[Role] = (),
    children: Sequence[Role] = (),
) -> None:
    """Run every role until a stop signal arrives, or until a role cannot go on.

    The signal handlers are in place before anything starts and stay until
    the loop ends: SIGHUP's default action ends the process, and a
    parent ended that way leaves its children to fail on a broken pipe. A
    SIGHUP during startup reloads the roles started so far (the others read
    everything when they start); during shutdown it is only logged.

    Raises the role's error (a PostlaneError, so the CLI exits 1) when a
    supervised role gave up, after every role has been stopped.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fatal: list[PostlaneError] = []
    to_start = build_roles(
        settings, db, master_key, roles, metrics=metrics, first=first, children=children
    )
    started: list[Role] = []

    def begin_stop() -> None:
        if not stop.is_set():
            stop.set()
            for role in to_start:  # before any role stops: its children may exit already
                if isinstance(role, Supervised):
                    role.stopping()

    def on_fatal(error: PostlaneError) -> None:
        fatal.append(error)
        begin_stop()

    def on_hangup() -> None:
        if stop.is_set():
            log.info("SIGHUP ignored: shutting down")
        else:
            _reload(started)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, begin_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    for role in to_start:
        if isinstance(role, Supervised):
            role.on_fatal = on_fatal
    flusher = asyncio.ensure_future(logs.flush_periodically(log_buffer)) if log_buffer else None
    try:
        for role in to_start:
            if stop.is_set():  # a stop signal during startup: start nothing more
                break
            await role.start()
            started.append(role)
        if not stop.is_set():
            heap.settle()  # what the started roles hold lives as long as the process
            names = ", ".join(r.name for r in started) or "no roles yet"
            log.info("postlane running (%s); database %s", names, db.url)
            print("postlane running: " + names, flush=True)
        await stop.wait()
        if not fatal:
            log.info("stop signal received, shutting down")
    finally:
        begin_stop()  # also when a role failed to start: no restarts while stopping the rest
        for role in reversed(started):
            await role.stop()
        db.dispose()
        if flusher is not None:
            flusher.cancel()
    if fatal:
        raise fatal[0]
    print("postlane stopped", flush=True)


def _reload(roles: list[Role]) -> None:
    """SIGHUP: every role that can reload does (certificates; child processes pass it on)."""
    for role in roles:
        reload = getattr(role, "reload", None)
        if callable(reload):
            try:
                reload()
            except Exception:  # one role's failure must not keep the others from reloading
                log.exception("reloading %s failed", role.name)


def run(
    settings: Settings,
    db: Database,
    master_key: bytes,
    roles: tuple[str, ...] = ROLES,
    *,
    metrics: bool = True,
    first: Sequence[Role] = (),
    children: Sequence[Role] = (),
) -> None:
    """Entry point of ``postlane serve``."""
    log_buffer = logs.configure(settings.log_level)
    main = serve(
        settings,
        db,
        master_key,
        roles,
        log_buffer,
        metrics=metrics,
        first=first,
        children=children,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(main)
    finally:
        # Closing the loop gave SIGHUP its default action back, which would end
        # a process that has stopped cleanly before it can say so.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log_buffer.flush()  # a failed service's last lines matter most
