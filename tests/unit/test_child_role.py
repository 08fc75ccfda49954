"""The supervised child process of a role: start, readiness, restart, stop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from postlane.child_role import ChildRole, ChildRoleFailed

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
