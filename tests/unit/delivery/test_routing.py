from __future__ import annotations

import random

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.resolver
import pytest

from postlane.delivery.routing import (
    MAX_MX_HOSTS,
    DnsFailure,
    MxHost,
    NullMx,
    Route,
    classify_dns_error,
    mx_hosts,
    order_mx,
    parse_nameserver,
    routes_for,
)
from postlane.errors import InvalidInput


def rng(seed: int = 1) -> random.Random:
    return random.Random(seed)


# --- order_mx -------------------------------------------------------------------------


def test_ascending_preference() -> None:
    records = [MxHost(30, "c.example"), MxHost(10, "a.example"), MxHost(20, "b.example")]
    assert order_mx(records, rng=rng()) == ["a.example", "b.example", "c.example"]


def test_duplicates_keep_their_best_preference() -> None:
    records = [
        MxHost(50, "backup.example"),
        MxHost(10, "mx.example"),
        MxHost(40, "MX.Example."),  # the same host, spelt as DNS may return it
        MxHost(5, "backup.example"),
    ]
    assert order_mx(records, rng=rng()) == ["backup.example", "mx.example"]


def test_equal_preferences_are_shuffled_within_their_group_only() -> None:
    records = [MxHost(10, f"mx{i}.example") for i in range(4)] + [MxHost(20, "last.example")]
    orders = {tuple(order_mx(records, rng=rng(seed))) for seed in range(50)}
    assert len(orders) > 1, "equal preferences must not always come in the same order"
    for order in orders:
        assert sorted(order[:4]) == [f"mx{i}.example" for i in range(4)]
        assert order[4] == "last.example"


def test_order_depends_on_the_seed_not_on_the_dns_answer_order() -> None:
    records = [MxHost(10, f"mx{i}.example") for i in range(6)]
    for seed in range(10):
        assert order_mx(records, rng=rng(seed)) == order_mx(records[::-1], rng=rng(seed))


def test_empty_records_give_no_hosts() -> None:
    assert order_mx([], rng=rng()) == []


@pytest.mark.parametrize("preference", [-1, 65536])
def test_preference_is_a_16_bit_number(preference: int) -> None:
    with pytest.raises(ValueError, match="MX preference"):
        MxHost(preference, "mx.example")


# --- routes_for -----------------------------------------------------------------------


@pytest.mark.parametrize("records", [None, []])
def test_no_mx_rrset_means_the_implicit_mx(records: list[MxHost] | None) -> None:
    route = routes_for("Example.ORG.", records, rng=rng())
    assert route == Route("example.org", ("example.org",), implicit=True)


def test_mx_records_give_an_ordered_route() -> None:
    records = [MxHost(20, "mx2.example.org."), MxHost(10, "mx1.example.org.")]
    route = routes_for("example.org", records, rng=rng())
    assert route == Route("example.org", ("mx1.example.org", "mx2.example.org"))


@pytest.mark.parametrize("host", [".", ""])
def test_null_mx_fails_at_once_with_5_1_10(host: str) -> None:
    result = routes_for("no-mail.example", [MxHost(0, host)], rng=rng())
    assert result == NullMx("no-mail.example")
    assert isinstance(result, NullMx)
    assert result.status == "5.1.10"
    assert result.temporary is False
    assert "null MX" in result.reason
    assert "no-mail.example" in result.reason


def test_null_mx_beside_real_records_is_ignored_with_a_note() -> None:
    records = [MxHost(0, "."), MxHost(10, "mx.example.org")]
    route = routes_for("example.org", records, rng=rng())
    assert isinstance(route, Route)
    assert route.hosts == ("mx.example.org",)
    assert any("RFC 7505" in note for note in route.ignored)


def test_root_exchange_at_another_preference_is_not_a_null_mx() -> None:
    result = routes_for("example.org", [MxHost(10, ".")], rng=rng())
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.4.4")
    assert "DNS root" in result.reason


