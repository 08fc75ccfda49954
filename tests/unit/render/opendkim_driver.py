"""Run ``opendkim-testmsg`` on one message with a private DNS, for the DKIM tests.

opendkim-testmsg verifies only with keys from DNS, through the C library's
resolver, which reads /etc/resolv.conf. So this script is started by the test
under ``unshare --mount --net``: in its own network namespace it brings up
loopback and answers TXT queries on 127.0.0.1:53 from the table it is given;
in its own mount namespace it binds a resolv.conf naming that server over
/etc/resolv.conf. Neither change is visible outside the namespaces, and no
packet leaves them.

Usage: opendkim_driver.py '{"sel._domainkey.example.com": "v=DKIM1; ..."}' message.eml
Exit status and stderr are opendkim-testmsg's (0: the signature verified).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _answer(query_wire: bytes, table: dict[str, str]) -> bytes:
    query = dns.message.from_wire(query_wire)
    response = dns.message.make_response(query)
    question = query.question[0]
    text = table.get(question.name.to_text().rstrip(".").lower())
    if text is None or question.rdtype != dns.rdatatype.TXT:
        response.set_rcode(dns.rcode.NXDOMAIN)
    else:
        # A TXT string holds at most 255 bytes: split long keys as DNS publishes them.
        strings = " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255))
        response.answer.append(
            dns.rrset.from_text(question.name, 60, dns.rdataclass.IN, dns.rdatatype.TXT, strings)
        )
    return response.to_wire()


def _serve(sock: socket.socket, table: dict[str, str]) -> None:
    while True:
        data, peer = sock.recvfrom(4096)
        sock.sendto(_answer(data, table), peer)


def main() -> int:
    table = {name.lower(): value for name, value in json.loads(sys.argv[1]).items()}
    message = Path(sys.argv[2]).read_bytes()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        resolv = Path(tmp) / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
        subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 53))
        threading.Thread(target=_serve, args=(sock, table), daemon=True).start()
        run = subprocess.run(["opendkim-testmsg"], input=message, capture_output=True, timeout=30)
    sys.stdout.buffer.write(run.stdout)
    sys.stderr.buffer.write(run.stderr)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
