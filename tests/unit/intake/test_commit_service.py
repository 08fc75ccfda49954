"""The commit process and its clients, over a real Unix socket, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from postlane.errors import CommitFailed, ConfigError
from postlane.intake import commit_service
from postlane.intake.commit_service import CommitService, _peer_uid, socket_path
from postlane.intake.committer import BatchOutcome, CommitResult, write_batch
from postlane.intake.remote_committer import RemoteCommitter
from postlane.store import Account, Database
from postlane.store.schema import recipients

from .test_committer import (
    Faults,
    batch_stats,
    count,
    disk_io_error,
    event_rows,
    failures,
    message_ids,
    new_message,
)

T = TypeVar("T")
WAIT = 10.0


@pytest.fixture
def sock() -> Iterator[Path]:
    """A socket path short enough for sun_path (test directories can be long)."""
    directory = tempfile.mkdtemp(prefix="plc")
    try:
        yield Path(directory) / "commit.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), WAIT)

    return asyncio.run(bounded())


@asynccontextmanager
async def serving(db: Database, path: Path, **options: Any) -> AsyncIterator[CommitService]:
    service = CommitService(db, path, **options)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@asynccontextmanager
async def client(path: Path, connect_timeout: float = 2.0) -> AsyncIterator[RemoteCommitter]:
    committer = RemoteCommitter(path, connect_timeout=connect_timeout)
    await committer.open()
    try:
        yield committer
    finally:
        await committer.close()


# -- committing ------------------------------------------------------------------------------


def test_a_message_sent_to_the_commit_process_is_stored_before_the_answer(
    db: Database, account: Account, sock: Path
) -> None:
    message = new_message(account.id)

    async def scenario() -> CommitResult:
        async with serving(db, sock), client(sock) as committer:
            return await committer.commit(message)

    assert run(scenario) == CommitResult(message.id)
    assert message_ids(db) == [message.id]
    assert count(db, recipients) == 1
    assert [t for _, t, _ in event_rows(db)] == ["accepted", "queued"]


def test_messages_waiting_together_share_one_transaction(
    db: Database, account: Account, sock: Path
) -> None:
    batch = [new_message(account.id) for _ in range(20)]
    batches_before, messages_before = batch_stats()

    async def scenario() -> list[CommitResult]:
        async with serving(db, sock), client(sock) as committer:
            return list(await asyncio.gather(*(committer.commit(m) for m in batch)))

    assert run(scenario) == [CommitResult(m.id) for m in batch]
    batches, committed = batch_stats()
    assert committed - messages_before == 20
    assert batches - batches_before < 20  # counted by the client that got each first answer
    assert sorted(message_ids(db)) == sorted(m.id for m in batch)


def test_max_batch_splits_a_long_queue_into_several_commits(
    db: Database, account: Account, sock: Path
) -> None:
    batch = [new_message(account.id) for _ in range(10)]
    batches_before, _ = batch_stats()

    async def scenario() -> None:
        async with serving(db, sock, max_batch=3), client(sock) as committer:
            await asyncio.gather(*(committer.commit(m) for m in batch))

    run(scenario)
    assert batch_stats()[0] - batches_before >= 4
    assert len(message_ids(db)) == 10


def test_a_resubmission_from_another_intake_process_is_a_duplicate(
    db: Database, account: Account, sock: Path
) -> None:
    first = new_message(account.id, dedupe_key="k1")
    again = new_message(account.id, dedupe_key="k1")

    async def scenario() -> tuple[CommitResult, CommitResult]:
        async with serving(db, sock), client(sock) as one, client(sock) as two:
            a = await one.commit(first)
            b = await two.commit(again)
            return a, b

    assert run(scenario) == (CommitResult(first.id), CommitResult(first.id, first.id))
    assert message_ids(db) == [first.id]


def test_a_bad_message_fails_alone_and_its_neighbours_commit(
    db: Database, account: Account, sock: Path
) -> None:
    good1, good2 = new_message(account.id), new_message(account.id)
    bad = new_message(account.id + 1000)  # no such account: the foreign key refuses it
    failed_before = failures()

    async def scenario() -> list[Any]:
        async with serving(db, sock), client(sock) as committer:
            commits = (committer.commit(m) for m in (good1, bad, good2))
            return list(await asyncio.gather(*commits, return_exceptions=True))

    results = run(scenario)
    assert results[0] == CommitResult(good1.id)
    assert isinstance(results[1], CommitFailed)
    assert results[2] == CommitResult(good2.id)
    assert failures() - failed_before == 2  # the group, then the bad message alone
    assert sorted(message_ids(db)) == sorted([good1.id, good2.id])


def test_a_database_failure_fails_every_message_of_a_batch_after_one_transaction(
    db: Database, account: Account, sock: Path, faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [new_message(account.id) for _ in range(20)]
    faults.always(disk_io_error)
    groups: list[int] = []

    def counted(*args: Any) -> BatchOutcome:
        groups.append(len(args[1]))
        return write_batch(*args)

    monkeypatch.setattr(commit_service, "write_batch", counted)
    failed_before = failures()

    async def scenario() -> list[Any]:
        async with serving(db, sock), client(sock) as committer:
            commits = (committer.commit(m) for m in batch)
            return list(await asyncio.gather(*commits, return_exceptions=True))

    results = run(scenario)
    assert all(isinstance(r, CommitFailed) for r in results)
    assert sum(groups) == 20
    assert len(faults.batches) == len(groups)  # one transaction per group, not one per message
    assert failures() - failed_before == len(groups)
    assert count(db, recipients) == 0


def test_a_database_failure_in_the_one_by_one_retries_fails_the_rest_untried(
    db: Database, account: Account, sock: Path, faults: Faults
) -> None:
    good1, good2, good3 = (new_message(account.id) for _ in range(3))
    bad = new_message(account.id + 1000)  # no such account: the foreign key refuses it
    faults.rule = lambda ids: disk_io_error() if ids == [good2.id] else None
    failed_before = failures()

    async def scenario() -> list[Any]:
        async with serving(db, sock), client(sock) as committer:
            commits = (committer.commit(m) for m in (good1, bad, good2, good3))
            return list(await asyncio.gather(*commits, return_exceptions=True))

    results = run(scenario)
    assert faults.batches == [
        [good1.id, bad.id, good2.id, good3.id],
        [good1.id],
        [bad.id],
        [good2.id],
    ]
    assert results[0] == CommitResult(good1.id)
    assert all(isinstance(r, CommitFailed) for r in results[1:])
    assert "not tried" in str(results[3])
    assert failures() - failed_before == 3  # the group, bad, good2
    assert message_ids(db) == [good1.id]


# -- connections -------------------------------------------------------------------------------


def test_with_no_commit_process_intake_cannot_start(sock: Path) -> None:
    async def scenario() -> None:
        async with client(sock, connect_timeout=0.2):
            pass

    with pytest.raises(CommitFailed, match=r"cannot reach the commit process at .*commit\.sock"):
        run(scenario)


def test_messages_in_flight_fail_when_the_commit_process_goes_away_and_the_next_reconnects(
    db: Database, account: Account, sock: Path
) -> None:
    """451 for what may not be stored; the restarted commit process takes the next one."""
    lost, later = new_message(account.id), new_message(account.id)

    async def vanishing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # a request arrived; this "commit process" dies without answering
        writer.close()

    async def scenario() -> CommitResult:
        server = await asyncio.start_unix_server(vanishing, str(sock))
        committer = RemoteCommitter(sock, connect_timeout=5.0)
        await committer.open()
        with pytest.raises(CommitFailed, match="closed the connection"):
            await committer.commit(lost)
        server.close()
        await server.wait_closed()
        async with serving(db, sock):  # a new commit process (it removes the stale file)
            result = await committer.commit(later)
        await committer.close()
        return result

    assert run(scenario) == CommitResult(later.id)
    assert message_ids(db) == [later.id]


@pytest.mark.parametrize("answer", [("not", "an answer"), (1, None, None, None, None)])
def test_an_answer_of_the_wrong_shape_fails_the_commit(sock: Path, answer: tuple[Any, ...]) -> None:
    from postlane.intake.commit_wire import encode

    async def confused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(encode(answer))  # sequence 1 is the first request's

    async def scenario() -> None:
        server = await asyncio.start_unix_server(confused, str(sock))
        async with server, client(sock) as committer:
            await committer.commit(new_message(1))

    with pytest.raises(CommitFailed, match=r"unreadable answer|answer without a queue id"):
        run(scenario)


def test_close_waits_for_the_answers_in_flight_and_then_refuses(
    db: Database, account: Account, sock: Path
) -> None:
    batch = [new_message(account.id) for _ in range(5)]

    async def scenario() -> list[CommitResult]:
        async with serving(db, sock):
            committer = RemoteCommitter(sock)
            await committer.open()
            tasks = [asyncio.ensure_future(committer.commit(m)) for m in batch]
            await asyncio.sleep(0)  # each request is written
            await committer.close()
            assert all(t.done() for t in tasks)
            with pytest.raises(CommitFailed, match="intake is not running"):
                await committer.commit(new_message(account.id))
            return [t.result() for t in tasks]

    assert run(scenario) == [CommitResult(m.id) for m in batch]
    assert len(message_ids(db)) == 5


def test_an_unreadable_request_drops_only_that_connection(
    db: Database, account: Account, sock: Path
) -> None:
    message = new_message(account.id)

    async def scenario() -> tuple[bytes, CommitResult]:
        async with serving(db, sock), client(sock) as committer:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(struct.pack(">I", 3) + b"abc")
            closed = await reader.read()  # the service closes it: EOF, no answer
            writer.close()
            return closed, await committer.commit(message)

    assert run(scenario) == (b"", CommitResult(message.id))


def test_a_request_of_the_wrong_shape_drops_the_connection(db: Database, sock: Path) -> None:
    from postlane.intake.commit_wire import encode

    async def scenario() -> bytes:
        async with serving(db, sock):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(encode(("not", "a request")))
            closed = await reader.read()
            writer.close()
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(encode((1, ("not", "a message"))))
            closed += await reader.read()
            writer.close()
            return closed

    assert run(scenario) == b""


# -- the socket --------------------------------------------------------------------------------


def test_the_socket_is_only_for_our_user_and_removed_on_stop(db: Database, sock: Path) -> None:
    async def scenario() -> int:
        async with serving(db, sock):
            return stat.S_IMODE(os.stat(sock).st_mode)

    assert run(scenario) == 0o600
    assert not sock.exists()


def test_a_stale_socket_file_is_replaced(db: Database, account: Account, sock: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens: a crashed commit process
    message = new_message(account.id)

    async def scenario() -> CommitResult:
        async with serving(db, sock), client(sock) as committer:
            return await committer.commit(message)

    assert run(scenario) == CommitResult(message.id)


def test_a_second_commit_process_on_the_same_socket_is_refused(db: Database, sock: Path) -> None:
    async def scenario() -> None:
        async with serving(db, sock):
            await CommitService(db, sock).start()

    with pytest.raises(ConfigError, match="another Postlane commit process is listening"):
        run(scenario)


def test_the_peer_uid_is_read_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert _peer_uid(a) == os.getuid()


def test_socket_path_is_absolute_and_inside_the_data_dir(tmp_path: Path) -> None:
    assert socket_path(tmp_path) == tmp_path.resolve() / "commit.sock"


def test_a_data_dir_too_long_for_a_socket_is_a_config_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(ConfigError, match=r"longer than 107 bytes.*commit_process = false"):
        socket_path(deep)


# -- sessions that stop waiting, and a commit process that stops answering ---------------------


class HaltingCommitProcess:
    """Reads requests only once ``reading`` is set, and answers each once ``answering`` is."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.answering = asyncio.Event()
        self.received: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from postlane.intake.commit_wire import FrameReader, encode

        await self.reading.wait()
        frames = FrameReader()
        while data := await reader.read(1 << 16):
            for sequence, fields in frames.feed(data):
                self.received.append(sequence)
                await self.answering.wait()
                writer.write(encode((sequence, fields[0], None, None, None)))
        writer.close()


