"""Starts and stops the roles of one Postlane process.

Plain ``postlane serve`` runs intake here, and in supervised child processes
(:mod:`postlane.child_role`) the commit process intake hands accepted
messages to (``smtp.commit_process``) and delivery (``delivery.own_process``).
``--role`` runs the roles named in this process (intake still starts its
commit process and any further intake processes, ``smtp.processes``);
larger installs run the same binary per role against PostgreSQL. Whatever
runs, SIGINT and SIGTERM stop it cleanly: listeners close first so no new
work is accepted, then work in flight is allowed to finish, so nothing a
client was told is accepted gets lost.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any, Protocol

from postlane import heap, logs
from postlane.config import Settings
from postlane.errors import InvalidInput
from postlane.store import Database

log = logging.getLogger("postlane")


class Role(Protocol):
    """A part of Postlane that runs inside the process (SMTP server, delivery, web)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


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
    """Run every role until a stop signal arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    to_start = build_roles(
        settings, db, master_key, roles, metrics=metrics, first=first, children=children
    )
    started: list[Role] = []
    flusher = asyncio.ensure_future(logs.flush_periodically(log_buffer)) if log_buffer else None
    try:
        for role in to_start:
            await role.start()
            started.append(role)
        loop.add_signal_handler(signal.SIGHUP, _reload, started)
        heap.settle()  # what the started roles hold lives as long as the process
        names = ", ".join(r.name for r in started) or "no roles yet"
        log.info("postlane running (%s); database %s", names, db.url)
        print("postlane running: " + names, flush=True)
        await stop.wait()
        log.info("stop signal received, shutting down")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for role in reversed(started):
            await role.stop()
        db.dispose()
        if flusher is not None:
            flusher.cancel()
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
        asyncio.run(main)
    else:
        uvloop.run(main)
    log_buffer.flush()
