"""The delivery resolver against a real DNS server on loopback (tests/dnsserver.py).

Every test asks a :class:`DnsServer` of its own over UDP (and TCP where an
answer is too large), so what is tested is the resolver as delivery will use
it: dnspython's wire handling, the error mapping of ``routing`` and the
cache, whose clock the tests move by hand.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from dns.asyncresolver import Resolver as DnsPythonResolver
from dns.nameserver import Do53Nameserver
from dns.rdatatype import RdataType
from dns.resolver import BaseResolver, NoResolverConfiguration

from dnsserver import DnsServer
from postlane.delivery.resolver import MAX_RECORDS, Resolver, to_ascii
from postlane.delivery.routing import DnsFailure, MxHost, NullMx, Route, routes_for
from postlane.errors import ConfigError, InvalidInput

T = TypeVar("T")

RECORDS: dict[tuple[str, str], list[str]] = {
    ("example.test", "MX"): ["20 mx2.example.test", "10 mx1.example.test", "30 mx3.example.test"],
    ("mx1.example.test", "A"): ["127.0.0.1"],
    ("mx1.example.test", "AAAA"): ["::1"],
    ("mx2.example.test", "A"): ["127.0.0.2", "127.0.0.3"],
    ("equal.test", "MX"): [f"10 mx{i}.equal.test" for i in range(5)] + ["20 backup.equal.test"],
    ("implicit.test", "A"): ["127.0.0.9"],
    ("implicit.test", "TXT"): ["v=spf1 -all"],
    ("noaddress.test", "TXT"): ["exists, but has neither MX nor A nor AAAA"],
    ("null.test", "MX"): ["0 ."],
    ("iponly.test", "MX"): ["10 192.0.2.1"],
    ("alias.test", "CNAME"): ["example.test"],
    ("v6only.test", "AAAA"): ["::1", "2001:db8::1"],
    ("xn--bcher-kva.test", "MX"): ["10 mx.xn--bcher-kva.test"],
    ("big.test", "TXT"): ["x" * 3000],
}


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(
        RECORDS,
        servfail={"servfail.test"},
        timeout={"timeout.test"},
    ) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dns: DnsServer, clock: FakeClock) -> Resolver:
    return Resolver([dns.nameserver], timeout=0.5, clock=clock, rng=random.Random(7))


# --- route ----------------------------------------------------------------------------


def test_mx_hosts_come_in_ascending_preference(resolver: Resolver) -> None:
    route = run(resolver.route("example.test"))
    assert route == Route(
        "example.test", ("mx1.example.test", "mx2.example.test", "mx3.example.test")
    )


def test_equal_preferences_are_shuffled_by_the_injected_rng(dns: DnsServer) -> None:
    def hosts(seed: int) -> tuple[str, ...]:
        resolver = Resolver([dns.nameserver], rng=random.Random(seed))
        route = run(resolver.route("equal.test"))
        assert isinstance(route, Route)
        return route.hosts

    # The same seed gives the same order, and the order routing.routes_for gives.
    records = [MxHost(10, f"mx{i}.equal.test") for i in range(5)]
    records.append(MxHost(20, "backup.equal.test"))
    expected = routes_for("equal.test", records, rng=random.Random(3))
    assert isinstance(expected, Route)
    assert hosts(3) == hosts(3) == expected.hosts
    orders = {hosts(seed) for seed in range(12)}
    assert len(orders) > 1
    assert all(order[-1] == "backup.equal.test" for order in orders)


def test_cached_mx_records_are_shuffled_afresh_on_every_route(
    resolver: Resolver, dns: DnsServer
) -> None:
    orders = set()
    for _ in range(12):
        route = run(resolver.route("equal.test"))
        assert isinstance(route, Route)
        orders.add(route.hosts[:5])
    assert len(orders) > 1
    assert dns.count("equal.test", "MX") == 1


def test_a_domain_without_mx_is_its_own_implicit_mx(resolver: Resolver) -> None:
    route = run(resolver.route("implicit.test"))
    assert route == Route("implicit.test", ("implicit.test",), implicit=True)
    assert run(resolver.addresses("implicit.test")) == ["127.0.0.9"]


def test_a_domain_without_mx_or_address_fails_permanently(resolver: Resolver) -> None:
    result = run(resolver.route("noaddress.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.4.4")
    assert "no MX records" in result.reason
    assert "no A or AAAA record" in result.reason


def test_null_mx_fails_at_once_with_5_1_10(resolver: Resolver) -> None:
    result = run(resolver.route("null.test"))
    assert result == NullMx("null.test")
    assert (result.temporary, result.status) == (False, "5.1.10")


def test_nxdomain_is_permanent(resolver: Resolver) -> None:
    result = run(resolver.route("nowhere.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.1.2")
    assert "nowhere.test" in result.reason


def test_servfail_is_temporary(resolver: Resolver) -> None:
    result = run(resolver.route("servfail.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (True, "4.4.3")
    assert "SERVFAIL" in result.reason


def test_timeout_is_temporary_and_bounded(dns: DnsServer) -> None:
    resolver = Resolver([dns.nameserver], timeout=0.3)
    started = time.monotonic()
    result = run(resolver.route("timeout.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (True, "4.4.3")
    assert "timed out" in result.reason
    assert time.monotonic() - started < 2


def test_mx_records_naming_addresses_leave_the_domain_unroutable(resolver: Resolver) -> None:
    result = run(resolver.route("iponly.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.4.4")


def test_an_mx_query_follows_a_cname(resolver: Resolver) -> None:
    route = run(resolver.route("alias.test"))
    assert isinstance(route, Route)
    assert route.domain == "alias.test"
    assert route.hosts[0] == "mx1.example.test"


def test_idn_domains_are_looked_up_as_a_labels(resolver: Resolver, dns: DnsServer) -> None:
    route = run(resolver.route("Bücher.test."))
    assert route == Route("xn--bcher-kva.test", ("mx.xn--bcher-kva.test",))
    assert dns.count("xn--bcher-kva.test", "MX") == 1
    assert to_ascii("BÜCHER.test") == "xn--bcher-kva.test"


def test_a_name_idna_cannot_encode_is_a_permanent_failure(resolver: Resolver) -> None:
    result = run(resolver.route("ü" * 70 + ".test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.1.2")


def test_the_nameserver_port_is_used(dns: DnsServer) -> None:
    assert dns.port != 53
    resolver = Resolver([f"127.0.0.1:{dns.port}"])
    assert isinstance(run(resolver.route("example.test")), Route)
    assert dns.count("example.test", "MX") == 1


def test_no_nameservers_means_the_system_configuration(
    dns: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_resolv_conf(self: BaseResolver, _: object) -> None:
        self.nameservers = [Do53Nameserver("127.0.0.1", dns.port)]

    monkeypatch.setattr(DnsPythonResolver, "read_resolv_conf", read_resolv_conf)
    assert isinstance(run(Resolver().route("example.test")), Route)
    assert dns.count("example.test", "MX") == 1


def test_no_nameservers_anywhere_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_resolv_conf(self: BaseResolver, _: object) -> None:
        raise NoResolverConfiguration("no nameservers")  # type: ignore[no-untyped-call]

    monkeypatch.setattr(DnsPythonResolver, "read_resolv_conf", read_resolv_conf)
    with pytest.raises(ConfigError, match=r"\[delivery\] nameservers is empty"):
        Resolver()


def test_a_bad_nameserver_setting_is_refused() -> None:
    with pytest.raises(InvalidInput, match="nameserver"):
        Resolver(["dns.example.test:53"])


# --- addresses --------------------------------------------------------------------------


def test_addresses_are_ipv4_first_then_ipv6(resolver: Resolver) -> None:
    assert run(resolver.addresses("mx1.example.test")) == ["127.0.0.1", "::1"]
    assert run(resolver.addresses("mx2.example.test")) == ["127.0.0.2", "127.0.0.3"]
    assert run(resolver.addresses("v6only.test")) == ["::1", "2001:db8::1"]


def test_addresses_are_not_repeated(dns: DnsServer, resolver: Resolver) -> None:
    dns.set("dup.test", "CNAME", ["mx2.example.test"])
    dns.set("mx2.example.test", "A", ["127.0.0.2", "127.0.0.2", "127.0.0.3"])
    assert run(resolver.addresses("dup.test")) == ["127.0.0.2", "127.0.0.3"]


def test_a_host_that_does_not_exist_is_unroutable(resolver: Resolver) -> None:
    result = run(resolver.addresses("missing.example.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.4.4")
    assert "does not exist" in result.reason


def test_a_host_without_addresses_is_unroutable(resolver: Resolver) -> None:
    result = run(resolver.addresses("example.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.4.4")
    assert "no A or AAAA record" in result.reason


def test_one_family_failing_does_not_hide_the_other(dns: DnsServer, resolver: Resolver) -> None:
    dns.servfail.add(("mx1.example.test", "AAAA"))
    assert run(resolver.addresses("mx1.example.test")) == ["127.0.0.1"]


def test_no_address_and_one_family_failing_is_temporary(dns: DnsServer, resolver: Resolver) -> None:
    dns.servfail.add(("v6only.test", "AAAA"))
    result = run(resolver.addresses("v6only.test"))
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (True, "4.4.3")


# --- txt --------------------------------------------------------------------------------


def test_txt_records(resolver: Resolver) -> None:
    assert run(resolver.txt("implicit.test")) == ["v=spf1 -all"]
    assert run(resolver.txt("nowhere.test")) == []
    assert run(resolver.txt("example.test")) == []
    failure = run(resolver.txt("servfail.test"))
    assert isinstance(failure, DnsFailure)
    assert failure.temporary


def test_a_large_txt_record_is_joined_and_fetched_over_tcp(
    resolver: Resolver, dns: DnsServer
) -> None:
    assert run(resolver.txt("big.test")) == ["x" * 3000]  # 12 strings of <= 255 bytes
    assert dns.count("big.test", "TXT") == 2  # truncated over UDP, then TCP


# --- the cache --------------------------------------------------------------------------


def test_answers_are_cached_for_their_ttl(
    resolver: Resolver, dns: DnsServer, clock: FakeClock
) -> None:
    first = run(resolver.route("example.test"))
    assert run(resolver.route("example.test")) == first
    assert run(resolver.addresses("mx1.example.test")) == ["127.0.0.1", "::1"]
    assert run(resolver.addresses("mx1.example.test")) == ["127.0.0.1", "::1"]
    assert dns.count("example.test", "MX") == 1
    assert dns.count("mx1.example.test") == 2  # one A, one AAAA
    clock.advance(299)
    run(resolver.route("example.test"))
    assert dns.count("example.test", "MX") == 1
    clock.advance(2)  # past the TTL of 300 s
    run(resolver.route("example.test"))
    assert dns.count("example.test", "MX") == 2


def test_a_cached_answer_is_used_even_if_the_record_changed(
    resolver: Resolver, dns: DnsServer, clock: FakeClock
) -> None:
    assert run(resolver.addresses("implicit.test")) == ["127.0.0.9"]
    dns.set("implicit.test", "A", ["127.0.0.10"])
    assert run(resolver.addresses("implicit.test")) == ["127.0.0.9"]
    clock.advance(301)
    assert run(resolver.addresses("implicit.test")) == ["127.0.0.10"]


def test_long_ttls_are_capped(dns: DnsServer, clock: FakeClock) -> None:
    dns.set("example.test", "MX", ["10 mx1.example.test"], ttl=7 * 86400)
    resolver = Resolver([dns.nameserver], clock=clock, max_ttl=3600)
    run(resolver.route("example.test"))
    clock.advance(3599)
    run(resolver.route("example.test"))
    assert dns.count("example.test", "MX") == 1
    clock.advance(2)
    run(resolver.route("example.test"))
    assert dns.count("example.test", "MX") == 2


def test_ttl_zero_is_not_cached(resolver: Resolver, dns: DnsServer) -> None:
    dns.set("short.test", "A", ["127.0.0.5"], ttl=0)
    run(resolver.addresses("short.test"))
    run(resolver.addresses("short.test"))
    assert dns.count("short.test", "A") == 2


def test_nxdomain_is_cached_for_the_soa_minimum(
    resolver: Resolver, dns: DnsServer, clock: FakeClock
) -> None:
    dns.negative_ttl = 30
    assert isinstance(run(resolver.route("nowhere.test")), DnsFailure)
    dns.set("nowhere.test", "MX", ["10 mx1.example.test"])
    clock.advance(29)
    cached = run(resolver.route("nowhere.test"))
    assert isinstance(cached, DnsFailure)
    assert cached.status == "5.1.2"  # a cached negative answer reads like a fresh one
    assert dns.count("nowhere.test", "MX") == 1
    clock.advance(2)
    assert isinstance(run(resolver.route("nowhere.test")), Route)
    assert dns.count("nowhere.test", "MX") == 2


def test_no_data_is_cached_too(resolver: Resolver, dns: DnsServer, clock: FakeClock) -> None:
    run(resolver.route("implicit.test"))
    run(resolver.route("implicit.test"))
    assert dns.count("implicit.test", "MX") == 1
    clock.advance(61)  # the server's SOA says 60 s
    run(resolver.route("implicit.test"))
    assert dns.count("implicit.test", "MX") == 2


def test_without_an_soa_negative_answers_get_the_default(dns: DnsServer, clock: FakeClock) -> None:
    dns.negative_ttl = None
    resolver = Resolver([dns.nameserver], clock=clock, negative_ttl=10)
    run(resolver.txt("nowhere.test"))
    clock.advance(9)
    run(resolver.txt("nowhere.test"))
    assert dns.count("nowhere.test", "TXT") == 1
    clock.advance(2)
    run(resolver.txt("nowhere.test"))
    assert dns.count("nowhere.test", "TXT") == 2


def test_temporary_failures_are_not_cached(resolver: Resolver, dns: DnsServer) -> None:
    assert isinstance(run(resolver.route("servfail.test")), DnsFailure)
    dns.servfail.clear()
    dns.set("servfail.test", "MX", ["10 mx1.example.test"])
    assert isinstance(run(resolver.route("servfail.test")), Route)
    assert dns.count("servfail.test", "MX") == 2


def test_the_cache_is_bounded(dns: DnsServer, clock: FakeClock) -> None:
    resolver = Resolver([dns.nameserver], clock=clock, max_entries=2)
    run(resolver.txt("implicit.test"))
    run(resolver.txt("noaddress.test"))
    run(resolver.txt("big.test"))  # evicts the oldest entry, implicit.test
    run(resolver.txt("big.test"))
    run(resolver.txt("implicit.test"))
    assert dns.count("big.test", "TXT") == 2  # UDP + TCP, once
    assert dns.count("implicit.test", "TXT") == 2


def test_clear_cache(resolver: Resolver, dns: DnsServer) -> None:
    run(resolver.route("example.test"))
    resolver.clear_cache()
    run(resolver.route("example.test"))
    assert dns.count("example.test", "MX") == 2


# --- the bound on an answer's records -----------------------------------------------------


def cached_records(resolver: Resolver, name: str, rdtype: RdataType) -> int:
    entry = resolver._cache[(name, int(rdtype))]
    assert isinstance(entry.answer, tuple)
    return len(entry.answer)


def test_a_large_mx_answer_is_cut_to_its_most_preferred_records(
    resolver: Resolver, dns: DnsServer
) -> None:
    """One answer (over TCP) can hold thousands of records; MAX_ENTRIES counts answers only."""
    # The server lists the best hosts last: a cut before sorting would lose them.
    dns.set("many.test", "MX", [f"{1000 - i} mx{i}.many.test" for i in range(300)])
    route = run(resolver.route("many.test"))
    assert isinstance(route, Route)
    assert route.hosts == tuple(f"mx{i}.many.test" for i in range(299, 289, -1))
    assert cached_records(resolver, "many.test", RdataType.MX) == MAX_RECORDS == 100


def test_a_large_address_answer_is_cut(resolver: Resolver, dns: DnsServer) -> None:
    everything = [f"192.0.2.{i}" for i in range(1, 201)] + [f"198.51.100.{i}" for i in range(100)]
    dns.set("wide.test", "A", everything)
    found = run(resolver.addresses("wide.test"))
    assert isinstance(found, list)
    assert len(found) == MAX_RECORDS
    assert set(found) <= set(everything)
    assert cached_records(resolver, "wide.test", RdataType.A) == MAX_RECORDS
