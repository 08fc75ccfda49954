"""Deliveries written down before a connection's next copy, so a killed worker does not resend them.

A copy the receiver accepted must not go out again. Waiting for its outcome
to reach the database before sending the next copy on the connection
guarantees that, but each wait is a turn at the database shared with every
other writer: 10 to 25 ms under bench/relay (measured), which cut end-to-end
throughput by a third. A line appended to a local file is enough instead:
``write(2)`` without ``fsync`` survives the death of the process, which is
what this guards against. A power loss can lose the last lines; that means a
resend, never a lost message. The database row is still written as before,
in the background, and the line then stops mattering.

Each worker writes its own files (``<data_dir>/delivery-journal/``) and holds
an exclusive ``flock`` on them while it lives; the kernel drops the lock when
the process dies. A sweep takes the lock of any file whose owner died and
records its deliveries against that owner's leases, which are still in place
until the sweep reclaims them, then removes the file.

A file is removed once every delivery in it is in the database; a new one is
started every ``rotate_after`` deliveries so that none grows without bound.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from postlane.errors import StoreError
from postlane.store.queue import Delivery

log = logging.getLogger(__name__)

ROTATE_AFTER: Final = 10_000  # deliveries per file before the next one is started
_SUFFIX: Final = ".journal"


@dataclass
class _File:
    path: Path
    fd: int
    entries: int = 0
    outstanding: int = 0  # entries not yet known to be in the database


class OutcomeJournal:
    """The journal of one worker (``owner``): append before the next copy, release once recorded."""

    def __init__(self, directory: Path, owner: str, *, rotate_after: int = ROTATE_AFTER) -> None:
        self.directory = directory
        self.owner = owner
        self._rotate_after = rotate_after
        self._files: dict[int, _File] = {}
        self._current = -1
        # Tokens are never reused, not even after close(): a recording that
        # arrives late must not count against a newer file's deliveries.
        self._last_token = 0

    def append(self, delivery: Delivery) -> int:
        """Write ``delivery`` down; returns the token to give :meth:`recorded` later."""
        current = self._files.get(self._current)
        if current is None or current.entries >= self._rotate_after:
            self._start_file()  # a full file stays until its deliveries are recorded
        file = self._files[self._current]
        line = json.dumps(
            {"id": delivery.id, "data": delivery.data, "reply": delivery.reply},
            separators=(",", ":"),
            default=str,
        )
        _write_all(file, line.encode("utf-8", "surrogateescape") + b"\n")
        file.entries += 1
        file.outstanding += 1
        return self._current

    def recorded(self, token: int) -> None:
        """One delivery appended under ``token`` is in the database (or no longer ours)."""
        file = self._files.get(token)
        if file is None:
            return
        file.outstanding -= 1
        if file.outstanding > 0:
            return
        if token == self._current:
            if file.entries < self._rotate_after:
                return
            self._current = -1  # the next append starts a new file
        self._remove(token)

    def close(self) -> None:
        """Remove the files whose deliveries are all recorded; leave the rest for a sweep."""
        for token, file in list(self._files.items()):
            if file.outstanding == 0:
                self._remove(token)
            else:
                os.close(file.fd)  # releases the lock: the next sweep records what is left
                del self._files[token]
        self._current = -1

    def _start_file(self) -> None:
        path = self.directory / f"{secrets.token_hex(8)}{_SUFFIX}"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create delivery journal {path}: {exc}") from exc
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._last_token += 1
        self._current = self._last_token
        file = _File(path, fd)
        self._files[self._current] = file
        _write_all(file, json.dumps({"owner": self.owner}).encode() + b"\n")

    def _remove(self, token: int) -> None:
        file = self._files.pop(token)
        try:
            file.path.unlink()
        except OSError as exc:
            log.warning("cannot remove delivery journal %s: %s", file.path, exc)
        os.close(file.fd)


def _write_all(file: _File, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(file.fd, view) :]
    except OSError as exc:
        raise StoreError(f"cannot write delivery journal {file.path}: {exc}") from exc


@dataclass
class Orphan:
    """The journal file of a worker that died, locked by us until :meth:`done` or :meth:`keep`."""

    path: Path
    owner: str
    deliveries: list[Delivery]
    fd: int

    def done(self) -> None:
        """Its deliveries are recorded: remove the file."""
        try:
            self.path.unlink()
        finally:
            os.close(self.fd)

    def keep(self) -> None:
        """Recording failed: leave the file for the next sweep."""
        os.close(self.fd)


def orphans(directory: Path) -> Iterator[Orphan]:
    """The journal files in ``directory`` whose writer is gone, each locked while handled.

    A file a live worker holds (this process's own included) is skipped; so is
    one that another sweep is handling. A line that cannot be read (a file cut
    short by a full disk) is skipped with a warning: its copy may be resent.
    """
    try:
        paths = sorted(directory.glob(f"*{_SUFFIX}"))
    except OSError:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # removed by its owner or another sweep meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if os.fstat(fd).st_nlink == 0:  # the sweep that held it before us removed it
            os.close(fd)
            continue
        owner, deliveries = _read(path, fd)
        if owner is None:
            log.warning("delivery journal %s has no owner line; removed", path)
            Orphan(path, "", [], fd).done()
            continue
        yield Orphan(path, owner, deliveries, fd)


def _read(path: Path, fd: int) -> tuple[str | None, list[Delivery]]:
    with os.fdopen(os.dup(fd), "rb") as stream:
        lines = stream.read().splitlines()
    owner: str | None = None
    deliveries: list[Delivery] = []
    for number, raw in enumerate(lines, 1):
        try:
            item = json.loads(raw)
            if number == 1:
                owner = str(item["owner"])
                continue
            deliveries.append(Delivery(int(item["id"]), dict(item["data"]), item.get("reply")))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("delivery journal %s line %d unreadable (%s): skipped", path, number, exc)
    return owner, deliveries
