#!/usr/bin/env python3
"""SMTP load generator for Postlane benchmarks (asyncio, standard library only).

Two modes:

``send``
    N concurrent workers (default 10). Every message uses a NEW connection:
    greeting, EHLO, [STARTTLS, EHLO], AUTH LOGIN, MAIL, RCPT, DATA, QUIT. Each
    message has a unique Message-ID and a body of ``--size`` bytes (default
    10240, like ``smtp-source -l 10240``). Prints msg/s and latency
    percentiles; ``--json`` prints one JSON object instead.

``idle``
    Opens N TCP connections (in batches), reads each greeting, reports how many
    are open, holds them until a line arrives on stdin (or ``--hold`` seconds
    pass), then closes them all. Used to measure memory per idle connection.

Examples::

    python bench/smtp_load.py send --port 10027 --tls starttls \\
        --cafile var/tls/selfsigned.crt --server-name bench.postlane.test \\
        --user load1 --password SECRET -n 5000 -c 10
    python bench/smtp_load.py idle --port 10026 -n 5000 --hold 10

Traffic goes only to the address given with ``--host`` (default 127.0.0.1); the
benchmark uses loopback addresses only. Every loop is bounded by a message
count and an overall ``--deadline``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import ssl
import sys
import time
import uuid
from dataclasses import dataclass, field

_BODY_LINE = 78  # characters per body line, CRLF excluded


class SmtpError(Exception):
    """The server answered something other than what the step expects."""


@dataclass
class Options:
    host: str
    port: int
    source: str | None
    tls: str  # "starttls" or "none"
    ssl_context: ssl.SSLContext | None
    server_name: str | None
    user: str
    password: str
    sender: str
    recipient: str
    size: int
    timeout: float
    helo: str


@dataclass
class Stats:
    sent: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def make_body(size: int) -> bytes:
    """``size`` bytes of printable ASCII in CRLF-terminated lines (no line starts with '.')."""
    width = _BODY_LINE + 2
    lines = [(str(n % 10) + "X" * (_BODY_LINE - 1)).encode() for n in range(size // width)]
    rest = size % width
    if rest > 2:
        lines.append(b"R" * (rest - 2))
    elif rest and lines:
        lines[-1] += b"P" * rest
    return b"".join(line + b"\r\n" for line in lines)


def make_message(opts: Options, body: bytes, run_id: str, number: int) -> bytes:
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    head = (
        f"From: Bench <{opts.sender}>\r\n"
        f"To: <{opts.recipient}>\r\n"
        f"Subject: smtp_load message {number}\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{run_id}.{number}@bench.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    return head + body


def dot_stuff(data: bytes) -> bytes:
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


async def read_reply(reader: asyncio.StreamReader, seconds: float) -> tuple[int, str]:
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(reader.readline(), seconds)
        if not line:
            raise SmtpError("connection closed by server" + (f" after {lines!r}" if lines else ""))
        lines.append(line.rstrip(b"\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SmtpError(f"malformed reply {lines!r}") from None
    return code, " | ".join(x.decode("ascii", "replace") for x in lines)


async def step(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    line: bytes | None,
    expect: int,
    seconds: float,
    label: str,
) -> str:
    if line is not None:
        writer.write(line)
    code, text = await read_reply(reader, seconds)
    if code != expect:
        raise SmtpError(f"{label}: expected {expect}, got {text}")
    return text


async def send_one(opts: Options, message: bytes) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            opts.host, opts.port, local_addr=(opts.source, 0) if opts.source else None
        ),
        opts.timeout,
    )
    try:
        t = opts.timeout
        helo = f"EHLO {opts.helo}\r\n".encode()
        await step(reader, writer, None, 220, t, "greeting")
        await step(reader, writer, helo, 250, t, "EHLO")
        if opts.tls == "starttls":
            await step(reader, writer, b"STARTTLS\r\n", 220, t, "STARTTLS")
            assert opts.ssl_context is not None
            await asyncio.wait_for(
                writer.start_tls(opts.ssl_context, server_hostname=opts.server_name), t
            )
            await step(reader, writer, helo, 250, t, "EHLO after STARTTLS")
        await step(reader, writer, b"AUTH LOGIN\r\n", 334, t, "AUTH LOGIN")
        await step(reader, writer, base64.b64encode(opts.user.encode()) + b"\r\n", 334, t, "user")
        await step(reader, writer, base64.b64encode(opts.password.encode()) + b"\r\n", 235, t, "pw")
        await step(reader, writer, f"MAIL FROM:<{opts.sender}>\r\n".encode(), 250, t, "MAIL")
        await step(reader, writer, f"RCPT TO:<{opts.recipient}>\r\n".encode(), 250, t, "RCPT")
        await step(reader, writer, b"DATA\r\n", 354, t, "DATA")
        await step(reader, writer, dot_stuff(message) + b".\r\n", 250, t, "end of data")
        await step(reader, writer, b"QUIT\r\n", 221, t, "QUIT")
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), opts.timeout)


async def run_send(args: argparse.Namespace, opts: Options) -> dict[str, object]:
    body = make_body(args.size)
    run_id = f"{uuid.uuid4().hex[:12]}.{os.getpid()}"
    stats = Stats()
    counter = iter(range(args.messages))
    deadline = time.monotonic() + args.deadline

    async def worker() -> None:
        for number in counter:
            if time.monotonic() > deadline or stats.errors >= args.max_errors:
                return
            message = make_message(opts, body, run_id, number)
            started = time.perf_counter()
            try:
                await send_one(opts, message)
            except (SmtpError, OSError, TimeoutError, ssl.SSLError) as exc:
                stats.errors += 1
                if len(stats.error_samples) < 10:
                    stats.error_samples.append(f"message {number}: {type(exc).__name__}: {exc}")
                continue
            stats.latencies.append(time.perf_counter() - started)
            stats.sent += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    lat = sorted(stats.latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

    return {
        "mode": "send",
        "tls": opts.tls,
        "verify": args.cafile is not None,
        "concurrency": args.concurrency,
        "requested": args.messages,
        "sent": stats.sent,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "seconds": round(elapsed, 3),
        "msg_per_s": round(stats.sent / elapsed, 1) if elapsed > 0 else None,
        "latency_ms_p50": pct(0.50),
        "latency_ms_p95": pct(0.95),
        "latency_ms_p99": pct(0.99),
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "message_bytes": len(make_message(opts, body, run_id, 0)),
    }


async def run_idle(args: argparse.Namespace) -> dict[str, object]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: list[str] = []

    async def open_one() -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    args.host, args.port, local_addr=(args.source, 0) if args.source else None
                ),
                args.timeout,
            )
            code, text = await read_reply(reader, args.timeout)
            if code != 220:
                writer.close()
                raise SmtpError(f"greeting {text}")
            conns.append((reader, writer))
        except (SmtpError, OSError, TimeoutError) as exc:
            if len(failures) < 10:
                failures.append(f"{type(exc).__name__}: {exc}")
            else:
                failures.append("")

    started = time.perf_counter()
    remaining = args.connections
    while remaining > 0:
        batch = min(args.batch, remaining)
        await asyncio.gather(*(open_one() for _ in range(batch)))
        remaining -= batch
    opened = time.perf_counter() - started
    ready = {
        "mode": "idle",
        "open": len(conns),
        "failed": len(failures),
        "failure_samples": [f for f in failures if f][:10],
        "seconds_to_open": round(opened, 3),
    }
    print(json.dumps(ready), flush=True)
    if args.hold is None:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    else:
        await asyncio.sleep(args.hold)
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    return {"mode": "idle", "closed": len(conns)}


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1", help="server address (loopback)")
    common.add_argument("--port", type=int, required=True)
    common.add_argument(
        "--source", default=None, help="local address to connect from, e.g. 127.0.0.2"
    )
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per reply")

    send = sub.add_parser("send", parents=[common], help="send messages")
    send.add_argument("-n", "--messages", type=int, default=5000)
    send.add_argument("-c", "--concurrency", type=int, default=10)
    send.add_argument("--size", type=int, default=10240, help="body bytes per message")
    send.add_argument("--tls", choices=["starttls", "none"], default="starttls")
    send.add_argument("--cafile", help="verify the server certificate against this PEM file")
    send.add_argument(
        "--insecure", action="store_true", help="do not verify the certificate (no --cafile)"
    )
    send.add_argument("--server-name", default=None, help="name to verify (SNI)")
    send.add_argument("--user", required=True)
    send.add_argument(
        "--password", default=os.environ.get("SMTP_LOAD_PASSWORD"), help="or $SMTP_LOAD_PASSWORD"
    )
    send.add_argument("--from", dest="sender", default="bench@bench.test")
    send.add_argument("--to", dest="recipient", default="rcpt@example.com")
    send.add_argument("--helo", default="load.bench.test")
    send.add_argument("--deadline", type=float, default=600.0, help="overall seconds at most")
    send.add_argument("--max-errors", type=int, default=100, help="stop after this many")
    send.add_argument("--json", action="store_true", help="print one JSON object")

    idle = sub.add_parser("idle", parents=[common], help="hold idle connections")
    idle.add_argument("-n", "--connections", type=int, default=5000)
    idle.add_argument("--batch", type=int, default=250, help="connections opened at once")
    idle.add_argument(
        "--hold", type=float, default=None, help="seconds to hold (default: until stdin line)"
    )
    return parser


def main() -> int:
    args = build_parser().parse_args()
    raise_nofile()
    if args.mode == "idle":
        asyncio.run(run_idle(args))
        return 0
    if not args.password:
        print("smtp_load: --password or $SMTP_LOAD_PASSWORD is required", file=sys.stderr)
        return 2
    context = None
    if args.tls == "starttls":
        if args.cafile:
            context = ssl.create_default_context(cafile=args.cafile)
        elif args.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            print("smtp_load: STARTTLS needs --cafile or --insecure", file=sys.stderr)
            return 2
    opts = Options(
        host=args.host,
        port=args.port,
        source=args.source,
        tls=args.tls,
        ssl_context=context,
        server_name=args.server_name or (args.host if args.cafile else None),
        user=args.user,
        password=args.password,
        sender=args.sender,
        recipient=args.recipient,
        size=args.size,
        timeout=args.timeout,
        helo=args.helo,
    )
    result = asyncio.run(run_send(args, opts))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['sent']} sent, {result['errors']} errors in {result['seconds']} s: "
            f"{result['msg_per_s']} msg/s (p50 {result['latency_ms_p50']} ms, "
            f"p99 {result['latency_ms_p99']} ms; client CPU {result['client_cpu_s']} s)"
        )
        for sample in result["error_samples"]:  # type: ignore[attr-defined]
            print("  " + sample)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
