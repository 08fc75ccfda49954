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
leased come back when their lease ends. Each failed start is logged with its
own cause. The commit process is essential: without it intake answers 451 to
every message, so after ``GIVE_UP_AFTER`` failed starts in a row (about 30 s;
a settings file broken by an edit, say) the parent logs one CRITICAL line and
the whole service stops with a non-zero status, for a process manager to
restart it or an operator to see. Delivery and further intake processes are
not: mail is still accepted and queued without them, so they are retried
every 30 s for ever, each failure logged as an error.

Children run in a session of their own, so a signal to the parent's process
group (Ctrl-C) reaches only the parent, which stops them in order. On stop
the child gets SIGTERM (it finishes what is in flight, as any role does) and
is killed only if it has not exited after ``grace`` seconds; once the service
is stopping, a child that exits (a signal sent to every process of the
service) is not started again. If the parent itself is killed without a
chance to stop it (SIGKILL, a crash), Linux sends the child SIGTERM
(``PR_SET_PDEATHSIG``), so no child is left running unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Final

from postlane.errors import PostlaneError

__all__ = ["ChildRole", "ChildRoleFailed"]

log = logging.getLogger("postlane")

READY: Final = b"postlane running"
START_TIMEOUT: Final = 60.0
RESTART_FIRST: Final = 1.0
RESTART_MAX: Final = 30.0
STABLE_AFTER: Final = 60.0  # seconds of life after which a restart starts from RESTART_FIRST
GIVE_UP_AFTER: Final = 5  # failed starts in a row after which an essential role stops the service
# Roles without which intake must refuse every message (see the module docstring).
ESSENTIAL: Final = frozenset({"commit"})


class ChildRoleFailed(PostlaneError):
    """The child process of a role did not start."""


class ChildRole:
    """Runs ``command`` (a ``postlane serve --role ...``) as this process's child.

    ``essential`` says whether the service can work without the child; by
    default only the commit process is (see the module documentation).
    ``on_fatal`` is called, once, when an essential child cannot be started
    again; the runtime sets it so that the whole service stops.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        grace: float = 45.0,
        *,
        essential: bool | None = None,
    ) -> None:
        self.name = f"{name} (own process)"
        self.essential = name in ESSENTIAL if essential is None else essential
        self.on_fatal: Callable[[PostlaneError], None] | None = None
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

    def stopping(self) -> None:
        """The service is stopping: from now on an exit of the child is expected.

        A signal sent to every process of the service (systemd's default
        ``KillMode=control-group``) reaches the child while the roles before
        it are still stopping; it must not be started again then.
        """
        self._stopping = True

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
        """Start the child and wait for its "postlane running" line.

        The child gets a session of its own, so that a signal to the parent's
        process group (Ctrl-C in a terminal) reaches the parent only: the
        parent stops its children in order, the commit process last.
        """
        process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # its log lines go where ours go
            start_new_session=True,
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
            await _kill(process)
            raise ChildRoleFailed(f"{self.name} did not start within {START_TIMEOUT:g} s") from None
        except BaseException:  # cancelled (stop() while restarting): leave no child behind
            await _kill(process)
            raise
        log.info("%s started, pid %d", self.name, process.pid)
        return process

    async def _supervise(self) -> None:
        """Start the child again whenever it dies, until the service stops.

        A failed start of any kind is retried: an OSError (EMFILE on a busy
        server) may pass as a bad exit may. An essential child that fails
        GIVE_UP_AFTER starts in a row stops the service instead, because
        every message would be refused while it is missing; a process
        manager or an operator can do something about that, retrying cannot.
        """
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
            down_since = loop.time()
            failures = 0
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX)
                if self._stopping:
                    return
                try:
                    self._process = await self._spawn()
                    break
                except Exception as exc:  # ChildRoleFailed, or OSError from fork/exec
                    failures += 1
                    reason = _cause(exc).removeprefix(f"{self.name} ")
                    down = loop.time() - down_since
                    if self.essential and failures >= GIVE_UP_AFTER:
                        self._give_up(failures, down, reason)
                        return
                    log.error(
                        "%s could not be started (%d failed starts, down for %.0f s): %s; %s"
                        "trying again in %g s",
                        self.name,
                        failures,
                        down,
                        reason,
                        "" if self.essential else "the service goes on without it; ",
                        delay,
                    )

    def _give_up(self, failures: int, down: float, reason: str) -> None:
        message = (
            f"{self.name} failed {failures} starts in a row over {down:.0f} s, "
            f"the last one {reason}; the service cannot work without it"
        )
        log.critical("%s: stopping the service", message)
        if self.on_fatal is not None:
            self.on_fatal(ChildRoleFailed(message))


def _cause(exc: Exception) -> str:
    """Our own errors read well as they are; an OSError needs its kind said."""
    return str(exc) if isinstance(exc, ChildRoleFailed) else f"{type(exc).__name__}: {exc}"


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


_PR_SET_PDEATHSIG: Final = 1


def _end_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """In the child, between fork and exec: SIGTERM when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
