"""The work of ``bench/relay``: Postfix vs Postlane, intake AND delivery, end to end.

Run it through ``bench/relay``, which installs what it needs (Debian's postfix for
``smtp-source`` and ``smtp-sink``, sqlite3, the repository's .venv, dnslib and
dkimpy) and then runs this file with the venv's Python. Everything listens on
and connects to 127.0.0.1 only. See docs/benchmarks.md.

For each ``smtp-source -s S`` (default 10 and 100), Postfix first, then Postlane,
each with a fresh queue / data directory and its own fresh ``smtp-sink``:

- ``smtp-source -s S -m 20000 -l 10240`` sends to the server; the server relays
  every message to ``smtp-sink -c`` on 127.0.0.1 (Postfix: ``relayhost =
  [127.0.0.1]:SINK``; Postlane: ``serve --role smtp --role delivery`` with
  ``[delivery] nameservers`` pointing at an in-process ``tests/dnsserver.py``
  that answers ``example.com MX 10 mx.sink.bench.test``, ``A 127.0.0.1``,
  and ``mx_port`` = the sink's port). Every Postlane copy is DKIM-signed with
  the sending domain's RSA-2048 key (made by ``postlane domain add``).
- Clock: from starting smtp-source until the last message is delivered.
  Postfix: until the sink has counted N messages (then its log must show N
  ``status=sent`` and an empty queue). Postlane: until the database has N
  recipients ``delivered`` (the sink must also count N). Both times (sink
  count and server's own record) are reported for both servers.

With ``--drain`` the clock measures delivery alone, a backlog like a
campaign's: each server first takes all N messages and holds them (Postfix:
a ``header_checks`` rule ``/^From:/ HOLD``; Postlane: only ``serve --role
smtp`` runs), then the clock starts and they are released (Postfix:
``postsuper -H ALL`` and ``postqueue -f``; Postlane: ``serve --role
delivery`` is started, its start-up inside the clock) and runs until the
last is delivered, as above.

Reuses bench/ingest_driver.py's helpers (Postfix instance, Postlane process,
CPU accounting, machine info); bench/ingest itself is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest_driver as ing
from ingest_driver import (
    BenchError,
    CpuWindow,
    Ports,
    Postfix,
    Postlane,
    clean_env,
    free_port,
    machine_info,
    postlane_cli,
    proc_cpu,
    proc_status_kib,
    say,
    settle,
    smtp_source_cmd,
    wait_banner,
)

REPO = ing.REPO
sys.path.insert(0, str(REPO / "tests"))
from dnsserver import DnsServer  # noqa: E402

VENV_PY = ing.VENV_PY
RECIPIENT_DOMAIN = ing.RECIPIENT.split("@", 1)[1]  # example.com: smtp-source's -t
SINK_MX = "mx.sink.bench.test"


def smtp_sink_path() -> str:
    found = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.access(found, os.X_OK):
        raise BenchError("smtp-sink not found: run bench/relay (it installs postfix)")
    return found


# -- the sink ------------------------------------------------------------------------------


class Sink:
    """``smtp-sink -c`` on 127.0.0.1:port; its running counters tell how many messages arrived."""

    _COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")

    def __init__(self, base: Path, port: int, dump: Path | None = None) -> None:
        self.base = base
        self.port = port
        self.dump = dump
        self.out = base / "sink.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        cmd = [smtp_sink_path(), "-c", "-u", "nobody", "-h", SINK_MX]
        if self.dump is not None:
            self.dump.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.dump, user="nobody")
            cmd += ["-d", f"{self.dump}/%H%M%S."]
        cmd += [f"127.0.0.1:{self.port}", "1024"]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_banner(self.port)

    def counters(self) -> dict[str, int]:
        """The last counters line: sessions, QUITs, messages (each '.' received)."""
        try:
            with open(self.out, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256))
                tail = fh.read()
        except OSError:
            tail = b""
        found = self._COUNTERS.findall(tail)
        if not found:
            return {"sessions": 0, "quits": 0, "messages": 0}
        s, q, m = (int(v) for v in found[-1])
        return {"sessions": s, "quits": q, "messages": m}

    def messages(self) -> int:
        return self.counters()["messages"]

    def cpu(self) -> float:
        assert self.proc is not None
        try:
            return proc_cpu(self.proc.pid)
        except OSError:
            return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- Postfix, relaying ---------------------------------------------------------------------

POSTFIX_RELAY_MAIN_CF = (
    "# Written by bench/relay: accept, then relay all of it to smtp-sink.\n"
    + ing.POSTFIX_BASE_CF
    + "relayhost = [127.0.0.1]:{sink_port}\n"
)


class RelayPostfix(Postfix):
    """bench/ingest's isolated instance, with a relayhost instead of the discard transport."""

    def __init__(self, base: Path, port: int, sink_port: int, *, hold: bool = False) -> None:
        super().__init__(base, port)
        self.sink_port = sink_port
        self.hold = hold  # --drain: every message waits in the hold queue until release()

    def start(self) -> None:
        # as Postfix.start, but with POSTFIX_RELAY_MAIN_CF
        for d in (self.etc, self.base / "spool", self.base / "data"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # noqa: S103 - Postfix daemons read below it
        shutil.chown(self.base / "data", user="postfix")
        main_cf = POSTFIX_RELAY_MAIN_CF.format(base=self.base, sink_port=self.sink_port)
        if self.hold:
            (self.etc / "hold_checks").write_text("/^From:/ HOLD\n")
            main_cf += f"header_checks = regexp:{self.etc}/hold_checks\n"
        (self.etc / "main.cf").write_text(main_cf)
        shutil.copy("/etc/postfix/master.cf", self.etc / "master.cf")
        if Path("/etc/postfix/dynamicmaps.cf").exists():
            shutil.copy("/etc/postfix/dynamicmaps.cf", self.etc / "dynamicmaps.cf")
        postconf = ["postconf", "-c", str(self.etc)]
        subprocess.run([*postconf, "-M#", "smtp/inet"], check=True)
        service = f"127.0.0.1:{self.port}/inet"
        entry = f"127.0.0.1:{self.port} inet n - n - - smtpd"
        subprocess.run([*postconf, "-Me", f"{service}={entry}"], check=True)
        subprocess.run([*postconf, "-F", "*/*/chroot = n"], check=True)
        self.postfix("check")
        self.postfix("start")
        pid_file = self.base / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        self.master_pid = int(pid_file.read_text().split()[0])
        wait_banner(self.port)

    def held(self) -> int:
        """Messages in the hold queue."""
        return sum(1 for f in (self.base / "spool" / "hold").rglob("*") if f.is_file())

    def release(self) -> None:
        """Release every held message and ask for delivery now (held mail goes to deferred)."""
        for command in (["postsuper", "-H", "ALL"], ["postqueue", "-f"]):
            subprocess.run(
                [command[0], "-c", str(self.etc), *command[1:]], check=True, capture_output=True
            )

    def relay_counts(self) -> dict[str, int]:
        text = self.log_text()
        return {
            "cleanup_message_ids": len(
                set(re.findall(r"postfix/cleanup\[\d+\]: \w+: message-id=(\S+)", text))
            ),
            "sent": len(re.findall(r"postfix/smtp\[\d+\]: \w+: to=<.* status=sent", text)),
            "deferred": len(re.findall(r" status=deferred", text)),
            "bounced": len(re.findall(r" status=bounced", text)),
        }


# -- Postlane, both roles ---------------------------------------------------------------------

POSTLANE_RELAY_TOML = """\
# Written by bench/relay. Storage settings are Postlane's defaults (SQLite in
# data_dir, WAL, synchronous=FULL): nothing here weakens durability.
hostname = "{hostname}"
data_dir = "data"

[http]
address = "127.0.0.1"
port = {http}

[smtp]
processes = {smtp_processes}
commit_process = {commit_process}

# smtp-source cannot AUTH; 127.0.0.1 is the account's trusted network.
[[smtp.listeners]]
address = "127.0.0.1"
port = {smtp}
tls = "none"
submission = true

[delivery]
nameservers = ["{nameserver}"]
mx_port = {sink}
allow_internal_mx = true
concurrency = {concurrency}
lease_batch = {lease_batch}
poll_interval = {poll_interval}
shaping_rules = "{shaping}"
"""

# The shipped [default] allows 2 connections and 60 messages a minute per
# destination; the sink is one destination, so the benchmark lifts those limits.
SHAPING_TOML = """\
# Written by bench/relay: the sink is one destination; do not throttle it.
[default]
max_connections = {max_connections}
messages_per_connection = {per_connection}
messages_per_minute = 100000000
"""


class RelayPostlane(Postlane):
    """bench/ingest's Postlane, in one of three arrangements (``mode``):

    - ``serve``: plain ``postlane serve``, as an operator runs it: intake in
      the first process, delivery in the child process it starts;
    - ``one``: ``serve --role smtp --role delivery``, both in one process;
    - ``split``: ``serve --role smtp`` and ``serve --role delivery`` started
      separately (its metrics endpoint on ``delivery_http``);
    - ``drain``: as ``split``, but the delivery role only starts on
      :meth:`release`.

    CPU and memory are the sum over the processes; logs are both processes'.
    """

    mode = "serve"
    delivery_http = 0
    delivery_proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, roles: list[str], stem: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(self.dir / f"{stem}.out", "wb")  # noqa: SIM115
        err = open(self.dir / f"{stem}.log", "wb")  # noqa: SIM115
        command = [str(VENV_PY), "-m", "postlane", "serve"]
        for role in roles:
            command += ["--role", role]
        proc = subprocess.Popen(
            command, cwd=self.dir, env=env, stdout=out, stderr=err, start_new_session=True
        )
        out.close()
        err.close()
        deadline = time.monotonic() + 60
        while "postlane running" not in (self.dir / f"{stem}.out").read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"postlane serve did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        return proc

    def start(self) -> None:
        # as Postlane.start, with the delivery role added (in this process or its own)
        shutil.copytree(self.template, self.dir)
        if self.mode in ("split", "drain"):
            self.proc = self._spawn(["smtp"], "serve", clean_env())
            if self.mode == "split":
                self.release()
        elif self.mode == "one":
            self.proc = self._spawn(["smtp", "delivery"], "serve", clean_env())
        else:
            self.proc = self._spawn([], "serve", clean_env())
        wait_banner(self.ports.trusted)
        self.startup_hwm_kib = self.hwm_kib()

    def release(self) -> None:
        """Start the delivery role in its own process (``split``, and ``drain`` on cue)."""
        env = {**clean_env(), "POSTLANE_HTTP__PORT": str(self.delivery_http)}
        self.delivery_proc = self._spawn(["delivery"], "delivery", env)

    def held(self) -> int:
        """Recipients waiting for the delivery role (``drain``: all of them until release)."""
        return self.statuses().get("queued", 0)

    def _others(self) -> list[int]:
        """Postlane processes beside the first: the one we started (split) or serve's own."""
        if self.delivery_proc is not None and self.delivery_proc.poll() is None:
            return [self.delivery_proc.pid]
        if self.proc is None or self.proc.poll() is not None:
            return []
        return self.children()

    def cpu(self) -> float:
        total = super().cpu()  # the first process and its children
        if self.delivery_proc is not None and self.delivery_proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                total += proc_cpu(self.delivery_proc.pid)
        return total

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds of each live Postlane process, by what it runs.

        ``intake`` is the first process; the others are named by their
        ``--role`` (``commit``, ``delivery``, a second ``smtp``).
        """
        parts: dict[str, float] = {}
        if self.proc is None or self.proc.poll() is not None:
            return parts
        others = set(self._others()) | set(self.children())  # split: delivery's and commit's
        for pid, label in [(self.proc.pid, "intake"), *((pid, "") for pid in sorted(others))]:
            with contextlib.suppress(OSError, ValueError):
                if not label:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    roles = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == b"--role"]
                    label = "+".join(r.decode() for r in roles) or "other"
                parts[label] = parts.get(label, 0.0) + proc_cpu(pid)
        return parts

    def hwm_kib(self) -> int:
        total = super().hwm_kib()
        for pid in self._others():
            with contextlib.suppress(OSError, ValueError):
                total += proc_status_kib(pid, "VmHWM")
        return total

    def log_text(self) -> str:
        text = super().log_text()
        if self.mode in ("split", "drain"):
            text += (self.dir / "delivery.log").read_text(errors="replace")
        return text

    def stop(self) -> None:
        delivery, self.delivery_proc = self.delivery_proc, None
        if delivery is not None and delivery.poll() is None:
            delivery.send_signal(signal.SIGTERM)
            try:
                delivery.wait(60)
            except subprocess.TimeoutExpired:
                delivery.kill()
                delivery.wait()
        super().stop()

    def statuses(self) -> dict[str, int]:
        db = self.dir / "data" / "postlane.db"
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            ) as conn:
                return dict(conn.execute("select status, count(*) from recipients group by status"))
        except sqlite3.Error:
            return {}

    def query(self, sql: str) -> str:
        return subprocess.run(
            ["sqlite3", "-readonly", "-batch", str(self.dir / "data" / "postlane.db"), sql],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()


_LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|result=rejected")


def make_template(directory: Path, ports: Ports, cfg: dict[str, Any]) -> str:
    """Data directory: account, sending domain (RSA-2048 DKIM key), trusted 127.0.0.1."""
    directory.mkdir(parents=True)
    shaping = directory.parent / "shaping_rules.toml"
    shaping.write_text(
        SHAPING_TOML.format(
            max_connections=cfg["concurrency"], per_connection=cfg["messages_per_connection"]
        )
    )
    (directory / "postlane.toml").write_text(
        POSTLANE_RELAY_TOML.format(
            hostname=ing.HOSTNAME,
            http=ports.http,
            smtp=ports.trusted,
            nameserver=cfg["nameserver"],
            sink=cfg["sink_port"],
            concurrency=cfg["concurrency"],
            lease_batch=cfg["lease_batch"],
            poll_interval=cfg["poll_interval"],
            shaping=shaping,
            smtp_processes=cfg["smtp_processes"],
            commit_process=str(cfg.get("commit_process", True)).lower(),
        )
    )
    postlane_cli(directory, "account", "create", "bench")
    postlane_cli(directory, "domain", "add", "--account", "bench", "bench.test")
    postlane_cli(directory, "account", "update", "bench", "--trusted-networks", ing.TRUSTED_IP)
    out = postlane_cli(directory, "domain", "dns", "bench.test")
    match = re.search(r"^(\S+\._domainkey\.bench\.test)\.?\s+IN\s+TXT\s+(.*)$", out, re.M)
    if match is None:
        raise BenchError(f"no DKIM record in the output of domain dns: {out!r}")
    txt = "".join(re.findall(r'"([^"]*)"', match.group(2)))  # split into 255-byte strings
    return f"{match.group(1)}|{txt}"


# -- one measured run ---------------------------------------------------------------------------


class Relay:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.results: dict[str, Any] = {"runs": []}
        self.failures: list[str] = []
        self.counter = 0
        self.live: list[Any] = []

    def run_dir(self, name: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:02d}-{name}"

    def fail(self, message: str) -> None:
        say("FAILED CHECK: " + message)
        self.failures.append(message)

    # -- the clock -----------------------------------------------------------------------

    def measure(
        self,
        server_name: str,
        sessions: int,
        n: int,
        port: int,
        sink: Sink,
        server_cpu: Any,
        done_by_server: Any,
        log_dir: Path,
        held: Any = None,
        server_parts: Any = None,
    ) -> dict[str, Any]:
        """Send n messages; poll until the sink has n and the server says all are delivered.

        With ``held`` (``--drain``: the server, which holds what it takes) the
        messages are sent first, untimed, and the clock runs from
        ``held.release()``. ``server_parts``, when given, returns the server's
        CPU seconds per process role, recorded for the same window.
        """
        source_s = source_rc = proc = None
        client_cpu = 0.0
        if held is not None:
            accept_started = time.perf_counter()
            with open(log_dir / "client.log", "wb") as out:
                source_rc = subprocess.run(
                    smtp_source_cmd(port, sessions, n, self.args.size),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=False,
                ).returncode
            source_s = time.perf_counter() - accept_started
            deadline = time.monotonic() + 60
            while (waiting := held.held()) < n and time.monotonic() < deadline:
                time.sleep(0.2)
            if waiting != n or sink.messages():
                self.fail(
                    f"{server_name} s={sessions}: {waiting} held and {sink.messages()} sent, "
                    f"expected {n} held and none sent before the release"
                )
        background = settle(self.args.quiet_threshold, self.args.quiet_wait)
        self_ru0 = resource.getrusage(resource.RUSAGE_SELF)
        parts0 = server_parts() if server_parts is not None else {}
        cpu0, sink0, window = server_cpu(), sink.cpu(), CpuWindow()
        started = time.perf_counter()
        if held is not None:
            held.release()
        else:
            with open(log_dir / "client.log", "wb") as out:
                proc = subprocess.Popen(
                    smtp_source_cmd(port, sessions, n, self.args.size),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        sink_s = server_s = None
        progress: list[tuple[float, int, int]] = []
        last_progress = -1.0
        limit = started + self.args.run_limit
        server_done = 0
        while True:
            now = time.perf_counter()
            if proc is not None and source_s is None:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    source_s = now - started
                    source_rc = os.waitstatus_to_exitcode(status)
                    client_cpu = usage.ru_utime + usage.ru_stime
            got = sink.messages()
            if sink_s is None and got >= n:
                sink_s = now - started
            # the server's own record: cheap enough once the sink is complete, else every 1 s
            if server_s is None and (sink_s is not None or now - last_progress >= 1.0):
                server_done = done_by_server()
                if server_done >= n:
                    server_s = time.perf_counter() - started
            if now - last_progress >= 1.0:
                last_progress = now
                progress.append((round(now - started, 1), got, server_done))
            if source_s is not None and sink_s is not None and server_s is not None:
                break
            if now > limit:
                if proc is not None and source_s is None:
                    proc.kill()
                    proc.wait()
                self.fail(
                    f"{server_name} s={sessions}: not done after {self.args.run_limit} s "
                    f"(sink {got}, server {server_done}, smtp-source "
                    f"{'done' if source_s else 'running'})"
                )
                break
            time.sleep(0.02 if sink_s is not None else 0.1)
        timed = [v for v in (sink_s, server_s) if v is not None]
        if proc is not None and source_s is not None:
            timed.append(source_s)
        end_s = max(timed, default=0.0)
        cpu1, sink1 = server_cpu(), sink.cpu()
        parts1 = server_parts() if server_parts is not None else {}
        parts = {k: round(v - parts0.get(k, 0.0), 2) for k, v in parts1.items()}
        self_ru1 = resource.getrusage(resource.RUSAGE_SELF)
        driver_cpu = (self_ru1.ru_utime + self_ru1.ru_stime) - (
            self_ru0.ru_utime + self_ru0.ru_stime
        )
        machine = window.finish(end_s, cpu1 - cpu0 + sink1 - sink0 + driver_cpu, client_cpu)
        complete = sink_s is not None and server_s is not None
        return {
            "server": server_name,
            "sessions": sessions,
            "messages": n,
            "drain": held is not None,
            "complete": complete,
            "seconds": round(end_s, 3),
            "msg_per_s": round(n / end_s, 1) if complete else None,
            "source_seconds": round(source_s, 3) if source_s else None,
            "accept_msg_per_s": round(n / source_s, 1) if source_s else None,
            "sink_complete_s": round(sink_s, 3) if sink_s else None,
            "server_complete_s": round(server_s, 3) if server_s else None,
            "smtp_source_rc": source_rc,
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "server_cpu_parts_s": parts,
            "sink_cpu_s": round(sink1 - sink0, 2),
            "client_cpu_s": round(client_cpu, 2),
            "driver_cpu_s": round(driver_cpu, 2),
            "background_busy_pct": background,
            **machine,
            "progress": progress,
        }

    # -- Postfix ------------------------------------------------------------------------

    def postfix_run(self, sessions: int, n: int, tag: str) -> dict[str, Any]:
        base = self.run_dir(f"postfix-{tag}")
        sink = Sink(base / "sink", free_port(self.args.postfix_sink_port))
        pf = RelayPostfix(base, free_port(self.args.postfix_port), sink.port, hold=self.args.drain)
        self.live += [sink, pf]
        sink.start()
        pf.start()

        def sent() -> int:
            return pf.relay_counts()["sent"]

        held = pf if self.args.drain else None
        result = self.measure("Postfix", sessions, n, pf.port, sink, pf.cpu, sent, base, held)
        time.sleep(1.0)  # anything extra (a duplicate) would show up in the sink by now
        counts = pf.relay_counts()
        queue_empty = pf.queue_empty()
        problems = pf.problems()
        sink_final = sink.counters()
        pf.stop()
        sink.stop()
        self.live = [x for x in self.live if x not in (pf, sink)]
        shutil.rmtree(base / "spool", ignore_errors=True)
        result.update(
            {
                "postfix_log": counts,
                "queue_empty": queue_empty,
                "sink": sink_final,
                "log_problems": problems[:8],
                "log_problem_count": len(problems),
                "settings": {
                    k: subprocess.run(
                        ["postconf", "-c", str(pf.etc), "-h", k],
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout.strip()
                    for k in (
                        "relayhost",
                        "default_destination_concurrency_limit",
                        "smtp_destination_concurrency_limit",
                        "default_process_limit",
                        "in_flow_delay",
                        "smtp_tls_security_level",
                        "smtp_connection_cache_on_demand",
                    )
                },
            }
        )
        label = f"Postfix s={sessions}"
        if result["smtp_source_rc"] != 0:
            self.fail(f"{label}: smtp-source exited {result['smtp_source_rc']}")
        if sink_final["messages"] != n:
            self.fail(f"{label}: sink counted {sink_final['messages']} messages, expected {n}")
        if counts["sent"] != n or counts["cleanup_message_ids"] != n or not queue_empty:
            self.fail(f"{label}: log {counts}, queue empty {queue_empty}")
        self.report(result)
        return result

    # -- Postlane -------------------------------------------------------------------------

    def postlane(self, base: Path, *, drain: bool = False) -> RelayPostlane:
        """A Postlane in ``--processes``'s arrangement, or holding its mail (``drain``)."""
        pl = RelayPostlane(self.template, base / "postlane", self.ports)
        pl.mode = "drain" if drain else self.args.processes
        pl.delivery_http = self.delivery_http_port
        return pl

    def postlane_run(self, sessions: int, n: int, tag: str) -> dict[str, Any]:
        base = self.run_dir(f"postlane-{tag}")
        base.mkdir()
        sink_port = self.sink_port_postlane
        sink = Sink(base / "sink", sink_port)
        pl = self.postlane(base, drain=self.args.drain)
        self.live += [sink, pl]
        sink.start()
        pl.start()

        def delivered() -> int:
            return pl.statuses().get("delivered", 0)

        held = pl if self.args.drain else None
        port = self.ports.trusted
        result = self.measure(
            "Postlane", sessions, n, port, sink, pl.cpu, delivered, base, held, pl.cpu_parts
        )
        time.sleep(1.0)
        sink_final = sink.counters()
        statuses = pl.statuses()
        hwm = pl.hwm_kib()
        pl.stop()
        sink.stop()
        self.live = [x for x in self.live if x not in (pl, sink)]
        db = pl.db_counts()
        attempts = (
            pl.query(
                "select count(*), count(distinct recipient_id) from events where type = 'delivered'"
            )
            if self.has_delivered_events(pl)
            else ""
        )
        text = pl.log_text()
        problems = [line for line in text.splitlines() if _LOG_PROBLEM.search(line)]
        result.update(
            {
                "statuses": statuses,
                "db": db,
                "delivered_events": attempts,
                "sink": sink_final,
                "peak_rss_kib": hwm,
                "accepted_log_lines": text.count("result=accepted"),
                "log_problem_count": len(problems),
                "log_problems": problems[:10],
                "log_problem_kinds": summarize_problems(problems),
                "stopped_cleanly": pl.proc is not None
                and pl.proc.returncode == 0
                and "postlane stopped" in pl.stop_output,
            }
        )
        if not self.args.keep:
            pl.discard_data()
        label = f"Postlane s={sessions}"
        if result["smtp_source_rc"] != 0:
            self.fail(f"{label}: smtp-source exited {result['smtp_source_rc']}")
        if sink_final["messages"] != n:
            self.fail(f"{label}: sink counted {sink_final['messages']} messages, expected {n}")
        if statuses.get("delivered", 0) != n or db["recipients"] != n or db["messages"] != n:
            self.fail(f"{label}: statuses {statuses}, db {db}")
        if db["distinct_message_ids"] != n or db["duplicate_of"] or db["duplicate_events"]:
            self.fail(f"{label}: duplicates: {db}")
        if attempts and attempts != f"{n}|{n}":
            self.fail(f"{label}: delivered events (count|distinct recipients) {attempts}")
        if problems:
            self.fail(f"{label}: {len(problems)} problem line(s) in its log, e.g. {problems[0]}")
        if not result["stopped_cleanly"]:
            self.fail(f"{label}: did not stop cleanly: {pl.stop_output[-500:]}")
        self.report(result)
        return result

    @staticmethod
    def has_delivered_events(pl: RelayPostlane) -> bool:
        try:
            return "recipient_id" in pl.query("select sql from sqlite_master where name='events'")
        except subprocess.CalledProcessError:
            return False

    def report(self, r: dict[str, Any]) -> None:
        parts = r.get("server_cpu_parts_s") or {}
        by_role = " (" + ", ".join(f"{k} {v}" for k, v in parts.items()) + ")" if parts else ""
        if r.get("drain"):
            say(
                f"{r['server']:<8} s={r['sessions']:<3} {r['messages']} msgs accepted and held "
                f"in {r['source_seconds']} s; released, all delivered after {r['seconds']} s = "
                f"{r['msg_per_s']} msg/s (sink complete {r['sink_complete_s']} s, server's "
                f"record {r['server_complete_s']} s; sink {r['sink']['messages']} msgs in "
                f"{r['sink']['sessions']} sessions; server CPU {r['server_cpu_s']} s{by_role}; "
                f"other {r['other_cpu_pct']}%)"
            )
            return
        say(
            f"{r['server']:<8} s={r['sessions']:<3} {r['messages']} msgs accepted in "
            f"{r['source_seconds']} s ({r['accept_msg_per_s']} msg/s), all delivered after "
            f"{r['seconds']} s = {r['msg_per_s']} msg/s end to end (sink complete "
            f"{r['sink_complete_s']} s, server's record {r['server_complete_s']} s; "
            f"sink {r['sink']['messages']} msgs in {r['sink']['sessions']} sessions; "
            f"server CPU {r['server_cpu_s']} s{by_role}; other {r['other_cpu_pct']}%)"
        )

    # -- smoke: small runs, with the sink dumping every message ---------------------------------

    def smoke(self) -> None:
        n = 20
        base = self.run_dir("postlane-smoke")
        base.mkdir()
        dump = base / "dump"
        sink = Sink(base / "sink", self.sink_port_postlane, dump=dump)
        pl = self.postlane(base)
        self.live += [sink, pl]
        sink.start()
        pl.start()
        say(f"smoke: smtp-source -s 2 -m {n} through Postlane to smtp-sink (dumping messages)")
        with open(base / "client.log", "wb") as out:
            subprocess.run(
                smtp_source_cmd(self.ports.trusted, 2, n, self.args.size),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
            )
        deadline = time.monotonic() + 60
        while pl.statuses().get("delivered", 0) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        statuses = pl.statuses()
        pl.stop()
        sink.stop()
        self.live = [x for x in self.live if x not in (pl, sink)]
        files = sorted(dump.iterdir())
        check = check_dumps(files, self.dkim_record)
        self.results["smoke"] = {"statuses": statuses, "sink": sink.counters(), **check}
        say(f"smoke: statuses {statuses}, {json.dumps(check)}")
        if statuses.get("delivered", 0) != n or len(files) != n:
            raise BenchError(f"Postlane smoke: statuses {statuses}, {len(files)} dumped")
        if check["dkim_signed"] != n or check["distinct_message_ids"] != n:
            raise BenchError(f"Postlane smoke: {check}")
        if check.get("dkim_verified") not in (None, n):
            raise BenchError(f"Postlane smoke: DKIM verification failed: {check}")


def summarize_problems(lines: list[str]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for line in lines:
        key = re.sub(r"\d+", "N", line.split(" ", 3)[-1])[:120]
        kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:10])


