"""An intake process's side of the commit process (see :mod:`postlane.intake.commit_service`).

It has the committer's interface, so a session cannot tell where its message
is committed. Many sessions' requests share one connection; each waits for
the answer carrying its own sequence number.

If the connection breaks with messages in flight, their sessions get
``451 4.3.0``: the commit process may or may not have committed them, and a
client that retries is recognised by duplicate detection (same Message-ID,
sender and recipients). Nothing that received ``250`` can be lost this way,
since ``250`` is only sent after the commit process answered. The next commit
connects again, waiting up to ``connect_timeout`` for a restarted commit
process to listen.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from postlane.errors import CommitFailed
from postlane.intake.commit_wire import FrameReader, encode, message_fields
from postlane.intake.committer import CommitResult, record_metrics
from postlane.store.intake import NewMessage

_RETRY_EVERY = 0.05


class RemoteCommitter:
    def __init__(self, path: Path, *, connect_timeout: float = 10.0) -> None:
        self._path = path
        self._connect_timeout = connect_timeout
        self._client: _Client | None = None
        self._connecting = asyncio.Lock()
        self._sequence = 0
        self._accepting = False

    async def open(self) -> None:
        """Connect now, so that a commit process that is not there fails start-up."""
        self._accepting = True
        await self._connected()

    async def close(self) -> None:
        """Refuse new commits; answers for those in flight still arrive before this returns."""
        self._accepting = False
        client, self._client = self._client, None
        if client is not None:
            await client.drain_and_close()

    async def commit(self, message: NewMessage) -> CommitResult:
        """Make the message durable; raises CommitFailed if it could not be."""
        if not self._accepting:
            raise CommitFailed("intake is not running")
        client = await self._connected()
        self._sequence += 1
        return await client.request(self._sequence, message)

    async def _connected(self) -> _Client:
        client = self._client
        if client is not None and client.alive:
            return client
        async with self._connecting:
            if self._client is not None and self._client.alive:
                return self._client
            self._client = await self._connect()
            return self._client

    async def _connect(self) -> _Client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        while True:
            try:
                _, client = await loop.create_unix_connection(_Client, str(self._path))
                return client
            except OSError as exc:
                if loop.time() >= deadline:
                    raise CommitFailed(
                        f"cannot reach the commit process at {self._path}: {exc.strerror or exc}"
                    ) from exc
            await asyncio.sleep(_RETRY_EVERY)


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        self._waiting: dict[int, asyncio.Future[CommitResult]] = {}
        self._idle: asyncio.Event | None = None

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    async def request(self, sequence: int, message: NewMessage) -> CommitResult:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise CommitFailed("the connection to the commit process is closed")
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._waiting[sequence] = future
        transport.write(encode((sequence, message_fields(message))))
        return await future

    def data_received(self, data: bytes) -> None:
        try:
            answers = [_answer(item) for item in self._reader.feed(data)]
        except Exception as exc:  # not our commit process: fail what waits
            self._fail(f"unreadable answer from the commit process ({exc})")
            if self._transport is not None:
                self._transport.close()
            return
        for answer in answers:
            self._answered(*answer)

    def _answered(
        self,
        sequence: int,
        queue_id: str | None,
        duplicate_of: str | None,
        error: str | None,
        stats: tuple[int, float, int] | None,
    ) -> None:
        if stats is not None:
            record_metrics(*stats)
        future = self._waiting.pop(sequence, None)
        if future is not None and not future.done():
            if error is None and queue_id is not None:
                future.set_result(CommitResult(queue_id, duplicate_of=duplicate_of))
            else:
                future.set_exception(CommitFailed(error or "answer without a queue id"))
        if not self._waiting and self._idle is not None:
            self._idle.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail("the commit process closed the connection")

    def _fail(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(CommitFailed(reason))
        if self._idle is not None:
            self._idle.set()

    async def drain_and_close(self) -> None:
        if self._waiting and self.alive:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self._transport is not None:
            self._transport.close()


def _answer(item: Any) -> tuple[Any, ...]:
    if not isinstance(item, tuple) or len(item) != 5 or not isinstance(item[0], int):
        raise ValueError(f"an answer is (sequence, queue_id, duplicate_of, error, stats): {item!r}")
    return item
