"""Starts and stops the roles of one Postlane process.

One process runs every role on SQLite; larger installs run the same binary per
role against PostgreSQL. Whatever runs, SIGINT and SIGTERM stop it cleanly:
listeners close first so no new work is accepted, then work in flight is
allowed to finish, so nothing a client was told is accepted gets lost.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Protocol

from postlane import crypto, logs
from postlane.config import Settings
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


def build_roles(settings: Settings, db: Database, box: crypto.SecretBox) -> list[Role]:
    """The roles this build of Postlane has: so far, the SMTP submission server."""
    from postlane.intake.committer import GroupCommitter
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
    committer = GroupCommitter(
        db,
        max_delay=smtp.commit_max_delay,
        max_batch=smtp.commit_max_batch,
        duplicate_window=smtp.duplicate_window,
    )
    return [
        MetricsEndpoint(settings.http.address, settings.http.port),
        SmtpServer(settings, directory, authenticator, committer, tls),
    ]


async def serve(
    settings: Settings,
    db: Database,
    box: crypto.SecretBox,
    log_buffer: logging.Handler | None = None,
) -> None:
    """Run every role until a stop signal arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    roles = build_roles(settings, db, box)
    started: list[Role] = []
    flusher = asyncio.ensure_future(logs.flush_periodically(log_buffer)) if log_buffer else None
    try:
        for role in roles:
            await role.start()
            started.append(role)
        names = ", ".join(r.name for r in started) or "no roles yet"
        log.info("postlane running (%s); database %s", names, db.url)
        print("postlane running: " + names, flush=True)
        await stop.wait()
        log.info("stop signal received, shutting down")
    finally:
        for role in reversed(started):
            await role.stop()
        db.dispose()
        if flusher is not None:
            flusher.cancel()
    print("postlane stopped", flush=True)


def run(settings: Settings, db: Database, box: crypto.SecretBox) -> None:
    """Entry point of ``postlane serve``."""
    log_buffer = logs.configure(settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(settings, db, box, log_buffer))
    else:
        uvloop.run(serve(settings, db, box, log_buffer))
    log_buffer.flush()
