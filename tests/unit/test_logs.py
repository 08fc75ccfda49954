from __future__ import annotations

import asyncio
import io
import logging

import pytest

from postlane import logs


@pytest.fixture
def restore_root() -> object:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield None
    root.handlers[:], level = saved
    root.setLevel(level)


def test_info_lines_are_batched_and_warnings_flush_at_once(
    restore_root: object, capsys: pytest.CaptureFixture[str]
) -> None:
    buffer = logs.configure("info")
    log = logging.getLogger("postlane.test")
    log.info("session=1 result=accepted")
    log.debug("not shown at info")
    assert capsys.readouterr().err == ""  # held in memory
    log.warning("auth failed ip=192.0.2.1")
    err = capsys.readouterr().err  # a warning writes everything held, in order
    assert err.index("session=1 result=accepted") < err.index("auth failed")
    assert "not shown" not in err
    log.info("later line")
    buffer.flush()
    assert "later line" in capsys.readouterr().err


def test_periodic_flush_writes_held_lines_and_flushes_when_cancelled(
    restore_root: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "FLUSH_INTERVAL", 0.01)
    buffer = logs.configure("info")
    log = logging.getLogger("postlane.test")

    async def scenario() -> tuple[str, str]:
        task = asyncio.ensure_future(logs.flush_periodically(buffer))
        log.info("first")
        await asyncio.sleep(0.05)
        first = capsys.readouterr().err
        log.info("second")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return first, capsys.readouterr().err

    first, second = asyncio.run(scenario())
    assert "first" in first
    assert "second" in second


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_a_batch_is_flushed_to_the_stream_once(restore_root: object) -> None:
    stream = CountingStream()
    buffer = logs.configure("info", stream)
    log = logging.getLogger("postlane.test")
    for n in range(5):
        log.info("line %d", n)
    assert stream.getvalue() == "" and stream.flushes == 0
    buffer.flush()
    assert stream.getvalue().count("postlane.test line") == 5
    assert stream.flushes == 1
    log.error("at once")
    assert stream.getvalue().endswith("ERROR postlane.test at once\n")
    assert stream.flushes == 2


def test_records_carry_no_caller_or_thread_lookups(restore_root: object) -> None:
    logs.configure("info", CountingStream())
    seen: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logging.getLogger().addHandler(Capture())
    logging.getLogger("postlane.test").info("x")
    (record,) = seen
    assert (record.funcName, record.lineno) == ("(unknown function)", 0)
    assert record.threadName is None and record.processName is None
