"""The work of ``bench/ingest``: Postfix vs Postlane intake, Postlane's own load, memory, profile.

Run it through ``bench/ingest``, which installs what it needs (Debian's postfix
for ``smtp-source``, sqlite3, the repository's .venv, py-spy) and then runs
this file with the venv's Python. Everything listens on and connects to
127.0.0.1/127.0.0.2 only. See docs/benchmarks.md for what each number means.

Scenarios, in this order, each on a fresh Postfix queue or a fresh Postlane
data directory (a copy of a template made once with the ``postlane`` CLI):

1. ``smtp-source -s S -m 20000 -l 10240`` against an isolated Postfix instance
   (discard transport) and then against Postlane (trusted network, no TLS),
   for S in 10 and 100; wall time, msg/s, ratio Postlane/Postfix.
2. ``bench/smtp_load.py`` against Postlane: a new connection per message with
   AUTH LOGIN, once with STARTTLS (certificate verified) and once on a
   plaintext-AUTH listener.
3. Memory: Postlane's peak RSS (VmHWM) in every run, and RSS per idle
   connection (5,000 connections that only read the greeting).
4. Profile: py-spy on Postlane during an extra ``smtp-source -s 10`` run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
PYSPY = REPO / ".venv" / "bin" / "py-spy"
LOAD = REPO / "bench" / "smtp_load.py"
HOSTNAME = "bench.postlane.test"
SENDER = "bench@bench.test"
RECIPIENT = "rcpt@example.com"
SOURCE_HELO = "source.bench.test"
TRUSTED_IP = "127.0.0.1"  # the bench account's trusted network: smtp-source sends from here
LOAD_IP = "127.0.0.2"  # not trusted: smtp_load.py has to AUTH (a trusted client gets 503)
LOAD_USER = "load1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()


class BenchError(Exception):
    """Something that makes a result invalid: the run stops with this message."""


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {message}", flush=True)


# -- small system helpers -----------------------------------------------------------


def smtp_source_path() -> str:
    found = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.access(found, os.X_OK):
        raise BenchError("smtp-source not found: run bench/ingest (it installs postfix)")
    return found


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there on 127.0.0.1, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise BenchError("no free TCP port on 127.0.0.1")


def wait_banner(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
                if banner.startswith(b"220"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"nothing answers with 220 on 127.0.0.1:{port}")
        time.sleep(0.1)


def proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system, all threads) of ``pid``; plus reaped children's."""
    f = proc_stat(pid)
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"{key} not in /proc/{pid}/status")


def machine_ticks() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    steal = values[7]
    total = sum(values[:8])
    return total - idle - steal, total, steal


