"""The commit process: every intake process's messages, committed in shared groups.

Measured under bench/ingest on a 2-core machine: with the grouped commit in a
thread of the intake process, the SQLite work and the sessions share one
interpreter lock, and the process spends about 1.1 ms of CPU per message
where the sessions alone need 0.6 and the inserts alone 0.2; two intake
processes each committing for themselves halve the groups and queue for the
one SQLite writer. So ``postlane serve`` runs the commit in a process of its
own (``smtp.commit_process``), fed by every intake process over a Unix
socket in the data directory.

Its event loop does nothing but read requests and commit: the commit runs
in the loop itself, so whatever arrives while one transaction is being
written becomes the next group, without a timer and without handing work to
another thread. A session gets its ``250`` only after the answer for its
message comes back, which is sent after the transaction committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from postlane.errors import ConfigError, InvalidInput
from postlane.intake.commit_wire import FrameReader, encode, message_from_fields
from postlane.intake.committer import CommitResult, write_batch
from postlane.store import Database
from postlane.store.intake import NewMessage

log = logging.getLogger("postlane.intake")

SOCKET_NAME: Final = "commit.sock"
_MAX_PATH: Final = 107  # sun_path holds 108 bytes with its terminating NUL
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def socket_path(data_dir: Path) -> Path:
    """Where the commit process listens; raises ConfigError if the path cannot be a socket's."""
    path = data_dir.resolve() / SOCKET_NAME
    if len(os.fsencode(path)) > _MAX_PATH:
        raise ConfigError(
            f"the commit socket path {path} is longer than {_MAX_PATH} bytes, the limit of "
            "Unix sockets: use a shorter data_dir, or set smtp.commit_process = false"
        )
    return path


@dataclass(slots=True)
class _Request:
    peer: _Peer
    sequence: int
    message: NewMessage


class CommitService:
    """The ``commit`` role: a Unix socket server that commits what intake processes send."""

    name = "commit"

    def __init__(
        self, db: Database, path: Path, *, max_batch: int = 256, duplicate_window: float = 86400.0
    ) -> None:
        self._db = db
        self._path = path
        self._max_batch = max_batch
        self._window = timedelta(seconds=duplicate_window)
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._pending: list[_Request] = []
        self._scheduled = False
        self._inode: int | None = None

    async def start(self) -> None:
        _claim(self._path)
        loop = asyncio.get_running_loop()
        old_mask = os.umask(0o077)  # no moment in which another user could connect
        try:
            self._server = await loop.create_unix_server(self._connected, str(self._path))
        finally:
            os.umask(old_mask)
        self._path.chmod(0o600)
        self._inode = self._path.stat().st_ino
        log.info("intake commits on %s", self._path)

    async def stop(self) -> None:
        """Stop listening, commit what was already sent, then close the connections."""
        if self._server is not None:
            self._server.close()
            self._server = None
        while self._pending:
            self._flush()
        for peer in list(self._peers):
            peer.close()
        with contextlib.suppress(FileNotFoundError):
            # a successor may already listen at this path (a restart while we
            # were stopping): remove the file only if it is still ours
            if self._path.stat().st_ino == self._inode:
                self._path.unlink()

    def _connected(self) -> _Peer:
        return _Peer(self)

    def _received(self, request: _Request) -> None:
        self._pending.append(request)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Commit up to max_batch waiting messages; the rest go next, after new input is read."""
        self._scheduled = False
        batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
        if not batch:
            return
        outcome = write_batch(self._db, [r.message for r in batch], self._window)
        stats: tuple[int, float, int] | None = (
            len(batch),
            outcome.seconds,
            outcome.failed_transactions,
        )
        for request, result in zip(batch, outcome.results, strict=True):
            answer: tuple[Any, ...]
            if isinstance(result, CommitResult):
                answer = (request.sequence, result.queue_id, result.duplicate_of, None, stats)
            else:
                answer = (request.sequence, None, None, str(result), stats)
            stats = None  # a batch is counted once, by whoever gets its first answer
            request.peer.send(answer)
        if self._pending and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)


class _Peer(asyncio.Protocol):
    """One intake process's connection."""

    def __init__(self, service: CommitService) -> None:
        self._service = service
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        uid = _peer_uid(sock) if sock is not None else None
        if uid != os.getuid():
            log.error("commit socket: refused a connection from uid %s", uid)
            transport.close()
            self._transport = None
            return
        self._service._peers.add(self)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        try:
            requests = [_request(item) for item in self._reader.feed(data)]
        except Exception as exc:  # garbage on our own socket (any unpickling error): drop it
            log.error("commit socket: unreadable request (%s); connection closed", exc)
            self.close()
            return
        for sequence, message in requests:
            self._service._received(_Request(self, sequence, message))

    def connection_lost(self, exc: Exception | None) -> None:
        self._service._peers.discard(self)
        self._transport = None

    def send(self, answer: tuple[Any, ...]) -> None:
        # a peer that went away still had its message committed: its client got
        # 451 and will resubmit, which duplicate detection recognises
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode(answer))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


def _request(item: Any) -> tuple[int, NewMessage]:
    if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], int):
        raise InvalidInput(f"commit request is not (sequence, message): {type(item).__name__}")
    return item[0], message_from_fields(item[1])


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    return int(_PEERCRED.unpack(raw)[1])


def _claim(path: Path) -> None:
    """Remove a stale socket file; refuse if another commit process is listening on it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left by a process that is gone
            return
    raise ConfigError(
        f"another Postlane commit process is listening on {path}: "
        "two instances cannot share one data_dir"
    )