async def soon(condition: Callable[[], object]) -> None:
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def given_up(task: asyncio.Future[Any]) -> None:
    """Cancel a commit's wait, as a session's deadline does."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_a_late_answer_for_a_session_that_gave_up_is_logged_and_ignored(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    late, later = new_message(1), new_message(1)
    process = HaltingCommitProcess()

    async def scenario() -> CommitResult:
        process.reading.set()
        async with await asyncio.start_unix_server(process.handle, str(sock)):
            committer = RemoteCommitter(sock)
            await committer.open()
            task = asyncio.ensure_future(committer.commit(late))
            await soon(lambda: process.received)  # sent: the commit process has it
            await given_up(task)
            process.answering.set()
            result = await committer.commit(later)  # answered after the late one
            await committer.close()
            return result

    with caplog.at_level(logging.INFO, "postlane.intake"):
        assert run(scenario) == CommitResult(later.id)
    assert f"queue_id={late.id} committed after its session gave up" in caplog.text


def test_a_request_waits_for_the_socket_and_is_not_sent_once_its_session_gave_up(
    sock: Path,
) -> None:
    """A stopped commit process once had every waiting message queued in intake's memory."""
    big, small = new_message(1, raw=b"x" * (4 << 20)), new_message(1)
    process = HaltingCommitProcess()

    async def scenario() -> tuple[CommitResult, int]:
        process.answering.set()
        async with await asyncio.start_unix_server(process.handle, str(sock)):
            committer = RemoteCommitter(sock)
            await committer.open()
            first = asyncio.ensure_future(committer.commit(big))  # fills the socket
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(committer.commit(small))
            await asyncio.sleep(0.05)
            assert committer._client is not None and committer._client._transport is not None
            buffered = committer._client._transport.get_write_buffer_size()
            await given_up(second)  # its deadline: it was never written
            process.reading.set()
            result = await first
            await committer.close()
            return result, buffered

    result, buffered = run(scenario)
    assert result == CommitResult(big.id)
    assert process.received == [1]  # the second request (sequence 2) never reached it
    assert buffered < len(big.raw) + (1 << 20)  # one message at most, not every one


def test_close_gives_up_on_a_commit_process_that_does_not_answer(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown waited for ever for the answers of a hung commit process."""
    process = HaltingCommitProcess()

    async def scenario() -> tuple[float, BaseException | None]:
        process.reading.set()  # it reads, and never answers
        async with await asyncio.start_unix_server(process.handle, str(sock)):
            committer = RemoteCommitter(sock)
            await committer.open()
            task = asyncio.ensure_future(committer.commit(new_message(1)))
            await soon(lambda: process.received)
            started = time.monotonic()
            await committer.close(0.3)
            took = time.monotonic() - started
            await asyncio.wait([task], timeout=WAIT)
            return took, task.exception()

    with caplog.at_level(logging.ERROR, "postlane.intake"):
        took, error = run(scenario)
    assert took < 5
    assert isinstance(error, CommitFailed) and "no answer from the commit process" in str(error)
    assert "the commit process did not answer 1 request(s) in 0.3 s" in caplog.text
