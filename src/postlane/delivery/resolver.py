"""DNS lookups for delivery: where a domain's mail goes, a host's addresses, TXT records.

:mod:`~postlane.delivery.routing` holds the rules (MX order, null MX, what a
DNS error means); this module does the lookups those rules need, through
dnspython's asynchronous resolver, and remembers the answers.

Why it keeps its own cache instead of dnspython's:

- The expiry is read from an injected clock, so a test proves "answered from
  the cache until the TTL runs out" without sleeping.
- A TTL is capped (one hour by default): a record published with a TTL of a
  week must not pin a domain's old MX while mail queues for it.
- Negative answers — the name does not exist, or has no record of that type —
  are cached too, for the time RFC 2308 §5 gives them (the smaller of the
  SOA's TTL and its MINIMUM field) or a short default when the server sent no
  SOA. A domain without MX is asked for its MX once per negative TTL, not once
  per recipient.
- Temporary failures (SERVFAIL, timeouts, unreachable servers) are never
  cached: the next attempt asks again, and the queue's backoff already spaces
  attempts out.

The cache is a plain dict keyed by ``(name, record type)``; it holds the
records themselves, not the conclusions drawn from them, so hosts of equal MX
preference are shuffled afresh on every :meth:`Resolver.route` call, as RFC
5321 §5.1 intends.

``MAX_ENTRIES`` bounds how many answers are kept, but not how large each is:
one answer, retried over TCP when truncated, can hold thousands of records
(a 64 KB answer of 2,800 MX records cost about 1.2 MB cached), and whoever
controls a recipient's domain chooses it. So at most ``MAX_RECORDS`` records
of an answer are kept. MX records are sorted by preference before the cut, so
the hosts a route would try first are never the ones dropped; a route uses at
most :data:`~postlane.delivery.routing.MAX_MX_HOSTS` of them anyway, and the
worker at most five addresses.

Names are looked up in their ASCII form: an internationalised domain is
converted to A-labels with Python's ``idna`` codec (IDNA 2003), the same
conversion intake and the tenant checks use, so a domain compares equal
everywhere in Postlane.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from postlane.delivery.routing import (
    DnsFailure,
    NullMx,
    Route,
    classify_dns_error,
    mx_hosts,
    parse_nameserver,
    routes_for,
)
from postlane.errors import ConfigError

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_RECORDS",
    "MAX_TTL",
    "NEGATIVE_TTL",
    "Resolver",
    "to_ascii",
]

log = logging.getLogger("postlane.delivery.resolver")

DEFAULT_TIMEOUT: Final = 5.0  # seconds for one lookup, all retries included
MAX_TTL: Final = 3600.0  # no answer is kept longer than this, whatever its TTL
NEGATIVE_TTL: Final = 60.0  # for a negative answer that carries no SOA
MAX_ENTRIES: Final = 100_000  # a bound on memory; far above one node's working set
MAX_RECORDS: Final = 100  # records kept per answer (module docstring)
_TRY_TIMEOUT: Final = 2.0  # one UDP try; a lost packet is retried within the lifetime
_EDNS_PAYLOAD: Final = 1232  # the DNS Flag Day 2020 size: no IP fragmentation
_HOST_UNROUTABLE: Final = "5.4.4"


def to_ascii(domain: str) -> str:
    """``domain`` lower-cased, without a final dot, with IDN labels as A-labels.

    Raises UnicodeError when a label cannot be encoded (too long, or
    prohibited characters); the caller turns that into a permanent failure.
    """
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        name = name.encode("idna").decode("ascii")
    return name


@dataclass(frozen=True, slots=True)
class _Missing:
    """A negative answer: no such name (NXDOMAIN) or no record of that type (NODATA).

    ``failure`` is what :func:`~postlane.delivery.routing.classify_dns_error`
    made of it, kept so a cached negative answer reads exactly like a fresh one.
    """

    nxdomain: bool
    failure: DnsFailure


_Answer = tuple[dns.rdata.Rdata, ...] | _Missing


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    answer: _Answer


def _responses(exc: dns.exception.DNSException) -> list[dns.message.Message]:
    """The DNS responses a NXDOMAIN or NoAnswer exception carries."""
    many = exc.kwargs.get("responses") or {}
    one = exc.kwargs.get("response")
    found = [m for m in many.values() if isinstance(m, dns.message.Message)]
    return [*found, one] if isinstance(one, dns.message.Message) else found


def _bounded(records: Iterable[dns.rdata.Rdata]) -> tuple[dns.rdata.Rdata, ...]:
    """At most ``MAX_RECORDS`` of ``records``; MX records are sorted first so the cut
    drops the least preferred hosts, never the ones a route would try.

    The sort is stable: records of equal preference keep the server's order,
    and :func:`~postlane.delivery.routing.order_mx` shuffles them later.
    """
    kept = list(records)
    if any(isinstance(rdata, MX) for rdata in kept):
        kept.sort(key=lambda rdata: rdata.preference if isinstance(rdata, MX) else 0)
    return tuple(kept[:MAX_RECORDS])


def _negative_ttl(responses: Iterable[dns.message.Message], default: float) -> float:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
    for response in responses:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                soa = rrset[0]
                return float(min(rrset.ttl, soa.minimum))
    return default


class Resolver:
    """Asynchronous MX, address and TXT lookups with a TTL cache.

    ``nameservers`` are ``[delivery] nameservers`` entries (``127.0.0.1``,
    ``127.0.0.1:5353``, ``[::1]:53``); empty means the system's resolvers
    (``/etc/resolv.conf``). Each entry becomes a dnspython ``Do53Nameserver``
    with its own port, which is what ``nameserver_ports`` would do, except
    that two servers on one address with different ports stay distinct.

    ``timeout`` bounds one lookup, retries included. ``clock`` (seconds,
    monotonic) dates the cache entries; ``rng`` shuffles MX hosts of equal
    preference, so a test can seed it.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_ttl: float = MAX_TTL,
        negative_ttl: float = NEGATIVE_TTL,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"DNS timeout must be positive, got {timeout}")
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port)
                for address, port in map(parse_nameserver, nameservers)
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration as exc:
                raise ConfigError(
                    "[delivery] nameservers is empty and the system has no DNS resolver "
                    f'configured ({exc}); set nameservers, e.g. ["127.0.0.1:53"]'
                ) from None
        resolver.lifetime = timeout
        resolver.timeout = min(_TRY_TIMEOUT, timeout)
        resolver.use_edns(0, 0, _EDNS_PAYLOAD)
        self._resolver = resolver
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._cache: dict[tuple[str, int], _Entry] = {}

    # --- the three lookups delivery needs ---------------------------------------------

    async def route(self, domain: str) -> Route | NullMx | DnsFailure:
        """The hosts to try for mail to ``domain``, best first, or why there are none.

        - MX records found: :func:`~postlane.delivery.routing.routes_for`
          orders them (or finds a null MX, RFC 7505: ``5.1.10``).
        - The domain exists but has no MX (NODATA): the implicit MX of RFC 5321
          §5.1, the domain itself. Its addresses are looked up here (the answer
          is cached for the worker's own :meth:`addresses` call), so that a
          domain with neither MX nor address fails now, as ``5.4.4``.
        - NXDOMAIN: permanent ``5.1.2``. SERVFAIL, timeout: temporary ``4.4.3``.

        ``domain`` is a domain name, never an address literal (``[192.0.2.1]``
        is delivered to without DNS; ``routes_for`` raises ValueError for it).
        """
        name = self._ascii(domain)
        if isinstance(name, DnsFailure):
            return name
        answer = await self._lookup(name, dns.rdatatype.MX)
        if isinstance(answer, DnsFailure):
            return answer
        if isinstance(answer, _Missing):
            if answer.nxdomain:
                return answer.failure
            route = routes_for(name, None, rng=self._rng)
        else:
            route = routes_for(name, mx_hosts(answer), rng=self._rng)
        if isinstance(route, Route) and route.implicit:
            found = await self.addresses(name)
            if isinstance(found, DnsFailure):
                return DnsFailure(
                    temporary=found.temporary,
                    reason=f"{name} has no MX records, and as its own (implicit) MX: "
                    f"{found.reason}",
                    status=found.status,
                )
        return route

    async def addresses(self, host: str) -> list[str] | DnsFailure:
        """``host``'s IPv4 addresses, then its IPv6 addresses, without repeats.

        A and AAAA are asked at once. When either gives addresses they are the
        answer, even if the other family failed: a working address now beats
        waiting for one that may not exist. When neither does, the result is a
        :class:`~postlane.delivery.routing.DnsFailure` — temporary (``4.4.3``)
        if either lookup failed temporarily, since the missing family might
        exist, and otherwise permanent ``5.4.4`` ("unable to route"): the host
        does not exist or has no address, an error of the domain's DNS that
        retrying will not fix (Postfix decides the same). The list is never
        empty.
        """
        name = self._ascii(host)
        if isinstance(name, DnsFailure):
            return name
        v4, v6 = await asyncio.gather(
            self._lookup(name, dns.rdatatype.A), self._lookup(name, dns.rdatatype.AAAA)
        )
        found: list[str] = []
        for answer in (v4, v6):
            if isinstance(answer, tuple):
                for rdata in answer:
                    if isinstance(rdata, A | AAAA) and rdata.address not in found:
                        found.append(rdata.address)
        if found:
            return found
        for answer in (v4, v6):
            if isinstance(answer, DnsFailure) and answer.temporary:
                return answer
        for answer in (v4, v6):
            if isinstance(answer, DnsFailure):
                return answer  # a name no DNS server could hold: already permanent
        if any(isinstance(answer, _Missing) and answer.nxdomain for answer in (v4, v6)):
            reason = f"host {name} does not exist (NXDOMAIN)"
        else:
            reason = f"host {name} has no A or AAAA record"
        return DnsFailure(temporary=False, reason=reason, status=_HOST_UNROUTABLE)

    async def txt(self, name: str) -> list[str] | DnsFailure:
        """The TXT records of ``name``, each one's strings joined without spaces.

        A name without TXT records, or that does not exist, gives ``[]``: for
        the callers (MTA-STS discovery) both mean "nothing published". Only a
        failed lookup is a :class:`~postlane.delivery.routing.DnsFailure`, so
        the caller can tell "no policy" from "could not ask". Bytes that are
        not UTF-8 become U+FFFD, which no record syntax accepts.
        """
        ascii_name = self._ascii(name)
        if isinstance(ascii_name, DnsFailure):
            return ascii_name
        answer = await self._lookup(ascii_name, dns.rdatatype.TXT)
        if isinstance(answer, DnsFailure):
            return answer
        if isinstance(answer, _Missing):
            return []
        return [
            b"".join(rdata.strings).decode("utf-8", "replace")
            for rdata in answer
            if isinstance(rdata, TXT)
        ]

    def clear_cache(self) -> None:
        """Forget every cached answer (an operator's "flush DNS")."""
        self._cache.clear()

    # --- the cache and the query ------------------------------------------------------

    @staticmethod
    def _ascii(name: str) -> str | DnsFailure:
        try:
            return to_ascii(name)
        except UnicodeError as exc:
            return DnsFailure(
                temporary=False,
                reason=f"not a valid domain name: {name!r} ({exc})",
                status="5.1.2",
            )

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer | DnsFailure:
        """The records of ``(name, rdtype)``: cached, or asked and then cached."""
        key = (name, int(rdtype))
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > self._clock():
                return entry.answer
            del self._cache[key]
        answer: _Answer
        try:
            qname = dns.name.from_text(name)
            result = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            answer = _Missing(nxdomain=True, failure=classify_dns_error(exc))
            ttl = _negative_ttl(_responses(exc), self._negative_ttl)
        except dns.resolver.NoAnswer as exc:
            answer = _Missing(nxdomain=False, failure=classify_dns_error(exc))
            ttl = _negative_ttl(_responses(exc), self._negative_ttl)
        except (dns.exception.DNSException, OSError) as exc:
            failure = classify_dns_error(exc)
            log.debug("DNS %s %s: %s", name, rdtype.name, failure.reason)
            return failure  # never cached: the next attempt asks again
        else:
            answer = _bounded(result.rrset) if result.rrset is not None else ()
            ttl = float(result.chaining_result.minimum_ttl)
        self._store(key, answer, ttl)
        return answer

    def _store(self, key: tuple[str, int], answer: _Answer, ttl: float) -> None:
        ttl = min(max(ttl, 0.0), self._max_ttl)
        if ttl <= 0:
            return  # TTL 0 means "use once" (RFC 1035 §3.2.1)
        now = self._clock()
        if key not in self._cache and len(self._cache) >= self._max_entries:
            for stale in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[stale]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]  # the oldest insertion
        self._cache[key] = _Entry(now + ttl, answer)