_SINK_HEADERS = re.compile(
    rb"^X-(Client-Addr|Client-Proto|Helo-Args|Mail-Args|Rcpt-Args|Xforward-\w+):"
)


def check_dumps(files: list[Path], dkim_record: str) -> dict[str, Any]:
    """Each dumped message: DKIM-Signature (RSA) present, Message-IDs distinct, dkimpy verifies."""
    signed = 0
    ids: set[bytes] = set()
    verified: int | None = None
    sample_sig = ""
    selector_name, _, txt = dkim_record.partition("|")
    try:
        import dkim  # dkimpy
    except ImportError:
        dkim = None
    if dkim is not None and txt:
        verified = 0
    mail_from = b""
    for path in files:
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        body_start = 0
        for i, line in enumerate(lines):
            if _SINK_HEADERS.match(line):
                if line.startswith(b"X-Mail-Args:"):
                    mail_from = line.split(b":", 1)[1].strip()
                body_start = i + 1
            else:
                break
        message = b"\n".join(lines[body_start:])
        message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if re.search(rb"(?mi)^DKIM-Signature:[^\r\n]*(\r\n[ \t][^\r\n]*)*", message):
            head = re.search(rb"(?mi)^DKIM-Signature:(?:[^\r\n]*(?:\r\n[ \t])?)*", message)
            sig = head.group(0) if head else b""
            if b"a=rsa-sha256" in sig.replace(b"\r\n", b"").replace(b" ", b"").replace(b"\t", b""):
                signed += 1
                sample_sig = sample_sig or sig.decode(errors="replace")[:200]
        mid = re.search(rb"(?mi)^Message-Id:\s*(\S+)", message)
        if mid:
            ids.add(mid.group(1))
        if verified is not None:

            def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
                wanted = name.decode() if isinstance(name, bytes) else name
                if wanted.rstrip(".").lower() == selector_name.rstrip(".").lower():
                    return txt.encode()
                return b""

            with contextlib.suppress(Exception):
                if dkim.verify(message, dnsfunc=dnsfunc):
                    verified += 1
    return {
        "dumped": len(files),
        "dkim_signed": signed,
        "distinct_message_ids": len(ids),
        "dkim_verified": verified,
        "sample_mail_from": mail_from.decode(errors="replace"),
        "sample_signature": sample_sig,
    }


