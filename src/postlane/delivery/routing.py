"""Where to deliver a domain's mail: MX selection and what DNS failures mean.

The rules, and where they come from:

- RFC 5321 §5.1: MX hosts are tried in ascending preference; hosts of equal
  preference are tried in random order, to spread load the way the domain's
  owner asked. A domain without MX records has an *implicit MX*: the domain
  itself, reached through its own A/AAAA records.
- RFC 7505: a single MX of preference 0 whose exchange is the root name
  (``0 .``) is a *null MX*: the domain accepts no mail, so delivery fails at
  once with ``5.1.10`` instead of being retried until it expires.
- RFC 1035 §3.3.9 and RFC 5321 §5.1: an MX exchange is a host *name*. Records
  naming an IP address are left out (as Postfix and OpenSMTPD do); when no
  usable record remains the domain is unroutable (``5.4.4``), which is an error
  of the domain's DNS, not a reason to guess.
- DNS errors: a domain that does not exist is permanent (``5.1.2``); a server
  that fails or a lookup that times out is temporary (``4.4.3``) and retried.
- A route keeps at most ``MAX_MX_HOSTS`` (10) hosts, the best by preference.
  Whoever controls the recipient's DNS chooses the MX list, and one answer
  (retried over TCP when truncated) can name thousands of hosts: each tried
  host costs lookups and connections (up to ``connect_timeout`` each) made on
  behalf of that domain. No RFC sets a limit; the worker further stops after
  Postfix's numbers of addresses and sessions (see ``worker._connect``).

Everything here is pure: the worker does the lookups and passes the records
(and a seeded ``random.Random``) in, so every rule is tested without a network.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

import dns.exception
import dns.name
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from postlane.errors import InvalidInput

__all__ = [
    "DEFAULT_DNS_PORT",
    "MAX_MX_HOSTS",
    "DnsFailure",
    "MxHost",
    "NullMx",
    "Route",
    "classify_dns_error",
    "mx_hosts",
    "order_mx",
    "parse_nameserver",
    "routes_for",
]

DEFAULT_DNS_PORT: Final = 53
MAX_MX_HOSTS: Final = 10  # hosts kept per route, best preference first (module docstring)
_MAX_PREFERENCE: Final = 0xFFFF  # MX PREFERENCE is a 16-bit field (RFC 1035 §3.3.9)
_MAX_PORT: Final = 0xFFFF
_NAMESERVER_EXAMPLES: Final = "like 127.0.0.1, 127.0.0.1:5353 or [::1]:53"


@dataclass(frozen=True, slots=True)
class MxHost:
    """One MX record: lower preference is tried first; ``host`` is the exchange's name."""

    preference: int
    host: str

    def __post_init__(self) -> None:
        if not 0 <= self.preference <= _MAX_PREFERENCE:
            raise ValueError(f"MX preference {self.preference} is not in 0-{_MAX_PREFERENCE}")


@dataclass(frozen=True, slots=True)
class Route:
    """The hosts to try for ``domain``, best first.

    ``implicit`` is True when the domain has no MX records and is reached
    through its own address records (RFC 5321 §5.1). ``ignored`` says which
    MX records were left out and why, so the worker can log a domain's broken
    DNS instead of hiding it.
    """

    domain: str
    hosts: tuple[str, ...]
    implicit: bool = False
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NullMx:
    """The domain publishes a null MX (RFC 7505): it accepts no mail, fail at once."""

    domain: str

    temporary: ClassVar[bool] = False
    status: ClassVar[str] = "5.1.10"

    @property
    def reason(self) -> str:
        """The text for the recipient's failure event and the bounce."""
        return f"{self.domain} accepts no mail: it publishes a null MX (RFC 7505)"


@dataclass(frozen=True, slots=True)
class DnsFailure:
    """A lookup that gave no route.

    ``temporary`` failures are retried with backoff; permanent ones fail the
    recipient. ``status`` is the RFC 3463 enhanced status code to record.
    """

    temporary: bool
    reason: str
    status: str