@pytest.mark.parametrize("host", ["192.0.2.25", "192.0.2.25.", "2001:db8::25", "[192.0.2.25]"])
def test_mx_naming_only_an_ip_address_is_a_permanent_routing_error(host: str) -> None:
    result = routes_for("example.org", [MxHost(10, host)], rng=rng())
    assert isinstance(result, DnsFailure)
    assert (result.temporary, result.status) == (False, "5.4.4")
    assert "names an IP address" in result.reason
    assert "example.org" in result.reason


def test_ip_address_mx_is_skipped_when_a_named_host_remains() -> None:
    records = [MxHost(5, "192.0.2.25"), MxHost(10, "mx.example.org")]
    route = routes_for("example.org", records, rng=rng())
    assert isinstance(route, Route)
    assert route.hosts == ("mx.example.org",)
    assert route.ignored == (
        "MX 5 192.0.2.25 names an IP address; an MX must name a host (RFC 1035 §3.3.9)",
    )


@pytest.mark.parametrize("domain", ["", " ", "."])
def test_routes_need_a_domain(domain: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        routes_for(domain, None, rng=rng())


def test_address_literal_domains_are_not_routed_through_dns() -> None:
    with pytest.raises(ValueError, match="address literal"):
        routes_for("[192.0.2.1]", None, rng=rng())


# --- mx_hosts -------------------------------------------------------------------------


def test_mx_hosts_reads_dnspython_rdata() -> None:
    answer = [
        dns.rdata.from_text("IN", "MX", "10 Mx1.Example.ORG."),
        dns.rdata.from_text("IN", "CNAME", "elsewhere.example.org."),
        dns.rdata.from_text("IN", "MX", "20 mx2.example.org."),
    ]
    assert mx_hosts(answer) == [MxHost(10, "Mx1.Example.ORG"), MxHost(20, "mx2.example.org")]


def test_a_null_mx_from_dnspython_is_recognised() -> None:
    hosts = mx_hosts([dns.rdata.from_text("IN", "MX", "0 .")])
    assert hosts == [MxHost(0, ".")]
    assert isinstance(routes_for("example.org", hosts, rng=rng()), NullMx)


# --- classify_dns_error ---------------------------------------------------------------

_QUERY = dns.message.make_query("example.org", "MX")


def _bad_name(text: str) -> Exception:
    try:
        dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        return exc
    raise AssertionError(f"{text!r} parsed")


def test_nxdomain_is_permanent_5_1_2_and_names_the_domain() -> None:
    exc = dns.resolver.NXDOMAIN(qnames=[dns.name.from_text("nope.example")], responses={})
    assert classify_dns_error(exc) == DnsFailure(
        temporary=False, reason="domain does not exist: nope.example", status="5.1.2"
    )


def test_nxdomain_without_details() -> None:
    result = classify_dns_error(dns.resolver.NXDOMAIN())
    assert (result.temporary, result.status, result.reason) == (
        False,
        "5.1.2",
        "domain does not exist",
    )


def test_no_answer_is_permanent_unable_to_route() -> None:
    result = classify_dns_error(dns.resolver.NoAnswer(response=dns.message.make_response(_QUERY)))
    assert (result.temporary, result.status) == (False, "5.4.4")
    assert "example.org. IN MX" in result.reason


@pytest.mark.parametrize(
    "exc",
    [
        dns.resolver.YXDOMAIN(),
        _bad_name("a..example"),
        _bad_name("x" * 64 + ".example"),
        dns.name.NameTooLong(),
    ],
    ids=["yxdomain", "empty-label", "label-too-long", "name-too-long"],
)
def test_impossible_names_are_permanent(exc: Exception) -> None:
    result = classify_dns_error(exc)
    assert (result.temporary, result.status) == (False, "5.1.2")
    assert result.reason.startswith("not a valid domain name")


def test_servfail_from_every_server_is_temporary() -> None:
    exc = dns.resolver.NoNameservers(request=_QUERY, errors=[("192.0.2.53", False, 53, "SERVFAIL")])
    result = classify_dns_error(exc)
    assert (result.temporary, result.status) == (True, "4.4.3")
    assert "SERVFAIL" in result.reason


@pytest.mark.parametrize(
    "exc",
    [dns.resolver.LifetimeTimeout(timeout=5.0, errors=[]), dns.exception.Timeout()],
    ids=["lifetime", "timeout"],
)
def test_timeouts_are_temporary(exc: Exception) -> None:
    result = classify_dns_error(exc)
    assert (result.temporary, result.status) == (True, "4.4.3")
    assert result.reason.startswith("DNS lookup timed out")


@pytest.mark.parametrize(
    "exc",
    [dns.resolver.NoRootSOA(), ConnectionRefusedError("resolver refused")],
    ids=["other-dns-error", "oserror"],
)
def test_other_lookup_failures_are_temporary(exc: Exception) -> None:
    result = classify_dns_error(exc)
    assert (result.temporary, result.status) == (True, "4.4.3")
    assert type(exc).__name__ in result.reason


def test_a_bug_is_not_classified_as_a_dns_failure() -> None:
    with pytest.raises(TypeError, match="not a DNS error"):
        classify_dns_error(KeyError("oops"))


# --- parse_nameserver -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 192.0.2.53:53 ", ("192.0.2.53", 53)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[::1]:53", ("::1", 53)),
        ("[2001:DB8:0::53]:5300", ("2001:db8::53", 5300)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_nameservers(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("dns.example.net", "'dns.example.net' is not an IP address"),
        ("dns.example.net:53", "'dns.example.net' is not an IP address"),
        ("127.0.0.1:", "port '' is not a number"),
        ("127.0.0.1:0", "port '0' is not a number from 1 to 65535"),
        ("127.0.0.1:65536", "port '65536'"),
        ("127.0.0.1:dns", "port 'dns'"),
        ("127.0.0.1:-53", "port '-53'"),
        ("127.0.0.1:٥٣", "port '٥٣'"),
        ("[::1", "no matching ']'"),
        ("[::1]53", "only ':port' may follow ']'"),
        ("[::1]:", "port ''"),
        ("[127.0.0.1]:53", "brackets are only for IPv6"),
        ("[dns.example.net]", "is not an IP address"),
        ("256.0.0.1", "is not an IP address"),
    ],
)
def test_bad_nameservers_say_why(text: str, why: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_nameserver(text)
    message = str(info.value)
    assert why in message
    assert message.startswith(f"invalid nameserver {text!r}: ")
    assert "[::1]:53" in message  # every message shows a valid example


# --- the bound on a route's hosts -------------------------------------------------------


def test_a_route_keeps_the_ten_most_preferred_of_300_hosts() -> None:
    """Whoever runs the domain's DNS chose the list: each host is lookups and connections."""
    records = [MxHost(1000 - i, f"mx{i}.example") for i in range(300)]  # best ones last
    random.Random(3).shuffle(records)
    route = routes_for("example", records, rng=rng())
    assert isinstance(route, Route)
    assert MAX_MX_HOSTS == 10
    assert route.hosts == tuple(f"mx{i}.example" for i in range(299, 289, -1))
    assert route.ignored == ("290 least preferred MX hosts left out: a route keeps at most 10",)


def test_the_cut_through_an_equal_preference_group_keeps_the_better_group_whole() -> None:
    records = [MxHost(20, f"b{i}.example") for i in range(50)]
    records += [MxHost(10, f"a{i}.example") for i in range(4)]
    route = routes_for("example", records, rng=rng())
    assert isinstance(route, Route)
    assert len(route.hosts) == 10
    assert set(route.hosts[:4]) == {f"a{i}.example" for i in range(4)}
    assert all(host.startswith("b") for host in route.hosts[4:])