def busy_percent(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(100.0 * busy / total, 1) if total else 0.0


class CpuWindow:
    """Machine-wide CPU use over one measured run, to tell our load from everyone else's."""

    def __init__(self) -> None:
        self.before = machine_ticks()

    def finish(self, seconds: float, server_cpu: float, client_cpu: float) -> dict[str, float]:
        after = machine_ticks()
        busy = after[0] - self.before[0]
        total = after[1] - self.before[1]
        steal = after[2] - self.before[2]
        cores = os.cpu_count() or 1
        other = max(0.0, busy / CLK_TCK - server_cpu - client_cpu)
        return {
            "machine_busy_pct": round(100.0 * busy / total, 1) if total else 0.0,
            "steal_pct": round(100.0 * steal / total, 1) if total else 0.0,
            "other_cpu_pct": round(100.0 * other / (seconds * cores), 1) if seconds else 0.0,
        }


def clean_env() -> dict[str, str]:
    """Our environment without POSTLANE_* (they would override the bench's postlane.toml)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("POSTLANE_")}


def settle(threshold: float, max_wait: float) -> float:
    """Flush earlier runs' dirty pages, then wait (bounded) for the machine to be quiet.

    Other sessions may share this machine; a run that starts while they are busy
    measures them too. Returns the machine's busy percentage in the last second.
    """
    os.sync()
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_ticks()
        time.sleep(1.0)
        busy = busy_percent(before, machine_ticks())
        if busy <= threshold or time.monotonic() > deadline:
            return busy


@dataclass
class ClientRun:
    seconds: float
    returncode: int
    cpu_s: float
    output: str


def timed_client(cmd: list[str], log_path: Path, limit: float) -> ClientRun:
    """Run a client to completion; wall time and its CPU time (from wait4)."""
    with open(log_path, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        killer = threading.Timer(limit, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ClientRun(
        seconds=elapsed,
        returncode=proc.returncode,
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        output=log_path.read_text(errors="replace"),
    )


def smtp_source_cmd(port: int, sessions: int, messages: int, size: int) -> list[str]:
    return [
        smtp_source_path(),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        SOURCE_HELO,
        f"127.0.0.1:{port}",
    ]


# -- Postfix ------------------------------------------------------------------------

# An isolated Postfix that accepts anything from 127.0.0.0/8 into its (fsync'd)
# queue; what happens next is the benchmark's: discard (ingest) or relay (relay).
POSTFIX_BASE_CF = """\
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
"""

POSTFIX_MAIN_CF = (
    "# Written by bench/ingest: accept, then discard.\n"
    + POSTFIX_BASE_CF
    + "default_transport = discard\n"
    "relay_transport = discard\n"
    "local_transport = discard\n"
    "virtual_transport = discard\n"
)

_POSTFIX_PROBLEM = re.compile(r"\b(reject|warning|error|fatal|panic):", re.IGNORECASE)


class Postfix:
    """One isolated Postfix instance under ``base`` (own main.cf, master.cf, queue, log)."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.etc = base / "etc"
        self.maillog = base / "maillog"
        self.master_pid: int | None = None

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise BenchError(
                f"postfix {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        return result

    def start(self) -> None:
        for d in (self.etc, self.base / "spool", self.base / "data"):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # noqa: S103 - Postfix daemons read below it
        shutil.chown(self.base / "data", user="postfix")
        (self.etc / "main.cf").write_text(POSTFIX_MAIN_CF.format(base=self.base))
        shutil.copy("/etc/postfix/master.cf", self.etc / "master.cf")  # Debian's, as shipped
        if Path("/etc/postfix/dynamicmaps.cf").exists():
            shutil.copy("/etc/postfix/dynamicmaps.cf", self.etc / "dynamicmaps.cf")
        postconf = ["postconf", "-c", str(self.etc)]
        subprocess.run([*postconf, "-M#", "smtp/inet"], check=True)  # no port 25
        service = f"127.0.0.1:{self.port}/inet"
        entry = f"127.0.0.1:{self.port} inet n - n - - smtpd"
        subprocess.run([*postconf, "-Me", f"{service}={entry}"], check=True)
        # The chroot needs files copied in (Debian's init script does that); not needed here.
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

    def cpu(self) -> float:
        """CPU seconds of the whole instance: master, live children, reaped children."""
        assert self.master_pid is not None
        total = proc_cpu(self.master_pid, children=True)
        for child in subprocess.run(
            ["pgrep", "-P", str(self.master_pid)], capture_output=True, text=True, check=False
        ).stdout.split():
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += proc_cpu(int(child))
        return total

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def counts(self) -> dict[str, int]:
        text = self.log_text()
        return {
            "cleanup_message_ids": len(
                set(re.findall(r"postfix/cleanup\[\d+\]: \w+: message-id=(\S+)", text))
            ),
            "queued": len(re.findall(r"postfix/qmgr\[\d+\]: \w+: from=<", text)),
            "discarded": len(re.findall(r"postfix/discard\[\d+\]: .* status=sent", text)),
        }

    def queue_empty(self) -> bool:
        out = subprocess.run(
            ["postqueue", "-c", str(self.etc), "-p"], capture_output=True, text=True, check=False
        ).stdout
        return "Mail queue is empty" in out

    def wait_discarded(self, expected: int, seconds: float = 180.0) -> dict[str, int]:
        deadline = time.monotonic() + seconds
        while True:
            counts = self.counts()
            if counts["discarded"] >= expected and self.queue_empty():
                return counts
            if time.monotonic() > deadline:
                return counts
            time.sleep(0.5)

    def problems(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if _POSTFIX_PROBLEM.search(line)]

    def stop(self) -> None:
        if self.master_pid is None:
            return
        self.postfix("stop", check=False)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{self.master_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{self.master_pid}").exists():
            self.postfix("abort", check=False)
        self.master_pid = None

    def version(self) -> str:
        out = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "unknown"


# -- Postlane -----------------------------------------------------------------------


@dataclass
class Ports:
    postfix: int
    trusted: int  # tls = "none", the account's trusted network: smtp-source
    starttls: int  # tls = "starttls", AUTH after STARTTLS
    plain: int  # tls = "none", allow_plaintext_auth = true
    http: int  # Prometheus metrics (when this build serves them)


POSTLANE_TOML = """\
# Written by bench/ingest. Storage settings are Postlane's defaults (SQLite in
# data_dir, WAL, synchronous=FULL): nothing here weakens durability.
hostname = "{hostname}"
data_dir = "data"

[http]
address = "127.0.0.1"
port = {p.http}

[smtp]
processes = {processes}
commit_process = {commit_process}

# Scenario 1: smtp-source, which cannot AUTH; 127.0.0.1 is the account's trusted network.
[[smtp.listeners]]
address = "127.0.0.1"
port = {p.trusted}
tls = "none"
submission = true

# Scenario 2: AUTH LOGIN after STARTTLS.
[[smtp.listeners]]
address = "127.0.0.1"
port = {p.starttls}
tls = "starttls"
submission = true

# Scenario 2, plaintext variant; also the listener of the idle-connection test.
[[smtp.listeners]]
address = "127.0.0.1"
port = {p.plain}
tls = "none"
submission = true
allow_plaintext_auth = true
require_tls_for_auth = false
"""


def postlane_cli(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [str(VENV_PY), "-m", "postlane", *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"postlane {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def make_template(
    directory: Path, ports: Ports, processes: int = 1, commit_process: bool = True
) -> str:
    """A data directory with the bench account, domain and SMTP user; returns its password."""
    directory.mkdir(parents=True)
    (directory / "postlane.toml").write_text(
        POSTLANE_TOML.format(
            hostname=HOSTNAME,
            p=ports,
            processes=processes,
            commit_process=str(commit_process).lower(),
        )
    )
    postlane_cli(directory, "account", "create", "bench")
    postlane_cli(directory, "domain", "add", "--account", "bench", "bench.test")
    postlane_cli(directory, "account", "update", "bench", "--trusted-networks", TRUSTED_IP)
    out = postlane_cli(directory, "smtp-user", "create", "--account", "bench", LOAD_USER)
    match = re.search(r"^password: (\S+)$", out, re.MULTILINE)
    if match is None:
        raise BenchError(f"no password in the output of smtp-user create: {out!r}")
    return match.group(1)


_LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|result=rejected")


class Postlane:
    """``python -m postlane serve`` in a fresh copy of the template directory."""

    def __init__(self, template: Path, run_dir: Path, ports: Ports) -> None:
        self.template = template
        self.dir = run_dir
        self.ports = ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss_samples: list[tuple[float, int]] = []
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self.stop_output = ""
        self.startup_hwm_kib = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        shutil.copytree(self.template, self.dir)
        out = open(self.dir / "serve.out", "wb")  # noqa: SIM115 - lives as long as the process
        err = open(self.dir / "serve.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            # intake only: the benchmark measures acceptance (Postfix discards;
            # a delivery role would look up example.com in the system's DNS)
            [str(VENV_PY), "-m", "postlane", "serve", "--role", "smtp"],
            cwd=self.dir,
            env=clean_env(),
            stdout=out,
            stderr=err,
            start_new_session=True,  # our Ctrl-C does not reach it; stop() does
        )
        out.close()
        err.close()
        deadline = time.monotonic() + 60
        while "postlane running" not in (self.dir / "serve.out").read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"postlane serve did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        wait_banner(self.ports.trusted)
        self.startup_hwm_kib = self.hwm_kib()
        self._sampling.set()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()

    def _sample_rss(self) -> None:
        started = time.monotonic()
        while self._sampling.is_set():
            with contextlib.suppress(OSError, BenchError):
                self.rss_samples.append(
                    (time.monotonic() - started, proc_status_kib(self.pid, "VmRSS"))
                )
            time.sleep(0.1)

    def children(self) -> list[int]:
        """The processes serve started itself (more intake processes, delivery)."""
        found: list[int] = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                text = Path(f"/proc/{self.pid}/task/{task}/children").read_text()
                found += [int(pid) for pid in text.split()]
        return found

    def cpu(self) -> float:
        total = proc_cpu(self.pid)
        for pid in self.children():
            with contextlib.suppress(OSError, ValueError):
                total += proc_cpu(pid)
        return total

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def metrics(self) -> dict[str, Any] | None:
        """The in-process Prometheus metrics, if this build serves them."""
        url = f"http://127.0.0.1:{self.ports.http}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                text = response.read().decode()
        except OSError:
            return None
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values

    def log_text(self) -> str:
        return (self.dir / "serve.log").read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_summary(self) -> dict[str, Any]:
        text = self.log_text()
        problems = [line for line in text.splitlines() if _LOG_PROBLEM.search(line)]
        return {
            "accepted": text.count("result=accepted"),
            "rejected": text.count("result=rejected"),
            "duplicates": text.count("duplicate_of="),
            "problem_lines": len(problems),
            "problem_samples": problems[:8],
        }

    def stop(self) -> None:
        self._sampling.clear()
        if self._sampler is not None:
            self._sampler.join()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stop_output = (self.dir / "serve.out").read_text(errors="replace")

    def db_counts(self) -> dict[str, int]:
        """Counted with the sqlite3 command-line shell, after the server has stopped."""
        sql = (
            "select count(*), count(distinct message_id_header), count(duplicate_of) "
            "from messages; select count(*) from recipients; "
            "select count(*) from events where type = 'duplicate'; "
            "select count(*) from messages where tls like 'TLS%';"
        )
        out = subprocess.run(
            ["sqlite3", "-readonly", "-batch", str(self.dir / "data" / "postlane.db"), sql],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        messages, distinct, dup_of = (int(v) for v in out[0].split("|"))
        return {
            "messages": messages,
            "distinct_message_ids": distinct,
            "duplicate_of": dup_of,
            "recipients": int(out[1]),
            "duplicate_events": int(out[2]),
            "tls_messages": int(out[3]),
        }

    def discard_data(self) -> None:
        shutil.rmtree(self.dir / "data", ignore_errors=True)

    def peak_sample(self) -> tuple[float, int] | None:
        return max(self.rss_samples, key=lambda s: s[1]) if self.rss_samples else None


def batch_stats(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Group-commit batch sizes and commit times from the Prometheus histograms."""
    if not metrics:
        return None
    count = metrics.get("postlane_intake_commit_batch_messages_count")
    total = metrics.get("postlane_intake_commit_batch_messages_sum")
    if not count:
        return None
    buckets: list[tuple[str, float]] = []
    previous = 0.0
    for name, value in metrics.items():
        match = re.fullmatch(r'postlane_intake_commit_batch_messages_bucket\{le="([^"]+)"\}', name)
        if match:
            buckets.append((match.group(1), value - previous))
            previous = value
    commit_count = metrics.get("postlane_intake_commit_seconds_count") or 0
    commit_sum = metrics.get("postlane_intake_commit_seconds_sum") or 0.0
    return {
        "commits": int(count),
        "messages": int(total or 0),
        "mean_batch": round((total or 0) / count, 2),
        "batch_histogram": {le: int(n) for le, n in buckets if n},
        "mean_commit_ms": round(1000 * commit_sum / commit_count, 2) if commit_count else None,
    }


# -- the scenarios ----------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    ports: Ports
    template: Path = field(init=False)
    password: str = field(init=False, default="")
    results: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    live: list[Postfix | Postlane] = field(default_factory=list)
    counter: int = 0

    def run_dir(self, name: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:02d}-{name}"

    def fail(self, message: str) -> None:
        say("FAILED CHECK: " + message)
        self.failures.append(message)

    def postfix(self, name: str) -> Postfix:
        pf = Postfix(self.run_dir(name), self.ports.postfix)
        self.live.append(pf)
        pf.start()
        return pf

    def postlane(self, name: str) -> Postlane:
        pl = Postlane(self.template, self.run_dir(name), self.ports)
        self.live.append(pl)
        pl.start()
        return pl

    def finish(self, server: Postfix | Postlane) -> None:
        server.stop()
        self.live.remove(server)

    # -- checks that smtp-source's messages go through ----------------------------------

    def smoke(self) -> None:
        n = 20
        say(f"smoke: smtp-source -s 2 -m {n} against Postfix")
        pf = self.postfix("postfix-smoke")
        run = timed_client(
            smtp_source_cmd(self.ports.postfix, 2, n, self.args.size), pf.base / "client.log", 60
        )
        counts = pf.wait_discarded(n, 30)
        problems = pf.problems()
        self.finish(pf)
        if run.returncode != 0 or counts["discarded"] != n or problems:
            raise BenchError(f"Postfix smoke test: rc={run.returncode} {counts} {problems[:5]}")
        say(f"smoke: smtp-source -s 2 -m {n} against Postlane")
        pl = self.postlane("postlane-smoke")
        run = timed_client(
            smtp_source_cmd(self.ports.trusted, 2, n, self.args.size), pl.dir / "client.log", 60
        )
        self.finish(pl)
        logs = pl.log_summary()
        db = pl.db_counts()
        sample = subprocess.run(
            [
                "sqlite3",
                "-readonly",
                str(pl.dir / "data" / "postlane.db"),
                "select message_id_header from messages order by received_at limit 3",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        pl.discard_data()
        self.results["smoke"] = {"postlane_log": logs, "postlane_db": db, "message_ids": sample}
        if (
            run.returncode != 0
            or logs["accepted"] != n
            or logs["rejected"]
            or logs["duplicates"]
            or db["messages"] != n
            or db["distinct_message_ids"] != n
        ):
            raise BenchError(
                f"Postlane smoke test: rc={run.returncode} log={logs} db={db}\n{run.output}"
            )
        say(f"smoke ok: every message accepted, Message-IDs distinct, e.g. {', '.join(sample)}")

    # -- scenario 1 ----------------------------------------------------------------------------

    def quiet(self) -> float:
        return settle(self.args.quiet_threshold, self.args.quiet_wait)

    def source_postfix(self, sessions: int, rep: int) -> dict[str, Any]:
        n = self.args.messages
        pf = self.postfix(f"postfix-s{sessions}-{rep}")
        background = self.quiet()
        cpu0, window = pf.cpu(), CpuWindow()
        run = timed_client(
            smtp_source_cmd(self.ports.postfix, sessions, n, self.args.size),
            pf.base / "client.log",
            self.args.run_limit,
        )
        cpu1 = pf.cpu()
        machine = window.finish(run.seconds, cpu1 - cpu0, run.cpu_s)
        counts = pf.wait_discarded(n)
        problems = pf.problems()
        self.finish(pf)
        shutil.rmtree(pf.base / "spool", ignore_errors=True)
        result = {
            "server": "Postfix",
            "sessions": sessions,
            "messages": n,
            "seconds": round(run.seconds, 3),
            "msg_per_s": round(n / run.seconds, 1),
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "client_cpu_s": run.cpu_s,
            "background_busy_pct": background,
            **machine,
            "smtp_source_rc": run.returncode,
            "accepted_and_discarded": counts,
            "log_problems": problems[:8],
            "log_problem_count": len(problems),
        }
        if run.returncode != 0:
            self.fail(f"Postfix s={sessions}: smtp-source exited {run.returncode}: {run.output}")
        if counts["discarded"] != n or counts["cleanup_message_ids"] != n:
            self.fail(f"Postfix s={sessions}: expected {n} accepted and discarded, got {counts}")
        say(
            f"Postfix  s={sessions:<3} {n} msgs in {run.seconds:.2f}s = "
            f"{n / run.seconds:7.1f} msg/s (discarded {counts['discarded']}, "
            f"log problems {len(problems)}, other load {machine['other_cpu_pct']}%)"
        )
        return result

    def source_postlane(self, sessions: int, rep: int) -> dict[str, Any]:
        n = self.args.messages
        pl = self.postlane(f"postlane-s{sessions}-{rep}")
        background = self.quiet()
        cpu0, window = pl.cpu(), CpuWindow()
        run = timed_client(
            smtp_source_cmd(self.ports.trusted, sessions, n, self.args.size),
            pl.dir / "client.log",
            self.args.run_limit,
        )
        cpu1 = pl.cpu()
        machine = window.finish(run.seconds, cpu1 - cpu0, run.cpu_s)
        result = self._postlane_result(pl, n)
        result.update(
            {
                "server": "Postlane",
                "sessions": sessions,
                "messages": n,
                "seconds": round(run.seconds, 3),
                "msg_per_s": round(n / run.seconds, 1),
                "server_cpu_s": round(cpu1 - cpu0, 2),
                "client_cpu_s": run.cpu_s,
                "background_busy_pct": background,
                **machine,
                "smtp_source_rc": run.returncode,
            }
        )
        if run.returncode != 0:
            self.fail(f"Postlane s={sessions}: smtp-source exited {run.returncode}: {run.output}")
        self._check_postlane(f"Postlane s={sessions}", result, n)
        say(
            f"Postlane s={sessions:<3} {n} msgs in {run.seconds:.2f}s = "
            f"{n / run.seconds:7.1f} msg/s (rows {result['db']['messages']}, "
            f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB, "
            f"mean commit batch {(result['commit'] or {}).get('mean_batch', 'n/a')}, "
            f"other load {machine['other_cpu_pct']}%)"
        )
        return result

    def _postlane_result(self, pl: Postlane, n: int) -> dict[str, Any]:
        """Stop ``pl`` and gather what every Postlane run reports."""
        metrics = pl.metrics()
        hwm = pl.hwm_kib()
        peak = pl.peak_sample()
        self.finish(pl)
        db = pl.db_counts()
        logs = pl.log_summary()
        if not self.args.keep:
            pl.discard_data()
        return {
            "peak_rss_kib": hwm,
            "startup_hwm_kib": pl.startup_hwm_kib,
            "max_sampled_rss_kib": peak[1] if peak else None,
            "peak_rss_sampled_at_s": round(peak[0], 1) if peak else None,
            "commit": batch_stats(metrics),
            "metrics_endpoint": metrics is not None,
            "db": db,
            "log": logs,
            "stopped_cleanly": pl.proc is not None
            and pl.proc.returncode == 0
            and "postlane stopped" in pl.stop_output,
        }

    def _check_postlane(self, label: str, result: dict[str, Any], n: int) -> None:
        db, logs = result["db"], result["log"]
        if db["messages"] != n or db["distinct_message_ids"] != n or db["recipients"] != n:
            self.fail(f"{label}: expected {n} messages/recipients with distinct ids, got {db}")
        if db["duplicate_of"] or db["duplicate_events"] or logs["duplicates"]:
            self.fail(f"{label}: duplicates detected: {db} {logs['duplicates']}")
        if logs["accepted"] != n or logs["problem_lines"]:
            self.fail(f"{label}: log: {logs}")
        if not result["stopped_cleanly"]:
            self.fail(f"{label}: postlane did not stop cleanly")

    # -- scenario 2 ------------------------------------------------------------------------------

    def load(self, variant: str) -> dict[str, Any]:
        n = self.args.load_messages
        pl = self.postlane(f"postlane-load-{variant}")
        port = self.ports.starttls if variant == "starttls" else self.ports.plain
        cmd = [
            str(VENV_PY),
            str(LOAD),
            "send",
            "--port",
            str(port),
            "--source",
            LOAD_IP,
            "--tls",
            "starttls" if variant == "starttls" else "none",
            "--user",
            LOAD_USER,
            "-n",
            str(n),
            "-c",
            str(self.args.load_workers),
            "--size",
            str(self.args.size),
            "--json",
        ]
        if variant == "starttls":
            cert = pl.dir / "data" / "tls" / "selfsigned.crt"
            cmd += ["--cafile", str(cert), "--server-name", HOSTNAME]
        background = self.quiet()
        cpu0, window = pl.cpu(), CpuWindow()
        os.environ["SMTP_LOAD_PASSWORD"] = self.password  # not on the command line
        run = timed_client(cmd, pl.dir / "client.log", self.args.run_limit)
        cpu1 = pl.cpu()
        machine = window.finish(run.seconds, cpu1 - cpu0, run.cpu_s)
        try:
            client = json.loads(run.output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            client = {"sent": 0, "errors": -1, "output": run.output[-2000:]}
        result = self._postlane_result(pl, n)
        result.update(
            {
                "server": "Postlane",
                "variant": variant,
                "workers": self.args.load_workers,
                "messages": n,
                "client": client,
                "seconds": client.get("seconds"),
                "msg_per_s": client.get("msg_per_s"),
                "server_cpu_s": round(cpu1 - cpu0, 2),
                "client_cpu_s": run.cpu_s,
                "background_busy_pct": background,
                **machine,
            }
        )
        label = f"Postlane smtp_load {variant}"
        if client.get("errors") or client.get("sent") != n:
            self.fail(f"{label}: client {client}")
        self._check_postlane(label, result, n)
        if variant == "starttls" and result["db"]["tls_messages"] != n:
            self.fail(f"{label}: only {result['db']['tls_messages']} messages recorded TLS")
        say(
            f"Postlane smtp_load {variant:<8} {client.get('sent')} msgs in "
            f"{client.get('seconds')}s = {client.get('msg_per_s')} msg/s "
            f"(p50 {client.get('latency_ms_p50')} ms, errors {client.get('errors')}, "
            f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB at "
            f"{result['peak_rss_sampled_at_s']}s)"
        )
        return result

    # -- first logins: how AUTH behaves when many clients start at once ------------------------

    def first_logins(self) -> dict[str, Any]:
        """20 plaintext-AUTH messages with 1 worker, then with 10, each on a fresh Postlane.

        Only the first login of a user costs an Argon2 verification (then the
        credential cache answers); this shows what concurrent first logins cost.
        """
        out: dict[str, Any] = {}
        for workers in (1, self.args.load_workers):
            pl = self.postlane(f"postlane-first-logins-c{workers}")
            hwm0, cpu0 = pl.hwm_kib(), pl.cpu()
            cmd = [str(VENV_PY), str(LOAD), "send", "--port", str(self.ports.plain)]
            cmd += ["--source", LOAD_IP, "--tls", "none", "--user", LOAD_USER, "-n", "20"]
            cmd += ["-c", str(workers), "--json"]
            os.environ["SMTP_LOAD_PASSWORD"] = self.password
            run = timed_client(cmd, pl.dir / "client.log", 120)
            cpu1, hwm1 = pl.cpu(), pl.hwm_kib()
            self.finish(pl)
            if not self.args.keep:
                pl.discard_data()
            out[str(workers)] = {
                "workers": workers,
                "messages": 20,
                "returncode": run.returncode,
                "server_cpu_s": round(cpu1 - cpu0, 2),
                "hwm_before_kib": hwm0,
                "hwm_after_kib": hwm1,
            }
            if run.returncode != 0:
                self.fail(f"first logins with {workers} workers: {run.output[-500:]}")
            say(
                f"first logins, {workers:>2} worker(s), 20 msgs: server CPU "
                f"{cpu1 - cpu0:.2f}s, VmHWM {mib(hwm0)} -> {mib(hwm1)}"
            )
        return out

    # -- memory per idle connection ----------------------------------------------------------

    def idle(self) -> dict[str, Any]:
        n = self.args.idle
        pl = self.postlane("postlane-idle")
        limit = next(
            int(line.split()[3])
            for line in Path(f"/proc/{pl.pid}/limits").read_text().splitlines()
            if line.startswith("Max open files")
        )
        if limit < n + 100:
            raise BenchError(f"postlane may open only {limit} files: raise ulimit -n")
        base = [str(VENV_PY), str(LOAD), "idle", "--port", str(self.ports.plain)]
        base += ["--source", LOAD_IP]
        # Warm up the code paths once (200 connections opened and closed).
        subprocess.run(
            [*base, "-n", "200", "--hold", "0"], check=True, capture_output=True, timeout=120
        )
        time.sleep(1.0)
        before = pl.rss_kib()
        holder = subprocess.Popen(
            [*base, "-n", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdin is not None
        ready = json.loads(holder.stdout.readline() or "{}")
        time.sleep(2.0)
        after = pl.rss_kib()
        metrics = pl.metrics()
        active = metrics.get("postlane_smtp_sessions_active") if metrics else None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(120)
        time.sleep(1.0)
        closed = pl.rss_kib()
        hwm = pl.hwm_kib()
        self.finish(pl)
        opened = int(ready.get("open", 0))
        per_conn = (after - before) / opened if opened else None
        result = {
            "connections_requested": n,
            "connections_open": opened,
            "failed": ready.get("failed"),
            "server_sessions_active": active,
            "rss_before_kib": before,
            "rss_with_connections_kib": after,
            "rss_after_close_kib": closed,
            "per_connection_kib": round(per_conn, 2) if per_conn is not None else None,
            "peak_rss_kib": hwm,
            "postlane_nofile_limit": limit,
        }
        if opened != n:
            self.fail(f"idle connections: only {opened} of {n} opened: {ready}")
        say(
            f"idle: {opened} connections, RSS {before} -> {after} KiB: "
            f"{result['per_connection_kib']} KiB per connection (server sessions: {active})"
        )
        if not self.args.keep:
            pl.discard_data()
        return result

    # -- profile -------------------------------------------------------------------------------

    def profile(self) -> dict[str, Any]:
        """Two extra smtp-source -s 10 runs on one Postlane, sampled by py-spy.

        First every thread's on-CPU samples (py-spy's default, idle threads
        left out); then, with ``--gil``, only the thread holding the GIL, which
        shows how much of the time the interpreter itself is the bottleneck.
        """
        n, sessions = self.args.messages, 10
        gil_n = max(1, n // 2)
        pl = self.postlane("postlane-profile")
        passes: dict[str, Any] = {}
        try:
            for mode, count in (("threads", n), ("gil", gil_n)):
                self.quiet()
                passes[mode] = self._sampled_run(pl, mode, sessions, count)
        finally:
            result = self._postlane_result(pl, n + gil_n)
        self._check_postlane("Postlane profiled runs", result, n + gil_n)
        result.update({"sessions": sessions, "passes": passes})
        return result

    def _sampled_run(self, pl: Postlane, mode: str, sessions: int, n: int) -> dict[str, Any]:
        out = pl.dir / f"pyspy-{mode}.txt"
        spy_log = pl.dir / f"pyspy-{mode}.log"
        cmd = [str(PYSPY), "record", "--pid", str(pl.pid), "--rate", str(self.args.profile_rate)]
        cmd += ["--format", "raw", "--function", "--threads", "-o", str(out)]
        if mode == "gil":
            cmd.append("--gil")
        with open(spy_log, "w") as log_fh:
            spy = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "Sampling process" not in spy_log.read_text(errors="replace"):
            if spy.poll() is not None or time.monotonic() > deadline:
                spy.kill()
                raise BenchError(f"py-spy did not start: {spy_log.read_text()}")
            time.sleep(0.05)
        sampling_started = time.monotonic()
        run = timed_client(
            smtp_source_cmd(self.ports.trusted, sessions, n, self.args.size),
            pl.dir / f"client-{mode}.log",
            self.args.run_limit,
        )
        spy.send_signal(signal.SIGINT)
        sampled_seconds = time.monotonic() - sampling_started
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
        text = spy_log.read_text(errors="replace")
        match = re.search(r"Samples: (\d+) Errors: (\d+)", text)
        ticks = round(sampled_seconds * self.args.profile_rate)
        analysis = analyse_profile(out, ticks) if out.exists() else {"error": text[-500:]}
        say(
            f"profile ({mode}): {match.group(1) if match else '?'} py-spy samples in "
            f"{sampled_seconds:.1f}s during smtp-source -s {sessions} -m {n} "
            f"({n / run.seconds:.0f} msg/s with the profiler attached); stacks in {out}"
        )
        return {
            "mode": mode,
            "messages": n,
            "seconds": round(run.seconds, 3),
            "msg_per_s_with_profiler": round(n / run.seconds, 1),
            "smtp_source_rc": run.returncode,
            "sampled_seconds": round(sampled_seconds, 2),
            "pyspy_samples": int(match.group(1)) if match else None,
            "pyspy_errors": int(match.group(2)) if match else None,
            "rate": self.args.profile_rate,
            "raw_profile": str(out),
            "analysis": analysis,
        }


_WRAPPERS = (
    "<frozen runpy>",
    "typer/",
    "click/",
    "threading.py",
    "postlane/__main__.py",
    "postlane/cli.py",
    "postlane/runtime.py",
    "uvloop/__init__.py",
    "asyncio/runners.py",
)


def analyse_profile(path: Path, ticks: int, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        frames = frames[1:]
        total += count
        threads[thread] += count
        own[frames[-1] if frames else f"({thread}, no Python frame)"] += count
        for frame in set(frames):
            inclusive[frame] += count

    def pct(n: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0

    return {
        "active_samples": total,
        "ticks": ticks,
        "threads": {
            name: {
                "samples": n,
                "pct_of_active": pct(n),
                "pct_of_ticks": round(100.0 * n / ticks, 1) if ticks else None,
            }
            for name, n in threads.most_common()
        },
        "self": [{"function": f, "pct": pct(n)} for f, n in own.most_common(top)],
        "inclusive": [
            {"function": f, "pct": pct(n)}
            for f, n in inclusive.most_common()
            if not any(w in f for w in _WRAPPERS)
        ][:top],
    }


# -- machine and versions -------------------------------------------------------------------


def fsync_probe(directory: Path, count: int = 200) -> tuple[float, float]:
    """Median and 90th percentile of write(4 KiB) + fsync on the benchmark's file system."""
    path = directory / "fsync-probe"
    times: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return round(times[count // 2] * 1000, 3), round(times[count * 9 // 10] * 1000, 3)


def machine_info(postfix_version: str, work: Path) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    mem = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
    versions = subprocess.run(
        [
            str(VENV_PY),
            "-c",
            "import json, platform, sqlite3, ssl; from importlib import metadata as m\n"
            "def v(p):\n"
            "    try: return m.version(p)\n"
            "    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({'python': platform.python_version(), "
            "'sqlite': sqlite3.sqlite_version, 'openssl': ssl.OPENSSL_VERSION, "
            "'postlane': v('postlane'), 'uvloop': v('uvloop'), "
            "'sqlalchemy': v('sqlalchemy'), 'py-spy': v('py-spy')}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    commit = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        [
            "git",
            "--no-optional-locks",
            "-C",
            str(REPO),
            "status",
            "--porcelain",
            "--untracked-files=no",
            "src",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    debian = Path("/etc/debian_version")
    fsync_ms = fsync_probe(work)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else "unknown",
        "mem_total_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "debian": debian.read_text().strip() if debian.exists() else None,
        "postfix": postfix_version,
        **json.loads(versions.stdout),
        "git_commit": commit or None,
        "src_modified": bool(dirty),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "niceness": os.nice(0),
        "fsync_ms_median": fsync_ms[0],
        "fsync_ms_p90": fsync_ms[1],
    }


# -- report -------------------------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return f"{kib / 1024:.0f} MiB" if kib else "n/a"


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs: interference from other work only slows a run down."""
    return max(runs, key=lambda r: r.get("msg_per_s") or 0)


def summary(results: dict[str, Any], failures: list[str]) -> str:
    m = results["machine"]
    width = 133
    lines = [
        "",
        "=" * width,
        f"Postlane ingest benchmark, {m['date']}; Postlane [smtp] processes = "
        f"{m.get('smtp_processes', 1)}, commit_process = {m.get('commit_process', True)}",
        f"machine: {m['nproc']} x {m['cpu_model']}, {m['mem_total_gib']} GiB RAM, "
        f"Linux {m['kernel']}, Debian {m['debian']}; fsync of 4 KiB: median "
        f"{m['fsync_ms_median']} ms, p90 {m['fsync_ms_p90']} ms; niceness {m['niceness']}",
        f"versions: Postfix {m['postfix']}, Python {m['python']}, SQLite {m['sqlite']}, "
        f"uvloop {m['uvloop']}, postlane {m['postlane']} (git {m['git_commit']}"
        f"{', src/ has uncommitted changes' if m['src_modified'] else ''})",
        "-" * width,
        f"{'scenario':<46}{'server':<10}{'msgs':>7}{'seconds':>9}{'msg/s':>9}"
        f"{'srv CPU%':>9}{'CPU ms/msg':>11}{'other%':>8}{'VmHWM':>10}{'max RSS':>10}",
    ]

    def row(label: str, r: dict[str, Any]) -> str:
        seconds = r.get("seconds") or 0
        cpu = f"{100 * r['server_cpu_s'] / seconds:.0f}" if seconds else "n/a"
        per_msg = f"{1000 * r['server_cpu_s'] / r['messages']:.3f}" if r["messages"] else "n/a"
        return (
            f"{label:<46}{r['server']:<10}{r['messages']:>7}{seconds:>9.2f}"
            f"{r.get('msg_per_s') or 0:>9.1f}{cpu:>9}{per_msg:>11}{r.get('other_cpu_pct', 0):>8}"
            f"{mib(r.get('peak_rss_kib')):>10}{mib(r.get('max_sampled_rss_kib')):>10}"
        )

    source = results.get("smtp_source", {})
    for s, servers in source.items():
        for runs in servers.values():
            for i, r in enumerate(runs, 1):
                lines.append(row(f"smtp-source -s {s} -l {results['size']} (run {i})", r))
    for variant, r in results.get("smtp_load", {}).items():
        what = "STARTTLS+AUTH" if variant == "starttls" else "plaintext AUTH"
        lines.append(row(f"smtp_load.py -c {r['workers']}, {what}, 1 msg/conn", r))
    lines.append("-" * width)
    lines.append(
        "srv CPU% = server CPU time / wall time (100 = one core; Postfix: all its processes); "
        "CPU ms/msg = server CPU time per message; other% = machine "
        "CPU used by neither server nor client (other processes, unattributed kernel work), "
        "% of all cores; VmHWM = Postlane's peak RSS since it started; max RSS = highest VmRSS "
        "sampled every 0.1 s while it ran"
    )
    for s, servers in source.items():
        if servers.get("Postfix") and servers.get("Postlane"):
            pf, pl = best(servers["Postfix"]), best(servers["Postlane"])
            ratio = pl["msg_per_s"] / pf["msg_per_s"]
            verdict = "met" if ratio >= 3 else "NOT met"
            lines.append(
                f"-s {s:<4} best Postfix {pf['msg_per_s']:8.1f} msg/s, best Postlane "
                f"{pl['msg_per_s']:8.1f} msg/s: ratio Postlane/Postfix {ratio:.2f}x "
                f"(target >= 3x: {verdict})"
            )
    for s, servers in source.items():
        for r in servers.get("Postlane", [])[:1]:
            c = r.get("commit")
            if c:
                lines.append(
                    f"group commit, -s {s} run 1: {c['commits']} commits, mean batch "
                    f"{c['mean_batch']} msgs, mean commit {c['mean_commit_ms']} ms, "
                    f"batch sizes (<= le: count) {c['batch_histogram']}"
                )
    for r in results.get("first_logins", {}).values():
        lines.append(
            f"first logins, {r['workers']:>2} worker(s), 20 plaintext-AUTH msgs on a fresh "
            f"Postlane: server CPU {r['server_cpu_s']} s, VmHWM {mib(r['hwm_before_kib'])} -> "
            f"{mib(r['hwm_after_kib'])}"
        )
    idle = results.get("idle")
    if idle:
        lines.append(
            f"idle connections: {idle['connections_open']} open, RSS "
            f"{idle['rss_before_kib']} -> {idle['rss_with_connections_kib']} KiB = "
            f"{idle['per_connection_kib']} KiB per connection"
        )
    measured = [r for servers in source.values() for runs in servers.values() for r in runs]
    measured += list(results.get("smtp_load", {}).values())
    for label, group in (
        ("smtp-source runs", [r for r in measured if "sessions" in r]),
        ("smtp_load.py runs", [r for r in measured if "variant" in r]),
    ):
        pl_runs = [r for r in group if r.get("server") == "Postlane"]
        if pl_runs:
            hwm = max(r["peak_rss_kib"] for r in pl_runs)
            at_start = max(r["startup_hwm_kib"] for r in pl_runs)
            sampled = max(r["max_sampled_rss_kib"] or 0 for r in pl_runs)
            lines.append(
                f"Postlane, {label}: peak RSS (VmHWM) {mib(hwm)}; VmHWM right after start "
                f"{mib(at_start)}; highest VmRSS sampled every 0.1 s during the runs {mib(sampled)}"
            )
    prof = results.get("profile")
    for mode, p in (prof or {}).get("passes", {}).items():
        a = p["analysis"]
        if "self" not in a:
            continue
        what = "every thread's on-CPU samples" if mode == "threads" else "GIL holder only"
        lines.append(
            f"py-spy ({what}), smtp-source -s 10 -m {p['messages']}, "
            f"{p['msg_per_s_with_profiler']} msg/s while sampled; "
            f"{a['active_samples']} samples in ~{a['ticks']} ticks:"
        )
        for name, t in a["threads"].items():
            lines.append(
                f"  thread {name}: {t['pct_of_active']}% of samples, "
                f"present in ~{t['pct_of_ticks']}% of ticks"
            )
        lines.append("  self (leaf function), % of samples:")
        lines += [f"    {h['pct']:5.1f}%  {h['function']}" for h in a["self"][:12]]
        lines.append("  inclusive, % of samples:")
        lines += [f"    {h['pct']:5.1f}%  {h['function']}" for h in a["inclusive"][:12]]
    lines.append("-" * width)
    if failures:
        lines.append(f"{len(failures)} FAILED CHECK(S):")
        lines += [f"  - {f}" for f in failures]
    else:
        lines.append(
            "all checks passed: every message accepted (Postfix: discarded count from its log; "
            "Postlane: rows counted with sqlite3), no rejections, no duplicates"
        )
    lines.append(f"details: {results['results_file']}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/ingest", description="Postfix vs Postlane SMTP intake benchmark"
    )
    p.add_argument("--messages", type=int, default=20000, help="smtp-source -m (default 20000)")
    p.add_argument("--sessions", default="10,100", help="smtp-source -s values (default 10,100)")
    p.add_argument("--repeat", type=int, default=2, help="runs per server and -s (best counts)")
    p.add_argument("--size", type=int, default=10240, help="message body bytes (default 10240)")
    p.add_argument("--load-messages", type=int, default=5000, help="smtp_load.py messages")
    p.add_argument("--load-workers", type=int, default=10, help="smtp_load.py concurrency")
    p.add_argument("--idle", type=int, default=5000, help="idle connections (0: skip)")
    p.add_argument(
        "--smtp-processes",
        type=int,
        default=1,
        help="Postlane [smtp] processes: intake processes sharing the ports (default 1)",
    )
    p.add_argument(
        "--no-commit-process",
        action="store_true",
        help="Postlane [smtp] commit_process = false: commits in a thread of intake",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy runs")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=15.0,
        help="before each run, wait until the machine is at most this %% busy (default 15)",
    )
    p.add_argument("--quiet-wait", type=float, default=5.0, help="but at most this many s")
    p.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="scheduling niceness of the benchmark and everything it starts (Postfix, "
        "Postlane, clients alike), so other work on a shared machine disturbs it less; "
        "0 to leave it (default -10)",
    )
    p.add_argument("--postfix-port", type=int, default=10025)
    p.add_argument("--postlane-port", type=int, default=10026, help="first of 3 SMTP ports")
    p.add_argument("--http-port", type=int, default=10029, help="Postlane metrics port")
    p.add_argument("--run-limit", type=float, default=300.0, help="seconds one client may run")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new dir in /tmp")
    p.add_argument("--keep", action="store_true", help="keep Postlane databases")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # children (Postlane, the load generator) inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.nice:
        os.nice(args.nice)  # inherited by every process started from here on
    if not VENV_PY.exists():
        raise BenchError(f"{VENV_PY} missing: run bench/ingest, which creates it")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="postlane-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # noqa: S103 - Postfix daemons read below it
    ports = Ports(
        postfix=free_port(args.postfix_port),
        trusted=free_port(args.postlane_port),
        starttls=free_port(args.postlane_port + 1),
        plain=free_port(args.postlane_port + 2),
        http=free_port(args.http_port),
    )
    bench = Bench(args, work, ports)
    results = bench.results
    results["results_file"] = str(args.json or work / "results.json")
    results["size"] = args.size
    results["ports"] = ports.__dict__
    started = time.monotonic()
    try:
        results["machine"] = machine_info(Postfix(work, ports.postfix).version(), work)
        results["machine"]["smtp_processes"] = args.smtp_processes
        results["machine"]["commit_process"] = not args.no_commit_process
        say(f"work directory {work}; ports {ports.__dict__}")
        say(json.dumps(results["machine"]))
        bench.template = work / "postlane-template"
        bench.password = make_template(
            bench.template, ports, args.smtp_processes, not args.no_commit_process
        )
        bench.smoke()
        sessions = [int(s) for s in args.sessions.split(",") if s.strip()]
        results["smtp_source"] = {}
        for s in sessions:
            servers: dict[str, list[dict[str, Any]]] = {"Postfix": [], "Postlane": []}
            results["smtp_source"][str(s)] = servers
            for rep in range(1, args.repeat + 1):
                servers["Postfix"].append(bench.source_postfix(s, rep))
                servers["Postlane"].append(bench.source_postlane(s, rep))
        results["smtp_load"] = {}
        for variant in ("starttls", "plain"):
            results["smtp_load"][variant] = bench.load(variant)
        results["first_logins"] = bench.first_logins()
        if args.idle:
            results["idle"] = bench.idle()
        if not args.no_profile:
            if PYSPY.exists():
                results["profile"] = bench.profile()
            else:
                say("py-spy not installed in .venv: profile skipped")
    except BenchError as exc:
        bench.fail(str(exc))
    finally:
        for server in list(bench.live):
            with contextlib.suppress(Exception):
                server.stop()
        results["failures"] = bench.failures
        results["total_seconds"] = round(time.monotonic() - started, 1)
        Path(results["results_file"]).write_text(json.dumps(results, indent=2) + "\n")
    if "machine" in results:
        print(summary(results, bench.failures))
    say(f"done in {results['total_seconds']} s")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
