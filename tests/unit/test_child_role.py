"""The supervised child process of a role: start, readiness, restart, stop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from postlane import child_role
from postlane.child_role import ChildRole, ChildRoleFailed
from postlane.errors import PostlaneError

READY_THEN_WAIT = "print('postlane running: delivery', flush=True); import time; time.sleep(60)"
READY_THEN_EXIT = "print('postlane running: delivery', flush=True)"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_cannot_start_fails_start() -> None:
    async def scenario() -> None:
        role = ChildRole("delivery", python("import sys; sys.exit(3)"))
        with pytest.raises(ChildRoleFailed, match="exited with status 3 while starting"):
            await role.start()

    asyncio.run(scenario())


def test_start_waits_for_ready_and_stop_ends_the_child() -> None:
    async def scenario() -> None:
        role = ChildRole("delivery", python(READY_THEN_WAIT), grace=5)
        await role.start()
        assert role.name == "delivery (own process)"
        pid = role.pid
        assert pid is not None
        await role.stop()
        assert role.pid is None

    asyncio.run(scenario())


def test_a_child_that_dies_is_started_again() -> None:
    async def scenario() -> list[int]:
        role = ChildRole("delivery", python(READY_THEN_EXIT), grace=5)
        await role.start()
        pids = [role.pid]
        for _ in range(60):  # the first restart comes after a second
            await asyncio.sleep(0.1)
            if role.pid not in pids:
                pids.append(role.pid)
                break
        await role.stop()
        return [pid for pid in pids if pid is not None]

    pids = asyncio.run(scenario())
    assert len(pids) == 2 and pids[0] != pids[1]


PARENT = """
import asyncio, sys, uvloop
from postlane.child_role import ChildRole

async def main() -> None:
    role = ChildRole("delivery", [sys.executable, "-c", sys.argv[1]])
    await role.start()
    print(role.pid, flush=True)
    await asyncio.sleep(60)

uvloop.run(main())
"""


def test_a_child_does_not_outlive_a_killed_parent() -> None:
    import os
    import signal
    import subprocess
    import time

    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, READY_THEN_WAIT], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)  # no chance to stop its child
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                return  # exited; waiting for init to reap it
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child kept running after its parent was killed")


# -- restarts that fail, and stopping --------------------------------------------------------

# Starts once (ready, then exits after a moment); every later start fails with status 1,
# as a child does after an edit broke the settings file.
ONCE_THEN_BROKEN = """
import os, sys, time
marker = sys.argv[1]
if os.path.exists(marker):
    sys.exit(1)
