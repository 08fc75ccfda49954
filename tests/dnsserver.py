"""A small authoritative DNS server for tests, on 127.0.0.1, UDP and TCP.

Delivery resolves MX, A, AAAA and TXT records; testing that against the real
DNS would be slow, flaky and unable to produce a SERVFAIL on demand. This
server answers from a Python dict, counts the queries it receives (so a test
can prove an answer came from a cache), and can be told to fail a name in the
three ways the resolver must tell apart.

Usage::

    from dnsserver import DnsServer

    records = {
        ("example.test", "MX"): ["10 mx1.example.test", "20 mx2.example.test"],
        ("mx1.example.test", "A"): ["127.0.0.1"],
        ("mx1.example.test", "AAAA"): ["::1"],
        ("_mta-sts.example.test", "TXT"): ["v=STSv1; id=20240101"],
        ("www.example.test", "CNAME"): ["example.test"],
    }
    with DnsServer(records, servfail={"broken.test"}, timeout={"slow.test"}) as dns:
        resolver = Resolver([dns.nameserver])      # "127.0.0.1:<port>"
        ...
        assert dns.count("example.test", "MX") == 1

``DnsServer(records, *, servfail=(), timeout=(), nxdomain=(), port=0, ttl=300,
ttls=None, negative_ttl=60)``:

- ``records`` maps ``(name, type)`` to a list of values in zone-file
  presentation form: ``A`` ``"192.0.2.1"``, ``AAAA`` ``"2001:db8::1"``, ``MX``
  ``"10 mx.example.test"`` (``"0 ."`` is a null MX), ``CNAME``
  ``"target.test"``, ``TXT`` the text itself, unquoted (a value longer than 255
  bytes goes out as several strings, as real DNS does). Names are
  case-insensitive and a final dot is optional. One list is one RRset.
- ``ttl`` is every RRset's TTL unless ``ttls[(name, type)]`` says otherwise.
- Negative answers (NXDOMAIN and "no such record", NODATA) carry an SOA whose
  TTL and MINIMUM are ``negative_ttl`` (RFC 2308); ``None`` leaves the SOA out.
- A name in ``servfail`` gets SERVFAIL; in ``timeout`` gets no reply at all; in
  ``nxdomain`` gets NXDOMAIN even if it has records. A plain name applies to
  every record type of exactly that name; a ``(name, type)`` pair to that type
  only (``servfail={("mx.test", "AAAA")}``: A works, AAAA fails). When
  changing the sets of a running server, write names lower-case without the
  final dot.
- A name with no records, that is not the parent of a name with records, is
  NXDOMAIN; an existing name without the asked-for type is NODATA. A CNAME is
  followed within the server's records, as an authoritative server does.
- ``port=0`` lets the server pick a port free for both UDP and TCP; read it
  from ``port`` or ``nameserver`` after ``start()``.
- A UDP answer larger than the client's EDNS buffer (512 bytes without EDNS)
  is sent truncated (TC) so the client retries over TCP.

Everything is mutable while the server runs: ``set(name, type, values)``,
``delete(name, type)``, and the ``servfail``/``timeout``/``nxdomain`` sets.
``queries`` lists every ``(name, type)`` asked, in order; ``count(name,
type=None)`` counts them and ``reset_counts()`` clears the list.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from types import TracebackType
from typing import Any

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSHeader, DNSLabel, DNSRecord

__all__ = ["DnsServer"]

LOOPBACK = "127.0.0.1"
_SUPPORTED = {"A", "AAAA", "MX", "TXT", "CNAME"}
_MAX_CNAME_CHAIN = 8
_PLAIN_UDP_LIMIT = 512  # RFC 1035 §4.2.1, without EDNS


def _name(text: str) -> str:
    return text.strip().rstrip(".").lower()


def _key(name: str, rtype: str) -> tuple[str, str]:
    rtype = rtype.upper()
    if rtype not in _SUPPORTED:
        raise ValueError(f"DnsServer answers {sorted(_SUPPORTED)}, not {rtype!r}")
    return _name(name), rtype


Failing = str | tuple[str, str]
"""A name (every type fails) or a ``(name, type)`` pair (that type fails)."""


def _failing(entry: Failing) -> Failing:
    return _name(entry) if isinstance(entry, str) else _key(*entry)


def _rdata(rtype: str, value: str) -> Any:
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        preference, exchange = value.split()
        return MX(exchange if exchange.endswith(".") else exchange + ".", int(preference))
    if rtype == "CNAME":
        return CNAME(value if value.endswith(".") else value + ".")
    data = value.encode()
    return TXT([data[i : i + 255] for i in range(0, len(data), 255)] or [b""])


class _UdpServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    block_on_close = False
    dns: DnsServer


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    dns: DnsServer


class _UdpHandler(socketserver.BaseRequestHandler):
    server: _UdpServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns.answer(data, udp=True)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5.0)
        try:
            while True:
                header = self._read(sock, 2)
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                data = self._read(sock, length)
                if data is None:
                    return
                reply = self.server.dns.answer(data, udp=False)
                if reply is not None:
                    sock.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return

    @staticmethod
    def _read(sock: socket.socket, count: int) -> bytes | None:
        chunks = b""
        while len(chunks) < count:
            chunk = sock.recv(count - len(chunks))
            if not chunk:
                return None
            chunks += chunk
        return chunks


class DnsServer:
    """An authoritative DNS server answering from a dict; see the module docstring."""

    def __init__(
        self,
        records: Mapping[tuple[str, str], Sequence[str]] | None = None,
        *,
        servfail: Iterable[Failing] = (),
        timeout: Iterable[Failing] = (),
        nxdomain: Iterable[Failing] = (),
        port: int = 0,
        ttl: int = 300,
        ttls: Mapping[tuple[str, str], int] | None = None,
        negative_ttl: int | None = 60,
    ) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], list[str]] = {}
        self._ttls: dict[tuple[str, str], int] = {}
        for (name, rtype), values in (records or {}).items():
            self._records[_key(name, rtype)] = list(values)
        for (name, rtype), value in (ttls or {}).items():
            self._ttls[_key(name, rtype)] = value
        self.servfail: set[Failing] = {_failing(n) for n in servfail}
        self.timeout: set[Failing] = {_failing(n) for n in timeout}
        self.nxdomain: set[Failing] = {_failing(n) for n in nxdomain}
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.queries: list[tuple[str, str]] = []
        self._requested_port = port
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0

    # --- configuration ----------------------------------------------------------------

    def set(self, name: str, rtype: str, values: Sequence[str], ttl: int | None = None) -> None:
        """Replace the RRset of ``(name, rtype)``; ``ttl`` overrides the default TTL."""
        key = _key(name, rtype)
        with self._lock:
            self._records[key] = list(values)
            if ttl is None:
                self._ttls.pop(key, None)
            else:
                self._ttls[key] = ttl

    def delete(self, name: str, rtype: str) -> None:
        """Remove the RRset of ``(name, rtype)``, if there is one."""
        with self._lock:
            self._records.pop(_key(name, rtype), None)

    def count(self, name: str, rtype: str | None = None) -> int:
        """How many queries for ``name`` (and ``rtype``, when given) arrived."""
        wanted = _name(name)
        with self._lock:
            return sum(
                1
                for qname, qtype in self.queries
                if qname == wanted and (rtype is None or qtype == rtype.upper())
            )

    def reset_counts(self) -> None:
        with self._lock:
            self.queries.clear()

    @property
    def nameserver(self) -> str:
        """This server in the ``[delivery] nameservers`` form, ``127.0.0.1:<port>``."""
        if not self.port:
            raise RuntimeError("DnsServer is not started")
        return f"{LOOPBACK}:{self.port}"

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> DnsServer:
        """Bind UDP and TCP on one port and serve from a background thread."""
        if self._servers:
            raise RuntimeError("DnsServer is already started")
        attempts = 1 if self._requested_port else 20
        for attempt in range(attempts):
            udp = _UdpServer((LOOPBACK, self._requested_port), _UdpHandler)
            port = udp.server_address[1]
            try:
                tcp = _TcpServer((LOOPBACK, port), _TcpHandler)
            except OSError:
                udp.server_close()
                if attempt == attempts - 1:
                    raise
                continue
            break
        udp.dns = tcp.dns = self
        self.port = port
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.01},  # stop() waits up to this long,
                name=f"dnsserver-{port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving and close both sockets."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- answering --------------------------------------------------------------------

    def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        """The wire-format reply to one query, or None to stay silent."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # a test server ignores garbage, as a real one would
            return None
        if not request.questions:
            return None
        question = request.q
        qname = _name(str(question.qname))
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        with self._lock:
            self.queries.append((qname, qtype))
            reply = self._reply(request, qname, qtype)
        if reply is None:
            return None
        packed: bytes = reply.pack()
        if udp and len(packed) > self._udp_limit(request):
            truncated = DNSRecord(
                DNSHeader(id=request.header.id, qr=1, aa=1, tc=1, rd=request.header.rd),
                q=request.q,
            )
            packed = truncated.pack()
        return packed

    @staticmethod
    def _udp_limit(request: DNSRecord) -> int:
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                return max(int(rr.rclass), _PLAIN_UDP_LIMIT)
        return _PLAIN_UDP_LIMIT

    def _reply(self, request: DNSRecord, qname: str, qtype: str) -> DNSRecord | None:
        if self._hit(self.timeout, qname, qtype):
            return None
        reply = request.reply(ra=0, aa=1)
        if request.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return reply
        if self._hit(self.servfail, qname, qtype):
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if self._hit(self.nxdomain, qname, qtype):
            return self._negative(reply, qname, nxdomain=True)
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            cname = self._records.get((name, "CNAME"))
            if cname and qtype != "CNAME":
                reply.add_answer(self._rr(name, "CNAME", cname[0]))
                name = _name(cname[0])
                if self._hit(self.nxdomain, name, qtype):
                    return self._negative(reply, name, nxdomain=True)
                continue
            values = self._records.get((name, qtype))
            if values:
                for value in values:
                    reply.add_answer(self._rr(name, qtype, value))
                return reply
            return self._negative(reply, name, nxdomain=not self._exists(name))
        return reply

    @staticmethod
    def _hit(failing: AbstractSet[Failing], name: str, qtype: str) -> bool:
        return name in failing or (name, qtype) in failing

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return any(owner == name or owner.endswith(suffix) for owner, _ in self._records)

    def _rr(self, name: str, rtype: str, value: str) -> RR:
        ttl = self._ttls.get((name, rtype), self.ttl)
        return RR(DNSLabel(name + "."), getattr(QTYPE, rtype), ttl=ttl, rdata=_rdata(rtype, value))

    def _negative(self, reply: DNSRecord, name: str, *, nxdomain: bool) -> DNSRecord:
        if nxdomain:
            reply.header.rcode = RCODE.NXDOMAIN
        if self.negative_ttl is not None:
            zone = name.rsplit(".", 1)[-1] + "."  # the TLD: an ancestor of every name asked
            soa = SOA(
                "ns." + zone,
                "hostmaster." + zone,
                (1, 3600, 600, 86400, self.negative_ttl),
            )
            reply.add_auth(RR(DNSLabel(zone), QTYPE.SOA, ttl=self.negative_ttl, rdata=soa))
        return reply