# -- report -------------------------------------------------------------------------------------


def summary(results: dict[str, Any], failures: list[str]) -> str:
    m = results["machine"]
    cfg = results["postlane_settings"]
    width = 130
    lines = [
        "",
        "=" * width,
        f"Postlane relay benchmark (intake + delivery to smtp-sink), {m['date']}",
        f"machine: {m['nproc']} x {m['cpu_model']}, {m['mem_total_gib']} GiB RAM, Linux "
        f"{m['kernel']}; fsync 4 KiB median {m['fsync_ms_median']} ms, p90 {m['fsync_ms_p90']} ms",
        f"versions: Postfix {m['postfix']}, Python {m['python']}, SQLite {m['sqlite']}, postlane "
        f"{m['postlane']} (git {m['git_commit']}"
        f"{', src/ has uncommitted changes' if m['src_modified'] else ''})",
        f"Postlane [delivery]: concurrency {cfg['concurrency']}, lease_batch {cfg['lease_batch']}, "
        f"poll_interval {cfg['poll_interval']}, shaping [default] max_connections "
        f"{cfg['concurrency']}, messages_per_connection {cfg['messages_per_connection']}, "
        f"messages_per_minute 1e8; DKIM RSA-2048; processes: {cfg.get('processes', 'one')}; "
        f"[smtp] processes {cfg.get('smtp_processes', 1)}, "
        f"commit_process {cfg.get('commit_process', True)}",
        "-" * width,
        f"{'run':<22}{'server':<10}{'msgs':>7}{'accept s':>10}{'accept/s':>10}{'e2e s':>9}"
        f"{'e2e msg/s':>11}{'sink s':>9}{'srv CPU s':>11}{'ms/msg':>8}{'sink n':>8}{'other%':>8}",
    ]
    drain = any(r.get("drain") for r in results["runs"])
    for r in results["runs"]:
        per = 1000 * r["server_cpu_s"] / r["messages"]
        label = ("drain, -s " if r.get("drain") else "smtp-source -s ") + str(r["sessions"])
        lines.append(
            f"{label:<22}{r['server']:<10}{r['messages']:>7}"
            f"{r['source_seconds'] or 0:>10.2f}{r['accept_msg_per_s'] or 0:>10.1f}"
            f"{r['seconds']:>9.2f}{r['msg_per_s'] or 0:>11.1f}{r['sink_complete_s'] or 0:>9.2f}"
            f"{r['server_cpu_s']:>11.2f}{per:>8.3f}{r['sink']['messages']:>8}"
            f"{r['other_cpu_pct']:>8}"
        )
    lines.append("-" * width)
    if drain:
        lines.append(
            "drain: e2e = from releasing the held messages until the last was delivered "
            "(Postfix: postsuper -H ALL, postqueue -f; Postlane: starting serve --role delivery); "
            "srv CPU = the server's CPU in that time; accept = taking and holding them, untimed"
        )
    lines.append(
        "e2e = from starting smtp-source until the last message was delivered (Postfix: sink "
        "counted all; Postlane: all recipients 'delivered' in its database); sink s = when "
        "the sink had counted all; other% = CPU used by none of server, sink, client, driver"
    )
    by_s: dict[int, dict[str, dict[str, Any]]] = {}
    for r in results["runs"]:
        if r["msg_per_s"]:
            cur = by_s.setdefault(r["sessions"], {}).get(r["server"])
            if cur is None or r["msg_per_s"] > cur["msg_per_s"]:
                by_s[r["sessions"]][r["server"]] = r
    for s, servers in by_s.items():
        if "Postfix" in servers and "Postlane" in servers:
            pf, pl = servers["Postfix"], servers["Postlane"]
            ratio = pl["msg_per_s"] / pf["msg_per_s"]
            verdict = (
                "delivery alone; the target is end to end"
                if drain
                else f"target >= 2x: {'met' if ratio >= 2 else 'NOT met'}"
            )
            lines.append(
                f"-s {s:<4} {'drain' if drain else 'end to end'}: Postfix "
                f"{pf['msg_per_s']:.1f} msg/s, Postlane {pl['msg_per_s']:.1f} msg/s: "
                f"ratio {ratio:.2f}x ({verdict})"
            )
    lines.append("-" * width)
    if failures:
        lines.append(f"{len(failures)} FAILED CHECK(S):")
        lines += [f"  - {f}" for f in failures]
    else:
        lines.append(
            "all checks passed: the sink counted exactly N messages per run; Postfix logged N "
            "status=sent, queue empty; Postlane: N recipients delivered, no problem log lines"
        )
    lines.append(f"details: {results['results_file']}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/relay", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--sessions", default="10,100", help="smtp-source -s values (default 10,100)")
    p.add_argument("--repeat", type=int, default=1, help="runs per server and -s")
    p.add_argument("--size", type=int, default=10240)
    p.add_argument("--concurrency", type=int, default=20, help="Postlane [delivery] concurrency")
    p.add_argument("--lease-batch", type=int, default=500, help="Postlane [delivery] lease_batch")
    p.add_argument("--poll-interval", type=float, default=0.05, help="Postlane poll_interval")
    p.add_argument(
        "--per-connection", type=int, default=100, help="shaping messages_per_connection"
    )
    p.add_argument("--quiet-threshold", type=float, default=15.0)
    p.add_argument("--quiet-wait", type=float, default=5.0)
    p.add_argument("--nice", type=int, default=-10)
    p.add_argument("--postfix-port", type=int, default=10125)
    p.add_argument("--postlane-port", type=int, default=10126)
    p.add_argument("--http-port", type=int, default=10129)
    p.add_argument("--postfix-sink-port", type=int, default=10130)
    p.add_argument("--postlane-sink-port", type=int, default=10131)
    p.add_argument("--run-limit", type=float, default=600.0)
    p.add_argument("--no-smoke", action="store_true")
    p.add_argument(
        "--processes",
        choices=("serve", "one", "split"),
        default="serve",
        help="serve: plain 'postlane serve' (delivery in its child process; default); "
        "one: --role smtp --role delivery in one process; "
        "split: 'serve --role smtp' and 'serve --role delivery' started apart",
    )
    p.add_argument("--delivery-http-port", type=int, default=10132)
    p.add_argument(
        "--smtp-processes", type=int, default=1, help="Postlane [smtp] processes (default 1)"
    )
    p.add_argument(
        "--no-commit-process",
        action="store_true",
        help="Postlane [smtp] commit_process = false: commits in a thread of intake",
    )
    p.add_argument(
        "--drain",
        action="store_true",
        help="time delivery alone: each server takes and holds all messages, then the clock "
        "runs from their release until the last is delivered (Postlane: --processes split, "
        "the delivery role started at the release)",
    )
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep Postlane databases")
    p.add_argument(
        "--postlane-only",
        action="store_true",
        help="skip Postfix (to study Postlane; no ratio is printed)",
    )
    return p.parse_args()


def main() -> int:
    args = parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.nice:
        os.nice(args.nice)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="postlane-relay-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # noqa: S103
    ports = Ports(
        postfix=free_port(args.postfix_port),
        trusted=free_port(args.postlane_port),
        starttls=0,
        plain=0,
        http=free_port(args.http_port),
    )
    bench = Relay(args, work)
    bench.ports = ports
    bench.sink_port_postlane = free_port(args.postlane_sink_port)
    bench.delivery_http_port = free_port(args.delivery_http_port)
    results = bench.results
    results["results_file"] = str(work / "results.json")
    started = time.monotonic()
    dns = DnsServer(
        {
            (RECIPIENT_DOMAIN, "MX"): [f"10 {SINK_MX}"],
            (SINK_MX, "A"): ["127.0.0.1"],
        }
    )
    dns.start()
    try:
        results["machine"] = machine_info(Postfix(work, ports.postfix).version(), work)
        say(f"work directory {work}; DNS {dns.nameserver}; {json.dumps(results['machine'])}")
        cfg = {
            "nameserver": dns.nameserver,
            "sink_port": bench.sink_port_postlane,
            "concurrency": args.concurrency,
            "lease_batch": args.lease_batch,
            "poll_interval": args.poll_interval,
            "messages_per_connection": args.per_connection,
            "smtp_processes": args.smtp_processes,
            "commit_process": not args.no_commit_process,
            "processes": "drain: serve --role smtp, serve --role delivery at the release"
            if args.drain
            else {
                "serve": "serve (delivery in its child process)",
                "one": "one: serve --role smtp --role delivery",
                "split": "split: serve --role smtp + serve --role delivery",
            }[args.processes],
        }
        results["postlane_settings"] = cfg
        bench.template = work / "postlane-template"
        bench.dkim_record = make_template(bench.template, ports, cfg)
        if not args.no_smoke:
            bench.smoke()
        for s in [int(v) for v in args.sessions.split(",") if v.strip()]:
            for rep in range(1, args.repeat + 1):
                if not args.postlane_only:
                    results["runs"].append(bench.postfix_run(s, args.messages, f"s{s}-{rep}"))
                results["runs"].append(bench.postlane_run(s, args.messages, f"s{s}-{rep}"))
        results["dns_queries"] = len(dns.queries)
        results["dns_query_kinds"] = sorted({f"{n} {t}" for n, t in dns.queries})
    except BenchError as exc:
        bench.fail(str(exc))
    finally:
        for thing in list(bench.live):
            with contextlib.suppress(Exception):
                thing.stop()
        with contextlib.suppress(Exception):
            dns.stop()
        results["failures"] = bench.failures
        results["total_seconds"] = round(time.monotonic() - started, 1)
        results["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        Path(results["results_file"]).write_text(json.dumps(results, indent=2) + "\n")
    if "machine" in results and "postlane_settings" in results:
        print(summary(results, bench.failures))
    say(f"done in {results['total_seconds']} s")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
