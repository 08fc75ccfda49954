"""``postlane serve`` stops cleanly on SIGINT (Ctrl-C), as it does on SIGTERM.

SIGTERM is what every integration module's server fixture stops its server
with, asserting exit status 0 and ``postlane stopped``; this module's test
stops its server itself, with SIGINT, and the fixture then has nothing to do.

The other tests run the runtime with stand-in roles, to send signals at
chosen moments (during startup, during shutdown, to every process) and to
see the service stop when its commit process cannot be started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from integration.harness import PostlaneServer, children, connect, expect, send
from postlane.child_role import GIVE_UP_AFTER


def test_sigint_stops_serve_cleanly(server: PostlaneServer) -> None:
    subject = f"before SIGINT {uuid.uuid4().hex}"
    with connect(server.ports.plain) as busy:
        busy.ehlo()
        busy.login("app1", server.passwords["app1"])
        sent = send(
            busy,
            "news@acme.com",
            ["reader@example.net"],
            f"From: news@acme.com\r\nSubject: {subject}\r\n\r\nx\r\n".encode(),
        )
        assert sent.code == 250, sent.text

        with connect(server.ports.relay) as idle:
            idle.ehlo()
            code, out = server.stop(signal.SIGINT)
            # An idle session is told the server is going away.
            expect(idle.getreply(), 421, "4.3.2", "shutting down")
        expect(busy.getreply(), 421, "4.3.2")

    assert code == 0, server.describe()
    lines = out.splitlines()
    assert lines[0].startswith("postlane running: ")
    assert lines[-1] == "postlane stopped"
    assert not server.running
    assert server.store.message(sent.queue_id or "") is not None


# -- signals and failures, with stand-in roles ----------------------------------------------

# The runtime with a commit ChildRole and a role that takes its time to start
# and to stop (as intake does while sessions finish), so that signals can be
# sent during startup and during shutdown. Exits as the CLI does on an error.
SERVE = """
import asyncio, json, sys, types
from postlane import child_role, runtime
from postlane.errors import PostlaneError

options = json.loads(sys.argv[1])
child_role.RESTART_FIRST = child_role.RESTART_MAX = 0.05

class Slow:
    name = "slow"
    async def start(self) -> None:
        print("slow starting", flush=True)
        await asyncio.sleep(options["start"])
    async def stop(self) -> None:
        print("slow stopping", flush=True)
        await asyncio.sleep(options["stop"])

settings = types.SimpleNamespace(log_level="info")
db = types.SimpleNamespace(url="none", dispose=lambda: None)
commit = child_role.ChildRole("commit", [sys.executable, "-c", options["child"], options["marker"]])
try:
    runtime.run(settings, db, b"", (), metrics=False, first=[commit], children=[Slow()])
except PostlaneError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""

# A commit process stand-in: ready, then waits; SIGTERM ends it with status 0.
CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("postlane running: commit", flush=True)
time.sleep(60)
"""

# Starts once, dies soon after; every later start fails (a settings file broken by an edit).
BROKEN_AFTER_FIRST = """
import os, sys, time
if os.path.exists(sys.argv[1]):
    print("error: invalid settings", file=sys.stderr)
    sys.exit(1)
open(sys.argv[1], "w").close()
print("postlane running: commit", flush=True)
time.sleep(0.3)
"""


class Serve:
    """``SERVE`` in a process (and session) of its own, its output collected."""

    def __init__(
        self, tmp_path: Path, *, child: str = CHILD, start: float = 0.0, stop: float = 0.0
    ) -> None:
        options = {"child": child, "marker": str(tmp_path / "marker"), "start": start, "stop": stop}
        self.log = (tmp_path / "serve.log").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE, json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # a group signal reaches it, not pytest
        )

    def wait_for_line(self, prefix: str) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(prefix):
                return
        raise AssertionError(f"no {prefix!r} line:\n{self.stderr()}")

    def finish(self) -> tuple[int, str, str]:
        """Exit status, the rest of stdout, and the log."""
        try:
            out, _ = self.process.communicate(timeout=30)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode, out, self.stderr()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


def test_sighup_during_startup_does_not_end_serve(tmp_path: Path) -> None:
    serve = Serve(tmp_path, start=1.0)
    serve.wait_for_line("slow starting")  # the commit process runs, intake not yet
    serve.process.send_signal(signal.SIGHUP)
    serve.wait_for_line("postlane running")
    serve.process.send_signal(signal.SIGTERM)
    code, out, log = serve.finish()
    assert code == 0, log
    assert out.splitlines()[-1:] == ["postlane stopped"], log


def test_sighup_during_shutdown_does_not_end_serve(tmp_path: Path) -> None:
    serve = Serve(tmp_path, stop=1.0)
    serve.wait_for_line("postlane running")
    serve.process.send_signal(signal.SIGTERM)
    serve.wait_for_line("slow stopping")
    serve.process.send_signal(signal.SIGHUP)
    code, out, log = serve.finish()
    assert code == 0, log
    assert out.splitlines()[-1:] == ["postlane stopped"], log
    assert "SIGHUP ignored: shutting down" in log


def test_a_group_sigterm_stops_without_restarts(tmp_path: Path) -> None:
    """Ctrl-C or ``kill -TERM -PGID``: only the parent gets it; it stops the commit process."""
    serve = Serve(tmp_path, stop=1.0)
    serve.wait_for_line("postlane running")
    os.killpg(serve.process.pid, signal.SIGTERM)
    code, out, log = serve.finish()
    assert code == 0, log
    assert out.splitlines()[-1:] == ["postlane stopped"], log
    assert "starting it again" not in log
    assert log.count("commit (own process) started") == 1, log


def test_sigterm_to_every_process_stops_without_restarts(tmp_path: Path) -> None:
    """systemd's default KillMode=control-group signals the children along with the parent."""
    serve = Serve(tmp_path, stop=1.0)
    serve.wait_for_line("postlane running")
    commit = children(serve.process.pid)
    assert len(commit) == 1
    serve.process.send_signal(signal.SIGTERM)
    os.kill(commit[0], signal.SIGTERM)
    code, out, log = serve.finish()
    assert code == 0, log
    assert out.splitlines()[-1:] == ["postlane stopped"], log
    assert "starting it again" not in log
    assert log.count("commit (own process) started") == 1, log


def test_a_commit_process_that_cannot_start_again_stops_serve(tmp_path: Path) -> None:
    serve = Serve(tmp_path, child=BROKEN_AFTER_FIRST)
    serve.wait_for_line("postlane running")
    code, out, log = serve.finish()
    assert code == 1, log
    assert "postlane stopped" not in out
    critical = [line for line in log.splitlines() if " CRITICAL " in line]
    assert len(critical) == 1, log
    assert f"commit (own process) failed {GIVE_UP_AFTER} starts in a row" in critical[0]
    assert "stopping the service" in critical[0]
    failed = [line for line in log.splitlines() if "could not be started" in line]
    assert len(failed) == GIVE_UP_AFTER - 1, log
    assert all("exited with status 1 while starting" in line for line in failed), log
    assert "the last one exited with status 1 while starting" in critical[0]
    assert "slow stopping" in out  # the other roles were stopped in order
    assert log.rstrip().splitlines()[-1].startswith("error: commit (own process) failed")