open(marker, "w").close()
print('postlane running: commit', flush=True)
time.sleep(0.2)
"""


def fast_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child_role, "RESTART_FIRST", 0.01)
    monkeypatch.setattr(child_role, "RESTART_MAX", 0.02)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_an_oserror_while_restarting_is_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fast_restarts(monkeypatch)
    real = asyncio.create_subprocess_exec
    calls = 0

    async def busy_server(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first restart: fork fails, as with EMFILE on a busy server
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", busy_server)

    async def scenario() -> None:
        role = ChildRole("commit", python(READY_THEN_EXIT), grace=5)
        await role.start()
        first = role.pid
        try:
            for _ in range(200):
                await asyncio.sleep(0.02)
                if calls >= 3 and role.pid != first:
                    break
            assert calls >= 3 and role.pid != first, "the child was not started again"
            assert role._supervisor is not None and not role._supervisor.done()
        finally:
            await role.stop()

    asyncio.run(scenario())
    assert any("Too many open files" in m for m in messages(caplog, logging.ERROR))


def test_an_essential_child_that_keeps_failing_stops_the_service(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    fast_restarts(monkeypatch)
    failures: list[PostlaneError] = []

    async def scenario() -> None:
        role = ChildRole("commit", [*python(ONCE_THEN_BROKEN), str(tmp_path / "started")])
        assert role.essential
        role.on_fatal = failures.append
        await role.start()
        for _ in range(300):
            if failures:
                break
            await asyncio.sleep(0.02)
        assert role._supervisor is not None
        await asyncio.wait_for(role._supervisor, 5)  # it has nothing more to do
        await role.stop()

    asyncio.run(scenario())
    assert len(failures) == 1 and isinstance(failures[0], ChildRoleFailed)
    assert f"failed {child_role.GIVE_UP_AFTER} starts in a row" in str(failures[0])
    critical = messages(caplog, logging.CRITICAL)
    assert len(critical) == 1 and "stopping the service" in critical[0]
    errors = messages(caplog, logging.ERROR)
    # The exit of the running child once, then each failed start with its own status.
    assert sum("starting it again" in m for m in errors) == 1
    failed = [m for m in errors if "could not be started" in m]
    assert len(failed) == child_role.GIVE_UP_AFTER - 1
    assert all("exited with status 1 while starting" in m for m in failed)


def test_a_child_the_service_can_do_without_is_retried_for_ever(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    fast_restarts(monkeypatch)

    async def scenario() -> None:
        role = ChildRole("delivery", [*python(ONCE_THEN_BROKEN), str(tmp_path / "started")])
        assert not role.essential
        role.on_fatal = lambda error: pytest.fail(f"gave up: {error}")
        await role.start()
        try:
            for _ in range(300):
                errors = messages(caplog, logging.ERROR)
                if sum("could not be started" in m for m in errors) > child_role.GIVE_UP_AFTER:
                    break
                await asyncio.sleep(0.02)
            assert role._supervisor is not None and not role._supervisor.done()
        finally:
            await role.stop()

    asyncio.run(scenario())
    assert not messages(caplog, logging.CRITICAL)
    failed = [m for m in messages(caplog, logging.ERROR) if "could not be started" in m]
    assert len(failed) > child_role.GIVE_UP_AFTER
    assert all("the service goes on without it" in m for m in failed)


def test_a_child_runs_in_a_session_of_its_own() -> None:
    async def scenario() -> None:
        role = ChildRole("delivery", python(READY_THEN_WAIT), grace=5)
        await role.start()
        try:
            assert role.pid is not None
            assert os.getsid(role.pid) == role.pid != os.getsid(0)
        finally:
            await role.stop()

    asyncio.run(scenario())


def test_an_exit_once_the_service_is_stopping_is_not_restarted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fast_restarts(monkeypatch)
    caplog.set_level(logging.INFO, logger="postlane")

    async def scenario() -> None:
        role = ChildRole("commit", python(READY_THEN_WAIT), grace=5)
        await role.start()
        pid = role.pid
        assert pid is not None
        role.stopping()  # the runtime's stop signal came...
        os.kill(pid, signal.SIGTERM)  # ...and the child got one too (a group signal)
        await asyncio.sleep(0.3)
        assert role.pid == pid
        await role.stop()

    asyncio.run(scenario())
    assert not messages(caplog, logging.ERROR)
    assert sum("started, pid" in m for m in messages(caplog, logging.INFO)) == 1


# Ready the first time; later starts write their pid and hang before being ready.
ONCE_THEN_HANGING = """
import os, sys, time
marker = sys.argv[1]
if os.path.exists(marker):
    open(marker, "w").write(str(os.getpid()))
    time.sleep(60)
open(marker, "w").close()
print('postlane running: commit', flush=True)
"""


def test_stop_during_a_restart_leaves_no_child_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fast_restarts(monkeypatch)
    marker = tmp_path / "started"

    async def scenario() -> int:
        role = ChildRole("commit", [*python(ONCE_THEN_HANGING), str(marker)], grace=5)
        await role.start()
        for _ in range(300):
            await asyncio.sleep(0.02)
            if marker.read_text():
                break
        await role.stop()  # while the restarted child has not said it runs
        return int(marker.read_text())

    pid = asyncio.run(scenario())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
