"""Network namespaces with recording SMTP receivers, for the end-to-end delivery tests.

Each :class:`Mx` is one namespace (``pl-<label>-<pid>-<n>``) joined to the root
namespace by a veth pair on a /30 of 198.18.0.0/15 (RFC 2544 benchmarking
addresses: never routed anywhere), with ``receiver.py`` listening on port 25
of the namespace's address. Nothing else is configured: no route, no
forwarding, so the only traffic is between the root namespace and that
address. :meth:`Mx.close` stops the receiver and deletes the namespace (which
deletes the veth pair); it is safe to call twice and after a partial start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RECEIVER = Path(__file__).with_name("receiver.py")
SMTP_SINK = "/usr/sbin/smtp-sink"  # Postfix's test server (Debian package postfix)
SMTP_PORT = 25


def unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "needs ip (iproute2) to create network namespaces"
    return None


def namespaces_unavailable() -> str | None:
    """Why a namespace cannot be created here (a container without CAP_SYS_ADMIN), or None."""
    probe = f"pl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {run.stderr.strip()}")


class Mx:
    """One namespace, its veth pair and its receiver; see the module docstring."""

    def __init__(
        self,
        label: str,
        index: int,
        directory: Path,
        *,
        cert: tuple[Path, Path] | None,
        instance: int = 1,
        sink: bool = False,
    ) -> None:
        """``sink``: run Postfix's smtp-sink instead of ``receiver.py`` (records nothing)."""
        # Unique per test session (pid) and per set-up within it (instance);
        # interface names have at most 15 characters.
        suffix = f"{os.getpid()}-{instance}"
        self.netns = f"pl-{label}-{suffix}"
        self.root_if = f"plr{index}-{suffix}"
        self.ns_if = f"pln{index}-{suffix}"
        if len(self.root_if) > 15:
            raise ValueError(f"interface name {self.root_if!r} is too long")
        self.root_ip = f"198.18.{index}.1"
        self.ip = f"198.18.{index}.2"
        self.directory = directory
        self.cert = cert
        self.sink = sink
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory.parent / f"{label}-receiver.log"

    def start(self) -> Mx:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _ip("netns", "add", self.netns)
            _ip("link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.netns)
            _ip("addr", "add", f"{self.root_ip}/30", "dev", self.root_if)
            _ip("link", "set", self.root_if, "up")
            _ip("addr", "add", f"{self.ip}/30", "dev", self.ns_if, netns=self.netns)
            _ip("link", "set", self.ns_if, "up", netns=self.netns)
            _ip("link", "set", "lo", "up", netns=self.netns)
            tls = [str(p) for p in self.cert] if self.cert else []
            if self.sink:
                server = [SMTP_SINK, "-u", "nobody", f"{self.ip}:{SMTP_PORT}", "100"]
            else:
                server = [sys.executable, str(RECEIVER), self.ip, str(SMTP_PORT)]
                server += [str(self.directory), *tls]
            with self._log.open("ab") as log:
                self.process = subprocess.Popen(
                    ["ip", "netns", "exec", self.netns, *server],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + 15
            while not self._ready():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"receiver in {self.netns} did not start: {self.log()}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        if not self.sink:
            return (self.directory / "ready").exists()
        try:
            socket.create_connection((self.ip, SMTP_PORT), timeout=1).close()
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        # Deleting the namespace deletes its end of the veth pair, and so the pair.
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.root_if], capture_output=True)

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    # -- behaviour and what was received -------------------------------------------------

    def set_rules(
        self,
        replies: Mapping[str, list[str]] | None = None,
        delay: Mapping[str, float] | None = None,
    ) -> None:
        """Replace the receiver's rules (read at each RCPT and DATA)."""
        rules = {
            "replies": {k.lower(): v for k, v in (replies or {}).items()},
            "delay": dict(delay or {}),
        }
        tmp = self.directory / "rules.tmp"
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.directory / "rules.json")

    def add_replies(self, replies: Mapping[str, list[str]]) -> None:
        current = self.rules()
        current.setdefault("replies", {}).update({k.lower(): v for k, v in replies.items()})
        self.set_rules(current["replies"], current.get("delay"))

    def add_delay(self, domain: str, seconds: float) -> None:
        current = self.rules()
        delay = dict(current.get("delay", {}))
        delay[domain.lower()] = seconds
        self.set_rules(current.get("replies"), delay)

    def rules(self) -> dict[str, Any]:
        path = self.directory / "rules.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def received(self, rcpt: str | None = None) -> list[dict[str, Any]]:
        """Accepted messages in arrival order (to ``rcpt`` only, when given); with ``data``."""
        found = []
        for path in sorted(self.directory.glob("[0-9]*.json")):
            record = json.loads(path.read_text())
            if rcpt is None or rcpt.lower() in (r.lower() for r in record["rcpts"]):
                record["data"] = path.with_suffix(".eml").read_bytes()
                found.append(record)
        return found

    def rcpt_attempts(self, address: str) -> list[str]:
        """Reply codes the receiver gave to RCPT TO this address, in order."""
        path = self.directory / "rcpt.log"
        if not path.exists():
            return []
        codes = []
        for line in path.read_text().splitlines():
            rcpt, _, code = line.rpartition(" ")
            if rcpt.lower() == address.lower():
                codes.append(code)
        return codes
