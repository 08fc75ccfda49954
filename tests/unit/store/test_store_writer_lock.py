"""The SQLite writer queue: one writer at a time, across threads and processes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from postlane.errors import StoreError
from postlane.store import Database
from postlane.store._writer_lock import WriterLock


def test_writers_of_one_process_take_turns(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "x.db", timeout=5)
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        with lock.held():
            order.append("first in")
            inside.set()
            release.wait(5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(5)
    second = threading.Thread(target=lambda: (lock.held().__enter__(), order.append("second in")))
    second.start()
    time.sleep(0.1)
    assert order == ["first in"]  # the second waits for its turn
    release.set()
    thread.join(5)
    second.join(5)
    assert order == ["first in", "first out", "second in"]
    assert lock.path == tmp_path / "x.db.writer-lock" and lock.path.exists()


def test_a_second_write_from_the_same_thread_fails_instead_of_hanging(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "x.db", timeout=0.2)
    with lock.held(), pytest.raises(StoreError, match="database is locked"):  # noqa: SIM117
        with lock.held():
            pass


def test_another_process_waits_until_the_holder_commits(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "x.db", timeout=5)
    marker = tmp_path / "released"
    code = (
        "import sys; from pathlib import Path;"
        "from postlane.store._writer_lock import WriterLock;"
        "lock = WriterLock(Path(sys.argv[1]), timeout=5); print('waiting', flush=True);"
        "ctx = lock.held(); ctx.__enter__();"
        "print('after' if Path(sys.argv[2]).exists() else 'before', flush=True)"
    )
    with lock.held():
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "x.db"), str(marker)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "waiting"
        time.sleep(0.2)  # give it time to try (and be refused)
        marker.touch()  # the holder is done: written just before its turn ends
    out, _ = child.communicate(timeout=10)
    assert out.strip() == "after"


def test_sqlite_databases_write_through_it(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'postlane.db'}")
    try:
        with db.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        assert (tmp_path / "postlane.db.writer-lock").exists()
    finally:
        db.dispose()


def test_a_lock_file_held_elsewhere_fails_the_write_after_the_timeout(tmp_path: Path) -> None:
    """A held lock file (a stopped writer, a flock by hand) once stopped every writer for ever."""
    lock = WriterLock(tmp_path / "x.db", timeout=0.3)
    lock.path.touch()
    other = os.open(lock.path, os.O_RDWR)  # another open file: as another process's
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        for _ in range(2):  # the second waits on the turn the first one's wait still holds
            started = time.monotonic()
            with pytest.raises(StoreError, match="database is locked"), lock.held():
                pass
            assert time.monotonic() - started < 5
        fcntl.flock(other, fcntl.LOCK_UN)
        deadline = time.monotonic() + 5
        while True:  # the given-up wait takes the lock, gives it back, and the turn with it
            try:
                with lock.held():
                    break
            except StoreError:
                assert time.monotonic() < deadline, "the writer lock never came back"
        # and the file lock was really ours: the other holder has to wait now
        with lock.held(), pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
        lock.close()


def test_a_database_write_fails_with_the_store_error_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    """``flock postlane.db.writer-lock sleep 70`` held intake's commits for the 70 s."""
    db = Database.from_url(f"sqlite:///{tmp_path / 'postlane.db'}")
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "postlane.db.writer-lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert db._writer is not None
        db._writer._timeout = 0.5  # ten seconds in service
        started = time.monotonic()
        with pytest.raises(StoreError, match="database is locked"), db.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        assert time.monotonic() - started < 5
    finally:
        holder.communicate("", timeout=10)
    deadline = time.monotonic() + 5
    while True:  # the holder is gone: writes go through again
        try:
            with db.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            break
        except StoreError:
            assert time.monotonic() < deadline, "writes did not resume"
    db.dispose()
