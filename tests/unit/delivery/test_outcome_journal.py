"""The delivery journal: written before the next copy, read back only once its writer is gone."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from postlane.delivery import outcome_journal
from postlane.delivery.outcome_journal import OutcomeJournal, orphans
from postlane.errors import StoreError
from postlane.store.queue import Delivery

OWNER = "host:123:abcd"


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.journal"))


def delivery(n: int) -> Delivery:
    return Delivery(n, {"mx": "mx.example.net", "tls": "TLSv1.3"}, f"250 2.0.0 Ok: queued as Q{n}")


def test_a_live_writers_file_is_not_an_orphan(tmp_path: Path) -> None:
    journal = OutcomeJournal(tmp_path, OWNER)
    journal.append(delivery(1))
    assert len(files(tmp_path)) == 1
    assert list(orphans(tmp_path)) == []  # locked by its writer, even within one process


def test_a_file_goes_once_its_deliveries_are_recorded_and_a_newer_one_was_started(
    tmp_path: Path,
) -> None:
    journal = OutcomeJournal(tmp_path, OWNER, rotate_after=2)
    first = [journal.append(delivery(n)) for n in (1, 2)]
    third = journal.append(delivery(3))  # a new file: the first holds rotate_after lines
    assert first[0] == first[1] != third
    assert len(files(tmp_path)) == 2
    journal.recorded(first[0])
    assert len(files(tmp_path)) == 2  # one of its deliveries is not in the database yet
    journal.recorded(first[1])
    assert len(files(tmp_path)) == 1
    journal.recorded(third)
    assert len(files(tmp_path)) == 1  # the current file stays until it is full
    journal.close()
    assert files(tmp_path) == []  # everything recorded: nothing left behind


def test_close_leaves_unrecorded_deliveries_to_a_sweep(tmp_path: Path) -> None:
    journal = OutcomeJournal(tmp_path, OWNER)
    done = journal.append(delivery(1))
    journal.append(delivery(2))
    journal.recorded(done)
    journal.close()

    (orphan,) = orphans(tmp_path)
    assert orphan.owner == OWNER
    assert orphan.deliveries == [delivery(1), delivery(2)]  # both lines, the sweep is fenced
    assert list(orphans(tmp_path)) == []  # locked while we handle it
    orphan.done()
    assert files(tmp_path) == []


def test_a_recording_that_arrives_after_close_does_not_count_against_a_newer_file(
    tmp_path: Path,
) -> None:
    # Tokens restarted at 1 after close(): the late recording of delivery 1
    # released the new file, whose delivery 2 was not in the database yet.
    journal = OutcomeJournal(tmp_path, OWNER)
    old = journal.append(delivery(1))
    journal.close()  # delivery 1 is left to a sweep
    (orphan,) = orphans(tmp_path)
    orphan.keep()
    new = journal.append(delivery(2))
    assert new != old
    journal.recorded(old)
    assert len(files(tmp_path)) == 2  # the new file keeps delivery 2 until it is recorded
    journal.recorded(new)
    journal.close()
    assert len(files(tmp_path)) == 1  # only the old file, for the sweep


def test_a_failed_recording_keeps_the_file_for_the_next_sweep(tmp_path: Path) -> None:
    journal = OutcomeJournal(tmp_path, OWNER)
    journal.append(delivery(7))
    journal.close()
    (orphan,) = orphans(tmp_path)
    orphan.keep()
    (again,) = orphans(tmp_path)
    assert again.deliveries == [delivery(7)]
    again.done()


def test_the_file_of_a_killed_process_is_an_orphan(tmp_path: Path) -> None:
    program = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from postlane.delivery.outcome_journal import OutcomeJournal\n"
        "from postlane.store.queue import Delivery\n"
        "journal = OutcomeJournal(Path(sys.argv[1]), 'killed:1:x')\n"
        "journal.append(Delivery(42, {'mx': 'mx.example.net'}, '250 ok'))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path)], check=False)
    assert done.returncode == -signal.SIGKILL
    (orphan,) = orphans(tmp_path)
    assert (orphan.owner, orphan.deliveries) == (
        "killed:1:x",
        [Delivery(42, {"mx": "mx.example.net"}, "250 ok")],
    )
    orphan.done()


def test_unreadable_lines_are_skipped_by_name_and_a_file_without_owner_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.journal").write_text(
        '{"owner": "x:1:y"}\n{"id": 5, "data": {}, "reply": "250 ok"}\n{"id": 6, "da'
    )
    (tmp_path / "b.journal").write_text('{"id": 5}\n')
    with caplog.at_level(logging.WARNING, logger=outcome_journal.__name__):
        (orphan,) = orphans(tmp_path)
    assert orphan.deliveries == [Delivery(5, {}, "250 ok")]
    assert "a.journal line 3 unreadable" in caplog.text
    assert "b.journal has no owner line; removed" in caplog.text
    assert not (tmp_path / "b.journal").exists()
    orphan.done()


def test_a_journal_that_cannot_be_written_says_where(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    journal = OutcomeJournal(blocked, OWNER)
    with pytest.raises(StoreError, match=r"cannot create delivery journal .*not-a-directory"):
        journal.append(delivery(1))


def test_no_directory_means_no_orphans(tmp_path: Path) -> None:
    assert list(orphans(tmp_path / "missing")) == []
