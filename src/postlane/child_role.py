"""A role run in a child process of ``postlane serve``, supervised by the parent.

Measured under bench/relay on a 2-core machine: with intake and delivery in
one Python process they share one interpreter lock, and the process tops
out near one core (402 msg/s end to end at ``smtp-source -s 10``); with
delivery in its own process the same work uses both cores (550-660 msg/s,
and 770 at ``-s 100`` against 490). So plain ``postlane serve`` runs the
delivery role as ``postlane serve --role delivery --no-metrics`` beside
itself (``delivery.own_process``, default true). The child reads the same
settings (same working directory, environment and settings file) and the
same database; SQLite writers take turns through the store's writer lock,
and the queue's leases make it safe for any number of delivery processes.

The parent starts the child and waits for it to say it is running, so a
child that cannot start fails ``serve`` at once with the child's own error
output. If the child dies later, the parent logs it and starts a new one
(after 1 s, doubling to 30 s while it keeps dying); rows the dead child had
leased come back when their lease ends. On stop the child gets SIGTERM (it
finishes what is in flight, as any role does) and is killed only if it has
not exited after ``grace`` seconds. If the parent itself is killed without
a chance to stop it (SIGKILL, a crash), Linux sends the child SIGTERM
(``PR_SET_PDEATHSIG``), so no delivery process is left running unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Final

from postlane.errors import PostlaneError

__all__ = ["ChildRole", "ChildRoleFailed"]

log = logging.getLogger("postlane")

READY: Final = b"postlane running"
START_TIMEOUT: Final = 60.0
RESTART_FIRST: Final = 1.0
RESTART_MAX: Final = 30.0
STABLE_AFTER: Final = 60.0  # seconds of life after which a restart starts from RESTART_FIRST


class ChildRoleFailed(PostlaneError):
    """The child process of a role did not start."""


class ChildRole:
    """Runs ``command`` (a ``postlane serve --role ...``) as this process's child."""

    def __init__(self, name: str, command: Sequence[str], grace: float = 45.0) -> None:
        self.name = f"{name} (own process)"
        self._command = list(command)
        self._grace = grace
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        self._stopping = False
        self._process = await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self._grace)
        except TimeoutError:
            log.error("%s did not stop within %g s: killed", self.name, self._grace)
            process.kill()
            await process.wait()

    def reload(self) -> None:
        """Pass SIGHUP on (its roles reload, e.g. the TLS certificate)."""
        process = self._process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGHUP)

    async def _spawn(self) -> asyncio.subprocess.Process:
        """Start the child and wait for its "postlane running" line."""
        process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # its log lines go where ours go
            preexec_fn=_end_with_parent if sys.platform == "linux" else None,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    line = await process.stdout.readline()
                    if not line:
                        code = await process.wait()
                        raise ChildRoleFailed(
                            f"{self.name} exited with status {code} while starting "
                            "(its errors are above)"
                        )
                    if line.startswith(READY):
                        break
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ChildRoleFailed(f"{self.name} did not start within {START_TIMEOUT:g} s") from None
        log.info("%s started, pid %d", self.name, process.pid)
        return process

    async def _supervise(self) -> None:
        delay = RESTART_FIRST
        loop = asyncio.get_running_loop()
        while not self._stopping:
            process = self._process
            assert process is not None and process.stdout is not None
            started = loop.time()
            with contextlib.suppress(Exception):  # its stdout is only drained
                while await process.stdout.readline():
                    pass
            code = await process.wait()
            if self._stopping:
                return
            if loop.time() - started >= STABLE_AFTER:
                delay = RESTART_FIRST
            log.error("%s exited with status %d; starting it again in %g s", self.name, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            try:
                self._process = await self._spawn()
            except ChildRoleFailed as exc:
                log.error("%s", exc)
                self._process = process  # exited: the loop waits again, then retries


_PR_SET_PDEATHSIG: Final = 1


def _end_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """In the child, between fork and exec: SIGTERM when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