def _normalise(host: str) -> str:
    """Lower-case, without the final dot; the root name ``.`` becomes ``""``."""
    return host.strip().rstrip(".").lower()


def _is_ip_address(host: str) -> bool:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def mx_hosts(answer: Iterable[object]) -> list[MxHost]:
    """The MX records of a dnspython answer, as :class:`MxHost` values.

    Anything in the answer that is not an MX record (a CNAME the resolver
    followed, say) is skipped. The root name comes out as ``"."``.
    """
    return [
        MxHost(rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
        for rdata in answer
        if isinstance(rdata, MX)
    ]


def order_mx(records: Sequence[MxHost], *, rng: random.Random) -> list[str]:
    """Host names in the order to try them (RFC 5321 §5.1).

    Ascending preference; a host listed more than once keeps only its best
    preference; hosts of equal preference are shuffled with ``rng``. Each group
    is sorted before it is shuffled, so the order depends on the seed only and
    not on the order the DNS server happened to return.
    """
    best: dict[str, int] = {}
    for record in records:
        host = _normalise(record.host)
        if host not in best or record.preference < best[host]:
            best[host] = record.preference
    groups: dict[int, list[str]] = {}
    for host, preference in best.items():
        groups.setdefault(preference, []).append(host)
    ordered: list[str] = []
    for preference in sorted(groups):
        group = sorted(groups[preference])
        rng.shuffle(group)
        ordered.extend(group)
    return ordered


def routes_for(
    domain: str, mx_records: Sequence[MxHost] | None, *, rng: random.Random
) -> Route | NullMx | DnsFailure:
    """Where to deliver mail for ``domain``, given the MX records found for it.

    ``mx_records`` is None (or empty) when the domain has no MX RRset: the
    domain itself is then the implicit MX. Records naming the root or an IP
    address are not usable; if nothing usable remains, the result is
    :class:`NullMx` when the domain published ``0 .`` and a permanent
    :class:`DnsFailure` (``5.4.4``, unable to route) otherwise. A null MX next
    to real MX records breaks RFC 7505 §3; the real records are used then, as
    OpenSMTPD does, because that is the more likely intent. Only the best
    ``MAX_MX_HOSTS`` hosts are kept, after ordering, so a cut through a group of
    equal preference keeps a random part of it.
    """
    name = _normalise(domain)
    if not name:
        raise ValueError("routes_for needs a domain name, got an empty one")
    if name.startswith("["):
        raise ValueError(
            f"{domain!r} is an address literal: RFC 5321 §5.1 delivers to it without DNS"
        )
    if not mx_records:
        return Route(name, (name,), implicit=True)
    usable: list[MxHost] = []
    ignored: list[str] = []
    null_mx = False
    for record in mx_records:
        host = _normalise(record.host)
        if not host and record.preference == 0:
            null_mx = True
        elif not host:
            ignored.append(f"MX {record.preference} . names the DNS root, which has no address")
        elif _is_ip_address(host):
            ignored.append(
                f"MX {record.preference} {record.host} names an IP address; an MX must name "
                "a host (RFC 1035 §3.3.9)"
            )
        else:
            usable.append(record)
    if usable:
        if null_mx:
            ignored.append("MX 0 . (null MX) ignored: RFC 7505 §3 forbids it beside other MX")
        hosts = order_mx(usable, rng=rng)
        if len(hosts) > MAX_MX_HOSTS:
            ignored.append(
                f"{len(hosts) - MAX_MX_HOSTS} least preferred MX hosts left out: "
                f"a route keeps at most {MAX_MX_HOSTS}"
            )
        return Route(name, tuple(hosts[:MAX_MX_HOSTS]), ignored=tuple(ignored))
    if null_mx:
        return NullMx(name)
    return DnsFailure(
        temporary=False,
        reason=f"no usable MX host for {name}: " + "; ".join(ignored),
        status="5.4.4",
    )


def _query_names(exc: dns.resolver.NXDOMAIN) -> str:
    names = exc.kwargs.get("qnames") or ()
    return ", ".join(str(name).rstrip(".") for name in names)


def classify_dns_error(exc: Exception) -> DnsFailure:
    """What a failed dnspython lookup means for delivery.

    ============================== ========= ======= =====================================
    exception                      temporary status  why
    ============================== ========= ======= =====================================
    NXDOMAIN                       no        5.1.2   the name does not exist
    NoAnswer                       no        5.4.4   the name exists but has no such record
    YXDOMAIN, bad name syntax      no        5.1.2   no such name can exist
    NoNameservers (SERVFAIL, ...)  yes       4.4.3   the domain's servers are failing
    Timeout, LifetimeTimeout       yes       4.4.3   no answer in time
    any other DNS error, OSError   yes       4.4.3   retrying is safe; the expiry bounds it
    ============================== ========= ======= =====================================

    NoAnswer to an *MX* query is not a failure: it means "no MX RRset", so
    pass None to :func:`routes_for` for the implicit MX. It is a failure when
    a host has no A or AAAA record. Any other exception is a bug, not a DNS
    failure, and raises TypeError rather than being retried until expiry.
    """
    if isinstance(exc, dns.resolver.NXDOMAIN):
        names = _query_names(exc)
        return DnsFailure(
            temporary=False,
            reason=f"domain does not exist: {names}" if names else "domain does not exist",
            status="5.1.2",
        )
    if isinstance(exc, dns.resolver.NoAnswer):
        return DnsFailure(temporary=False, reason=f"no such DNS record: {exc}", status="5.4.4")
    if isinstance(exc, dns.resolver.YXDOMAIN | dns.exception.SyntaxError | dns.name.NameTooLong):
        return DnsFailure(temporary=False, reason=f"not a valid domain name: {exc}", status="5.1.2")
    if isinstance(exc, dns.resolver.NoNameservers):
        return DnsFailure(temporary=True, reason=f"DNS servers failed: {exc}", status="4.4.3")
    if isinstance(exc, dns.exception.Timeout):
        return DnsFailure(temporary=True, reason=f"DNS lookup timed out: {exc}", status="4.4.3")
    if isinstance(exc, dns.exception.DNSException | OSError):
        return DnsFailure(
            temporary=True, reason=f"DNS lookup failed: {type(exc).__name__}: {exc}", status="4.4.3"
        )
    raise TypeError(f"not a DNS error: {exc!r}") from exc


def parse_nameserver(text: str) -> tuple[str, int]:
    """A nameserver setting as ``(address, port)``; the port defaults to 53.

    Accepts ``127.0.0.1``, ``127.0.0.1:5353``, ``::1``, ``[::1]`` and
    ``[::1]:5353``; an IPv6 address with a port must be bracketed, since
    ``::1:53`` is itself an address. Names are refused: looking up the
    resolver's name would need a resolver.
    """
    value = text.strip()

    def bad(why: str) -> InvalidInput:
        return InvalidInput(
            f"invalid nameserver {text!r}: {why}; give an IP address, {_NAMESERVER_EXAMPLES}"
        )

    if not value:
        raise bad("it is empty")
    port_text: str | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise bad("the '[' has no matching ']'")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise bad("only ':port' may follow ']'")
            port_text = rest[1:]
        bracketed = True
    else:
        host, bracketed = value, False
        if value.count(":") == 1:
            host, port_text = value.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise bad(f"{host!r} is not an IP address") from None
    if bracketed and address.version != 6:
        raise bad("brackets are only for IPv6 addresses")
    if port_text is None:
        return str(address), DEFAULT_DNS_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= _MAX_PORT:
        raise bad(f"port {port_text!r} is not a number from 1 to {_MAX_PORT}")
    return str(address), int(port_text)
