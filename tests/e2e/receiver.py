"""A recording SMTP receiver for the end-to-end tests, run inside a network namespace.

Standard library only (it runs as ``ip netns exec NS python receiver.py ...``).
It speaks just enough ESMTP for Postlane's outbound client: EHLO/HELO,
STARTTLS (when given a certificate), MAIL, RCPT, DATA, RSET, NOOP, QUIT, with
pipelined commands read in order. Every accepted message is written to the
directory as ``NNNNNN.eml`` (the exact bytes, dot-unstuffed) and then
``NNNNNN.json`` (envelope, TLS, connection number, time, sequence number); a test reads the
JSON files, which appear only once the message file is complete. Every RCPT
is appended to ``rcpt.log`` as ``<address> <reply code>``.

Behaviour is read from ``DIR/rules.json`` at each RCPT and DATA, so a test
can change it while the receiver runs::

    {"replies": {"user@x.test": ["451 4.7.1 try later", "250 2.1.5 Ok"]},
     "delay": {"slow.test": 0.3}}

``replies[address]`` is the sequence of RCPT replies for successive attempts
(the last one repeats); any other address gets ``250 2.1.5 Ok``.
``delay[domain]`` is a pause, in seconds, before each message to that domain
is written and answered.

Usage: receiver.py HOST PORT DIR [CERT KEY]
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any


class Receiver:
    def __init__(self, directory: Path, context: ssl.SSLContext | None) -> None:
        self.directory = directory
        self.context = context
        self.seq = 0
        self.connections = 0  # numbers each session, so a test can tell copies' connections apart
        self.attempts: dict[str, int] = {}

    def rules(self, key: str) -> dict[str, Any]:
        """One table of rules.json ("replies" or "delay"), re-read every time."""
        try:
            loaded = json.loads((self.directory / "rules.json").read_text())
        except (OSError, ValueError):
            return {}
        table = loaded.get(key) if isinstance(loaded, dict) else None
        return table if isinstance(table, dict) else {}

    def rcpt_reply(self, address: str) -> str:
        replies = self.rules("replies").get(address.lower())
        count = self.attempts.get(address.lower(), 0)
        self.attempts[address.lower()] = count + 1
        if not replies:
            return "250 2.1.5 Ok"
        return str(replies[min(count, len(replies) - 1)])

    def delay(self, rcpts: list[str]) -> float:
        delays = self.rules("delay")
        domains = (r.rpartition("@")[2].lower() for r in rcpts)
        return max((float(delays.get(d, 0)) for d in domains), default=0.0)

    def store(
        self, mail_from: str, rcpts: list[str], data: bytes, tls: bool, connection: int
    ) -> int:
        self.seq += 1
        stem = self.directory / f"{self.seq:06d}"
        stem.with_suffix(".eml").write_bytes(data)
        record = {
            "seq": self.seq,
            "mail_from": mail_from,
            "rcpts": rcpts,
            "tls": tls,
            "connection": connection,
            "at": time.time(),
        }
        tmp = stem.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, stem.with_suffix(".json"))
        return self.seq

    def log_rcpt(self, address: str, reply: str) -> None:
        with (self.directory / "rcpt.log").open("a") as log:
            log.write(f"{address} {reply[:3]}\n")

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        tls = False
        mail_from: str | None = None
        rcpts: list[str] = []

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            await say("220 mx.receiver.test ESMTP test receiver")
            while True:
                line = await reader.readline()
                if not line:
                    return
                command = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = command[:4].upper()
                if verb in ("EHLO", "HELO"):
                    mail_from, rcpts = None, []
                    if verb == "HELO":
                        await say("250 mx.receiver.test")
                        continue
                    lines = [
                        "mx.receiver.test",
                        "PIPELINING",
                        "SIZE 104857600",
                        "8BITMIME",
                        "ENHANCEDSTATUSCODES",
                        "SMTPUTF8",
                    ]
                    if self.context is not None and not tls:
                        lines.append("STARTTLS")
                    for i, text in enumerate(lines):
                        await say(("250 " if i == len(lines) - 1 else "250-") + text)
                elif verb == "STAR" and self.context is not None and not tls:
                    await say("220 2.0.0 Ready to start TLS")
                    await writer.start_tls(self.context)
                    tls = True
                    mail_from, rcpts = None, []
                elif verb == "MAIL":
                    mail_from = command[10:].split(">")[0].lstrip(" <")
                    rcpts = []
                    await say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    address = command[8:].split(">")[0].lstrip(" <")
                    reply = self.rcpt_reply(address)
                    self.log_rcpt(address, reply)
                    if reply.startswith("2"):
                        rcpts.append(address)
                    await say(reply)
                elif verb == "DATA":
                    if mail_from is None or not rcpts:
                        await say("554 5.5.1 No valid recipients")
                        continue
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    chunks: list[bytes] = []
                    while True:
                        chunk = await reader.readline()
                        if not chunk:
                            return
                        if chunk == b".\r\n":
                            break
                        chunks.append(chunk[1:] if chunk.startswith(b".") else chunk)
                    pause = self.delay(rcpts)
                    if pause:
                        await asyncio.sleep(pause)
                    seq = self.store(mail_from, rcpts, b"".join(chunks), tls, connection)
                    mail_from, rcpts = None, []
                    await say(f"250 2.0.0 Ok: queued as R{seq}")
                elif verb == "RSET":
                    mail_from, rcpts = None, []
                    await say("250 2.0.0 Ok")
                elif verb == "NOOP":
                    await say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    await say("221 2.0.0 Bye")
                    return
                else:
                    await say("502 5.5.2 Command not recognised")
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def main() -> None:
    host, port, directory = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    context = None
    if len(sys.argv) > 5:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[4], sys.argv[5])
    receiver = Receiver(directory, context)
    server = await asyncio.start_server(receiver.session, host, port, limit=1 << 20)
    (directory / "ready").write_text("ok")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
