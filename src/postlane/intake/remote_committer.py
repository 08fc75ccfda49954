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

A request is written only while the connection's write buffer is below its
high-water mark (asyncio's flow control). Without that, a commit process that
stopped reading left every message of every session in this process's
buffer, on top of the session's own copies. A session that gives up waiting
(its commit deadline) before its request was written sends nothing; one that
gives up later leaves the request to be answered, and the answer is logged.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from postlane.errors import CommitFailed
from postlane.intake.commit_wire import FrameReader, encode, message_fields
from postlane.intake.committer import (
    DRAIN_TIMEOUT,
    CommitResult,
    log_late_result,
    record_metrics,
)
from postlane.store.intake import NewMessage

log = logging.getLogger("postlane.intake")

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

    async def close(self, grace: float = DRAIN_TIMEOUT) -> None:
        """Refuse new commits; answers for those in flight arrive before this returns.

        At most ``grace`` seconds: a commit process that stopped answering
        fails what is left (451) instead of holding up the shutdown.
        """
        self._accepting = False
        client, self._client = self._client, None
        if client is not None:
            await client.drain_and_close(grace)

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
        self._given_up: dict[int, str] = {}  # sequence -> queue id, for the late answer's log
        self._idle: asyncio.Event | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def request(self, sequence: int, message: NewMessage) -> CommitResult:
        while not self._writable.is_set():  # every waiter wakes; the first may fill it again
            await self._writable.wait()
        transport = self._transport
        if transport is None or transport.is_closing():
            raise CommitFailed("the connection to the commit process is closed")
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._waiting[sequence] = future
        transport.write(encode((sequence, message_fields(message))))
        try:
            return await future
        except asyncio.CancelledError:
            if self._waiting.pop(sequence, None) is not None:
                self._given_up[sequence] = message.id
            raise

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
        outcome: CommitResult | CommitFailed
        if error is None and queue_id is not None:
            outcome = CommitResult(queue_id, duplicate_of=duplicate_of)
        else:
            outcome = CommitFailed(error or "answer without a queue id")
        future = self._waiting.pop(sequence, None)
        if future is not None and not future.done():
            if isinstance(outcome, CommitResult):
                future.set_result(outcome)
            else:
                future.set_exception(outcome)
        elif (given_up := self._given_up.pop(sequence, None)) is not None:
            log_late_result(given_up, outcome)
        if not self._waiting and not self._given_up and self._idle is not None:
            self._idle.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._writable.set()  # whoever waits to write learns that the connection is gone
        self._fail("the commit process closed the connection")

    def _fail(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(CommitFailed(reason))
        given_up, self._given_up = self._given_up, {}
        for queue_id in given_up.values():
            log.info(
                "queue_id=%s, whose session gave up, may or may not be committed: %s",
                queue_id,
                reason,
            )
        if self._idle is not None:
            self._idle.set()

    async def drain_and_close(self, grace: float) -> None:
        if (self._waiting or self._given_up) and self.alive:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.error(
                    "the commit process did not answer %d request(s) in %g s; "
                    "closing the connection (the sessions still waiting get 451 4.3.0)",
                    len(self._waiting) + len(self._given_up),
                    grace,
                )
                self._fail(f"no answer from the commit process in {grace:g} s")
        if self._transport is not None:
            self._transport.close()


def _answer(item: Any) -> tuple[Any, ...]:
    if not isinstance(item, tuple) or len(item) != 5 or not isinstance(item[0], int):
        raise ValueError(f"an answer is (sequence, queue_id, duplicate_of, error, stats): {item!r}")
    return item
