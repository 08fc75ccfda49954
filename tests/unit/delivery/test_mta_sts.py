"""MTA-STS: the policy grammar, MX matching, enforcement, and discovery with its cache.

The pure parts are tested directly. Discovery runs against the test DNS
server (``tests/dnsserver.py``) and a threaded HTTPS server on 127.0.0.1
whose certificate, for ``mta-sts.example.test`` and ``mta-sts.second.test``,
is signed by a CA made here; the client trusts only that CA. A fake clock,
shared by the resolver and the cache, stands in for days passing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dnsserver import DnsServer
from postlane.delivery.mta_sts import (
    FETCH_CONCURRENCY,
    MAX_MAX_AGE,
    MAX_MX_PATTERNS,
    HttpsPolicyFetcher,
    MtaStsCache,
    Policy,
    PolicyFetchBusy,
    PolicyFetchError,
    StsResult,
    enforce,
    mx_matches,
    parse_policy,
    parse_sts_record,
    sts_record_id,
)
from postlane.delivery.resolver import Resolver
from postlane.errors import InvalidInput

T = TypeVar("T")

POLICY = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.example.net\r\n"
    "max_age: 86400\r\n"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- parse_policy ---------------------------------------------------------------------


def test_a_valid_policy() -> None:
    assert parse_policy(POLICY) == Policy(
        version="STSv1", mode="enforce", mx=("mx1.example.test", "*.example.net"), max_age=86400
    )


def test_lf_line_ends_any_field_order_and_no_final_newline() -> None:
    text = "mx: MX1.Example.TEST\nmax_age: 604800\nmode: testing\nversion: STSv1"
    assert parse_policy(text) == Policy("STSv1", "testing", ("mx1.example.test",), 604800)


def test_unknown_fields_are_ignored_and_repeated_ones_keep_the_first() -> None:
    text = (
        "version: STSv1\nmode: testing\nmode: enforce\nmx: a.example.test\n"
        "mx: a.example.test\nmax_age: 10\nmax_age: 20\nx-comment: anything; = goes, here\n\n"
        "report_to:\tsomeone@example.test  \n"
    )
    assert parse_policy(text) == Policy("STSv1", "testing", ("a.example.test",), 10)


def test_mode_none_needs_no_mx() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
    assert policy == Policy("STSv1", "none", (), 86400)


def test_max_age_above_a_year_is_clamped() -> None:
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n")
    assert policy.max_age == MAX_MAX_AGE


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("mode: enforce\nmx: a.test\nmax_age: 1\n", "'version' field is missing"),
        ("version: STSv1\nmx: a.test\nmax_age: 1\n", "'mode' field is missing"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "'max_age' field is missing"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "needs at least one 'mx'"),
        ("version: STSv1\nmode: testing\nmax_age: 1\n", "needs at least one 'mx'"),
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "'STSv2' is not supported"),
        ("version: stsv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "not supported"),
        ("version: STSv1\nmode: report\nmx: a.test\nmax_age: 1\n", "mode 'report'"),
        ("version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 1\n", "mode 'Enforce'"),
        ("Version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "'version' field is missing"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age '-1'"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1e5\n", "max_age '1e5'"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n", "1 to 10 digits"),
        ("version: STSv1\nmode enforce\nmx: a.test\nmax_age: 1\n", "line 2"),
        ("version: STSv1\n mode: enforce\nmx: a.test\nmax_age: 1\n", "is not 'key: value'"),
        ("version : STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n", "is not 'key: value'"),
        ("version: STSv1\nmode: enforce\nmx:\nmax_age: 1\n", "'mx' has no value"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\x0b\n", "control character"),
        ("version: STSv1\nmode: enforce\nmx: a.test\rmax_age: 1\n", "control character"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n" + "k" * 33 + ": v\nmax_age: 1", "line 4"),
        ("version: STSv1\nmode: enforce\nmx: *.*.example.test\nmax_age: 1\n", "mx '*.*"),
        ("version: STSv1\nmode: enforce\nmx: mail.*.example.test\nmax_age: 1\n", "mx 'mail"),
        ("version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n", "mx '*'"),
        ("version: STSv1\nmode: enforce\nmx: mail.example.test.\nmax_age: 1\n", "mx 'mail"),
        ("version: STSv1\nmode: enforce\nmx: -mail.example.test\nmax_age: 1\n", "mx '-mail"),
        ("version: STSv1\nmode: enforce\nmx: mail_1.example.test\nmax_age: 1\n", "mx 'mail_1"),
        ("version: STSv1\nmode: enforce\nmx: a b.test\nmax_age: 1\n", "mx 'a b.test'"),
        ("version: STSv1\nmode: enforce\nmx: " + "a" * 64 + ".test\nmax_age: 1\n", "mx 'aaa"),
        ("", "'version' field is missing"),
        ("<html><body>Not found</body></html>", "is not 'key: value'"),
    ],
)
def test_malformed_policies_are_refused(text: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match="MTA-STS policy") as info:
        parse_policy(text)
    assert problem in str(info.value)


# --- the TXT record ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sts_id"),
    [
        ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
        ("v=STSv1;id=abc", "abc"),
        ("v=STSv1 ;\tid=abc ; ext=x:y/z ;", "abc"),
        ("v=STSv1; ext.a-b_c=1; id=" + "9" * 32, "9" * 32),
        ("v=STSv1; id=first; id=second", "first"),
    ],
)
def test_sts_records(text: str, sts_id: str) -> None:
    assert parse_sts_record(text) == sts_id


@pytest.mark.parametrize(
    "text",
    [
        "v=STSv1;",
        "v=STSv1; ext=1",
        "v=STSv2; id=1",
        " v=STSv1; id=1",
        "v=STSv1; id=" + "9" * 33,
        "v=STSv1; id=2024-01-01",
        "v=STSv1; id=",
        "v=STSv1; id",
        "v=STSv1; id=1;; ",
        "v=STSv1; id=1; ext=a b",
        "v=STSv1; id=1; ext=a=b",
        "v=STSv1; id = 1",
        "id=1; v=STSv1",
    ],
)
def test_malformed_sts_records(text: str) -> None:
    with pytest.raises(InvalidInput, match="MTA-STS record"):
        parse_sts_record(text)


def test_the_sts_record_among_other_txt_records() -> None:
    assert sts_record_id([]) is None
    assert sts_record_id(["v=spf1 -all", "v=STSv10; id=1", "hello"]) is None
    assert sts_record_id(["v=spf1 -all", "v=STSv1; id=abc"]) == "abc"
    with pytest.raises(InvalidInput, match="2 MTA-STS records"):
        sts_record_id(["v=STSv1; id=a", "v=STSv1; id=b"])
    with pytest.raises(InvalidInput, match="no id"):
        sts_record_id(["v=STSv1; ext=1"])


# --- mx_matches and enforce -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "matches"),
    [
        ("mx1.example.test", True),
        ("MX1.Example.Test.", True),
        ("mx2.example.test", False),
        ("example.test", False),
        ("a.example.net", True),
        ("A.EXAMPLE.NET", True),
        ("example.net", False),
        ("a.b.example.net", False),
        ("aexample.net", False),
        ("mail.evilexample.net", False),
        ("example.net.evil.test", False),
        ("", False),
    ],
)
def test_mx_matching(host: str, matches: bool) -> None:
    policy = parse_policy(POLICY)
    assert mx_matches(policy, host) is matches


def test_enforce_mode_keeps_only_matching_hosts_and_requires_tls() -> None:
    policy = parse_policy(POLICY)
    result = enforce(policy, ["evil.test", "mx1.example.test", "b.example.net"])
    assert result == StsResult(
        mode="enforce",
        hosts=("mx1.example.test", "b.example.net"),
        violations=("evil.test",),
        require_tls=True,
    )
    assert result.check_tls
    assert result.reason is None


def test_enforce_mode_with_no_matching_host_says_why() -> None:
    result = enforce(parse_policy(POLICY), ["evil.test"])
    assert result.hosts == ()
    assert result.require_tls
    assert result.reason is not None
    assert "evil.test" in result.reason


def test_testing_mode_keeps_every_host_and_notes_violations() -> None:
    policy = parse_policy(POLICY.replace("enforce", "testing"))
    result = enforce(policy, ["evil.test", "mx1.example.test"])
    assert result == StsResult(
        mode="testing", hosts=("evil.test", "mx1.example.test"), violations=("evil.test",)
    )
    assert not result.require_tls
    assert result.check_tls
    assert result.reason is None


def test_mode_none_and_no_policy_leave_delivery_alone() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 1\n")
    for given in (policy, None):
        result = enforce(given, ["evil.test", "mx1.example.test"])
        assert result.hosts == ("evil.test", "mx1.example.test")
        assert (result.require_tls, result.check_tls, result.violations) == (False, False, ())
    assert enforce(policy, []).mode == "none"
    assert enforce(None, []).mode is None


# --- a local HTTPS policy host ----------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = POLICY.encode()
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class PolicyHost:
    """A threaded HTTPS server answering for several ``mta-sts.<domain>`` hosts.

    ``replies`` maps the Host header (without port) to the reply; ``requests``
    records ``(host, path)`` of every request.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.replies: dict[str, Reply] = {}
        self.requests: list[tuple[str, str]] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = (self.headers.get("Host") or "").rsplit(":", 1)[0]
                host.requests.append((name, self.path))
                reply = host.replies.get(name, Reply(404, b"not found"))
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def fetches(self, host: str) -> int:
        return sum(1 for name, _ in self.requests if name == host)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@dataclass(frozen=True)
class Pki:
    ca_pem: str
    cert: Path
    key: Path


def make_pki(directory: Path, names: list[str]) -> Pki:
    """A test CA and a server certificate for ``names`` signed by it (EC P-256)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Postlane Test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(ca.public_bytes(serialization.Encoding.PEM).decode(), cert_path, key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["mta-sts.example.test", "mta-sts.second.test"])


@pytest.fixture(scope="module")
def policy_host(pki: Pki) -> Iterator[PolicyHost]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    host = PolicyHost(context)
    yield host
    host.close()


@pytest.fixture
def web(policy_host: PolicyHost) -> PolicyHost:
    """The module's policy host, its replies and request log reset for this test."""
    policy_host.replies = {
        "mta-sts.example.test": Reply(),
        "mta-sts.wrongname.test": Reply(),
    }
    policy_host.requests.clear()
    return policy_host


@pytest.fixture
def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=pki.ca_pem)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    records = {
        ("_mta-sts.example.test", "TXT"): ["v=STSv1; id=1"],
        ("mta-sts.example.test", "A"): ["127.0.0.1"],
        ("_mta-sts.wrongname.test", "TXT"): ["v=STSv1; id=1"],
        ("mta-sts.wrongname.test", "A"): ["127.0.0.1"],
        ("plain.test", "TXT"): ["v=spf1 -all"],
    }
    with DnsServer(records) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dns: DnsServer, clock: FakeClock) -> Resolver:
    return Resolver([dns.nameserver], timeout=1.0, clock=clock, rng=random.Random(1))


@pytest.fixture
def cache(
    resolver: Resolver, web: PolicyHost, client_context: ssl.SSLContext, clock: FakeClock
) -> MtaStsCache:
    return MtaStsCache(
        resolver,
        https_context=client_context,
        https_port=web.port,
        https_internal=True,  # the test's policy server listens on loopback
        timeout=2.0,
        clock=clock,
    )


# --- fetching over HTTPS ----------------------------------------------------------------


def test_the_policy_is_fetched_over_https(cache: MtaStsCache, web: PolicyHost) -> None:
    assert run(cache.policy("example.test")) == parse_policy(POLICY)
    assert web.requests == [("mta-sts.example.test", "/.well-known/mta-sts.txt")]


def test_a_policy_is_cached_by_id(
    cache: MtaStsCache, web: PolicyHost, dns: DnsServer, clock: FakeClock
) -> None:
    first = run(cache.policy("example.test"))
    clock.advance(3600)  # the TXT record is asked again; its id is unchanged
    assert run(cache.policy("Example.Test.")) == first
    assert web.fetches("mta-sts.example.test") == 1
    assert dns.count("_mta-sts.example.test", "TXT") == 2


def test_a_new_id_fetches_the_new_policy(
    cache: MtaStsCache, web: PolicyHost, dns: DnsServer, clock: FakeClock
) -> None:
    assert run(cache.policy("example.test")) == parse_policy(POLICY)
    web.replies["mta-sts.example.test"] = Reply(body=POLICY.replace("enforce", "testing").encode())
    run(cache.policy("example.test"))
    assert web.fetches("mta-sts.example.test") == 1  # same id: not fetched
    dns.set("_mta-sts.example.test", "TXT", ["v=STSv1; id=2"])
    clock.advance(301)  # the cached TXT record expires
    policy = run(cache.policy("example.test"))
    assert policy is not None
    assert policy.mode == "testing"
    assert web.fetches("mta-sts.example.test") == 2


def test_a_policy_survives_fetch_failures_until_max_age(
    cache: MtaStsCache, web: PolicyHost, dns: DnsServer, clock: FakeClock
) -> None:
    good = run(cache.policy("example.test"))
    assert good is not None
    web.replies["mta-sts.example.test"] = Reply(500, b"oops")
    dns.set("_mta-sts.example.test", "TXT", ["v=STSv1; id=2"])
    clock.advance(301)
    assert run(cache.policy("example.test")) == good  # new id, fetch failed: keep the old
    assert web.fetches("mta-sts.example.test") == 2
    clock.advance(86400 - 301)  # max_age since the first fetch
    assert run(cache.policy("example.test")) is None


def test_a_failed_fetch_is_not_retried_for_five_minutes(
    cache: MtaStsCache, web: PolicyHost, clock: FakeClock
) -> None:
    web.replies["mta-sts.example.test"] = Reply(503, b"busy")
    assert run(cache.policy("example.test")) is None
    clock.advance(299)
    assert run(cache.policy("example.test")) is None
    assert web.fetches("mta-sts.example.test") == 1
    web.replies["mta-sts.example.test"] = Reply()
    clock.advance(2)
    assert run(cache.policy("example.test")) == parse_policy(POLICY)
    assert web.fetches("mta-sts.example.test") == 2


def test_a_vanished_or_unreadable_record_keeps_the_cached_policy(
    cache: MtaStsCache, dns: DnsServer, clock: FakeClock
) -> None:
    good = run(cache.policy("example.test"))
    assert good is not None
    dns.delete("_mta-sts.example.test", "TXT")
    clock.advance(301)
    assert run(cache.policy("example.test")) == good
    dns.servfail.add("_mta-sts.example.test")
    assert run(cache.policy("example.test")) == good
    dns.servfail.clear()
    dns.set("_mta-sts.example.test", "TXT", ["v=STSv1; id=1", "v=STSv1; id=2"])
    clock.advance(301)
    assert run(cache.policy("example.test")) == good


def test_a_new_policy_in_mode_none_retires_the_old_one(
    cache: MtaStsCache, web: PolicyHost, dns: DnsServer, clock: FakeClock
) -> None:
    run(cache.policy("example.test"))
    web.replies["mta-sts.example.test"] = Reply(body=b"version: STSv1\nmode: none\nmax_age: 60\n")
    dns.set("_mta-sts.example.test", "TXT", ["v=STSv1; id=2"])
    clock.advance(301)
    policy = run(cache.policy("example.test"))
    assert policy is not None
    assert policy.mode == "none"
    assert enforce(policy, ["anything.test"]).hosts == ("anything.test",)


def test_no_record_means_no_policy_and_no_fetch(cache: MtaStsCache, web: PolicyHost) -> None:
    assert run(cache.policy("plain.test")) is None
    assert run(cache.policy("nowhere.test")) is None
    assert web.requests == []


def test_a_wrong_certificate_name_means_no_policy(
    cache: MtaStsCache, web: PolicyHost, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "postlane.delivery.mta_sts"):
        assert run(cache.policy("wrongname.test")) is None
    assert web.requests == []  # refused during the handshake, before any request
    assert "certificate of mta-sts.wrongname.test not valid" in caplog.text


def test_an_untrusted_ca_means_no_policy(
    resolver: Resolver, web: PolicyHost, caplog: pytest.LogCaptureFixture
) -> None:
    cache = MtaStsCache(  # the system's roots
        resolver, https_port=web.port, https_internal=True, timeout=2.0
    )
    with caplog.at_level(logging.WARNING, "postlane.delivery.mta_sts"):
        assert run(cache.policy("example.test")) is None
    assert "certificate" in caplog.text
    assert web.requests == []


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (Reply(301, b"", headers={"Location": "https://mta-sts.second.test/"}), "HTTP 301"),
        (Reply(404, b"not here"), "HTTP 404"),
        (Reply(content_type="text/html"), "not text/plain"),
        (Reply(body=b"version: STSv1\n" + b"x" * 65536), "larger than 65536 bytes"),
        (Reply(body=b"version: STSv1\nmode: enforce\nmx: \xff\n"), "not UTF-8"),
        (Reply(body=b"version: STSv1\nmode: enforce\n"), "'max_age' field is missing"),
    ],
)
def test_unusable_replies_mean_no_policy(
    cache: MtaStsCache,
    web: PolicyHost,
    reply: Reply,
    problem: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    web.replies["mta-sts.example.test"] = reply
    with caplog.at_level(logging.WARNING, "postlane.delivery.mta_sts"):
        assert run(cache.policy("example.test")) is None
    assert problem in caplog.text
    assert web.requests == [("mta-sts.example.test", "/.well-known/mta-sts.txt")]


def test_a_policy_of_exactly_64_kib_is_accepted(cache: MtaStsCache, web: PolicyHost) -> None:
    head = POLICY.encode() + b"pad: "
    body = head + b"x" * (65536 - len(head) - 1) + b"\n"
    assert len(body) == 65536
    web.replies["mta-sts.example.test"] = Reply(body=body)
    assert run(cache.policy("example.test")) == parse_policy(POLICY)


def test_the_next_address_is_tried_when_one_refuses(
    resolver: Resolver, dns: DnsServer, web: PolicyHost, client_context: ssl.SSLContext
) -> None:
    dns.set("mta-sts.example.test", "A", ["127.0.0.2", "127.0.0.1"])  # .2: nothing listens
    fetch = HttpsPolicyFetcher(
        resolver, context=client_context, port=web.port, timeout=2.0, internal=True
    )
    assert parse_policy(run(fetch("example.test"))) == parse_policy(POLICY)


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["10.0.0.8", "169.254.169.254"], ["192.168.1.1", "127.0.0.1"], ["::1"]],
)
def test_a_policy_host_on_internal_addresses_is_not_fetched_by_default(
    resolver: Resolver,
    dns: DnsServer,
    web: PolicyHost,
    client_context: ssl.SSLContext,
    addresses: list[str],
) -> None:
    # The recipient domain names the host: anyone sending there could make
    # Postlane connect into the operator's network (the policy server of this
    # test listens on 127.0.0.1 and answered before).
    kind = "AAAA" if ":" in addresses[0] else "A"
    dns.set("mta-sts.example.test", kind, addresses)
    fetch = HttpsPolicyFetcher(resolver, context=client_context, port=web.port, timeout=2.0)
    with pytest.raises(PolicyFetchError, match="resolves only to addresses that are not public"):
        run(fetch("example.test"))
    assert web.requests == []  # nothing was asked of it


def test_a_policy_host_without_address_is_a_fetch_error(
    resolver: Resolver, client_context: ssl.SSLContext, web: PolicyHost
) -> None:
    fetch = HttpsPolicyFetcher(resolver, context=client_context, port=web.port, internal=True)
    with pytest.raises(PolicyFetchError, match=r"mta-sts\.plain\.test"):
        run(fetch("plain.test"))


def test_a_silent_policy_host_times_out(resolver: Resolver, client_context: ssl.SSLContext) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        fetch = HttpsPolicyFetcher(
            resolver,
            context=client_context,
            port=silent.getsockname()[1],
            timeout=0.3,
            internal=True,
        )
        started = time.monotonic()
        with pytest.raises(PolicyFetchError, match="timed out"):
            run(fetch("example.test"))
        assert time.monotonic() - started < 2


def test_a_context_that_does_not_verify_is_refused(resolver: Resolver) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    with pytest.raises(ValueError, match="verify"):
        HttpsPolicyFetcher(resolver, context=context)
    with pytest.raises(ValueError, match="not both"):
        MtaStsCache(resolver, fetch=lambda _: asyncio.sleep(0, ""), https_port=8443)


# --- the cache with an injected fetch -----------------------------------------------------


def test_concurrent_deliveries_share_one_fetch(resolver: Resolver) -> None:
    calls: list[str] = []

    async def fetch(domain: str) -> str:
        calls.append(domain)
        await asyncio.sleep(0.05)
        return POLICY

    async def scenario() -> list[Policy | None]:
        cache = MtaStsCache(resolver, fetch=fetch)
        return await asyncio.gather(*(cache.policy("example.test") for _ in range(5)))

    results = run(scenario())
    assert calls == ["example.test"]
    assert results == [parse_policy(POLICY)] * 5


def test_max_age_zero_is_used_once_and_not_kept(resolver: Resolver, clock: FakeClock) -> None:
    calls: list[str] = []

    async def fetch(domain: str) -> str:
        calls.append(domain)
        return POLICY.replace("86400", "0")

    cache = MtaStsCache(resolver, fetch=fetch, clock=clock)
    assert run(cache.policy("example.test")) is not None
    assert run(cache.policy("example.test")) is not None
    assert len(calls) == 2


def test_a_fetch_error_from_an_injected_fetch(resolver: Resolver, clock: FakeClock) -> None:
    async def fetch(domain: str) -> str:
        raise PolicyFetchError(f"no route to mta-sts.{domain}")

    cache = MtaStsCache(resolver, fetch=fetch, clock=clock)
    assert run(cache.policy("example.test")) is None


def test_idn_domains_use_a_labels(dns: DnsServer, resolver: Resolver) -> None:
    dns.set("_mta-sts.xn--bcher-kva.test", "TXT", ["v=STSv1; id=7"])
    asked: list[str] = []

    async def fetch(domain: str) -> str:
        asked.append(domain)
        return POLICY

    cache = MtaStsCache(resolver, fetch=fetch)
    assert run(cache.policy("Bücher.test")) == parse_policy(POLICY)
    assert asked == ["xn--bcher-kva.test"]


# --- the bound on the cache ---------------------------------------------------------------


class Policies:
    """An injected fetch serving each domain's policy in its mode; a blocked domain fails."""

    def __init__(self, dns: DnsServer) -> None:
        self.dns = dns
        self.policies: dict[str, str] = {}
        self.blocked: set[str] = set()
        self.calls: list[str] = []

    def publish(self, domain: str, mode: str = "enforce", max_age: int = 86400) -> str:
        self.dns.set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=1"])
        self.policies[domain] = POLICY.replace("enforce", mode).replace("86400", str(max_age))
        return domain

    async def __call__(self, domain: str) -> str:
        self.calls.append(domain)
        if domain in self.blocked or domain not in self.policies:
            raise PolicyFetchError(f"mta-sts.{domain} blocked")
        return self.policies[domain]


def cached(cache: MtaStsCache, policies: Policies, domains: list[str]) -> list[str]:
    """Which of ``domains`` still have their policy when every fetch is blocked."""
    policies.blocked.update(domains)
    return [domain for domain in domains if run(cache.policy(domain)) is not None]


def test_the_cache_stays_at_its_bound(dns: DnsServer, resolver: Resolver, clock: FakeClock) -> None:
    policies = Policies(dns)
    domains = [policies.publish(f"d{i}.test") for i in range(6)]
    cache = MtaStsCache(resolver, fetch=policies, clock=clock, max_domains=3)
    assert cache.size == 0
    assert cache  # still true: the worker takes "mta_sts or MtaStsCache(...)"
    for domain in domains:
        assert run(cache.policy(domain)) is not None
        assert cache.size <= 3
    assert cache.size == 3
    assert cached(cache, policies, domains) == domains[3:]  # the least recently used went
    assert cache.size == 3


def test_failed_fetches_are_evicted_before_any_policy(
    dns: DnsServer, resolver: Resolver, clock: FakeClock
) -> None:
    policies = Policies(dns)
    kept = [policies.publish("strict.test"), policies.publish("lax.test", "none")]
    failing = [f"f{i}.test" for i in range(4)]
    for domain in failing:
        dns.set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=1"])
    cache = MtaStsCache(resolver, fetch=policies, clock=clock, max_domains=2)
    for domain in [*kept, *failing]:
        run(cache.policy(domain))
    assert cache.size == 2
    assert run(cache.policy("f0.test")) is None
    assert policies.calls.count("f0.test") == 2  # its failure was forgotten, not a policy
    assert cached(cache, policies, kept) == kept


def test_an_enforce_policy_outlives_policies_that_enforce_nothing(
    dns: DnsServer, resolver: Resolver, clock: FakeClock
) -> None:
    policies = Policies(dns)
    domains = [
        policies.publish("old-enforce.test"),
        policies.publish("testing.test", "testing"),
        policies.publish("none.test", "none"),
        policies.publish("new-enforce.test"),
    ]
    cache = MtaStsCache(resolver, fetch=policies, clock=clock, max_domains=2)
    for domain in domains:
        run(cache.policy(domain))
    assert cached(cache, policies, domains) == ["old-enforce.test", "new-enforce.test"]


def test_a_used_entry_is_kept_over_an_unused_one(
    dns: DnsServer, resolver: Resolver, clock: FakeClock
) -> None:
    policies = Policies(dns)
    first, second, third = (policies.publish(f"{n}.test") for n in ("one", "two", "three"))
    cache = MtaStsCache(resolver, fetch=policies, clock=clock, max_domains=2)
    run(cache.policy(first))
    run(cache.policy(second))
    run(cache.policy(first))  # from the cache: no fetch, but now the most recent
    assert policies.calls == [first, second]
    run(cache.policy(third))
    assert cached(cache, policies, [first, second, third]) == [first, third]


def test_expired_policies_are_evicted_before_live_ones(
    dns: DnsServer, resolver: Resolver, clock: FakeClock
) -> None:
    policies = Policies(dns)
    lasting = policies.publish("lasting.test")
    brief = policies.publish("brief.test", max_age=60)
    cache = MtaStsCache(resolver, fetch=policies, clock=clock, max_domains=2)
    run(cache.policy(lasting))
    run(cache.policy(brief))
    clock.advance(61)
    run(cache.policy(policies.publish("late.test")))
    assert cached(cache, policies, [lasting, "late.test"]) == [lasting, "late.test"]


def test_the_bound_must_allow_an_entry(resolver: Resolver) -> None:
    with pytest.raises(InvalidInput, match="max_domains must be at least 1, got 0"):
        MtaStsCache(resolver, fetch=lambda _: asyncio.sleep(0, ""), max_domains=0)


# --- bounds: patterns per policy, fetches at once ------------------------------------------


def test_a_policy_keeps_its_first_100_mx_patterns() -> None:
    """RFC 8461 sets no limit; 64 KiB of patterns made enforce() block the loop for seconds."""
    lines = [f"mx: mx{i}.example.test" for i in range(5000)]
    text = "version: STSv1\nmode: enforce\nmax_age: 86400\n" + "\n".join(lines) + "\n"
    policy = parse_policy(text)
    assert len(policy.mx) == MAX_MX_PATTERNS == 100
    assert policy.mx[-1] == "mx99.example.test"
    result = enforce(policy, ["mx99.example.test", "mx100.example.test", "mx4999.example.test"])
    # a host named only by a dropped pattern is refused, not let through in the clear
    assert result.hosts == ("mx99.example.test",)
    assert result.violations == ("mx100.example.test", "mx4999.example.test")


def test_enforce_over_thousands_of_patterns_matches_exact_and_wildcard_names() -> None:
    exact = tuple(f"mx{i}.exact.test" for i in range(3000))
    wildcards = tuple(f"*.q{i}.wild.test" for i in range(3000))
    policy = Policy("STSv1", "enforce", exact + wildcards, 86400)
    hosts = [
        "mx2999.exact.test",
        "MX0.Exact.Test.",
        "mx3000.exact.test",
        "a.q2999.wild.test",
        "q2999.wild.test",
        "a.b.q2999.wild.test",
        "a.q3000.wild.test",
        "x.mx5.exact.test",
    ]
    result = enforce(policy, hosts)
    assert result.hosts == ("mx2999.exact.test", "MX0.Exact.Test.", "a.q2999.wild.test")
    assert result.violations == (
        "mx3000.exact.test",
        "q2999.wild.test",
        "a.b.q2999.wild.test",
        "a.q3000.wild.test",
        "x.mx5.exact.test",
    )


def test_policy_fetches_run_in_threads_of_their_own_a_few_at_a_time(
    resolver: Resolver, client_context: ssl.SSLContext
) -> None:
    """Silent policy hosts held asyncio's default threads, which the database calls need."""
    held: list[asyncio.StreamWriter] = []
    release = asyncio.Event()
    all_slots_taken = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, then says nothing
        if len(held) >= FETCH_CONCURRENCY:
            all_slots_taken.set()
        await release.wait()
        writer.close()

    def fetch_threads() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name == "mta-sts-fetch"]

    def join(threads: list[threading.Thread]) -> None:
        for thread in threads:
            thread.join(timeout=5)

    async def scenario() -> None:
        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        fetch = HttpsPolicyFetcher(
            resolver, context=client_context, port=port, timeout=10.0, internal=True
        )
        # more fetches than asyncio's default executor has threads (at most 32)
        tasks = [asyncio.ensure_future(fetch("example.test")) for _ in range(40)]
        try:
            async with asyncio.timeout(5):  # a guard against hanging, not a measurement
                await all_slots_taken.wait()
            await asyncio.sleep(0.3)  # time for any more to connect, had they been allowed
            assert len(held) == FETCH_CONCURRENCY
            assert len(fetch_threads()) == FETCH_CONCURRENCY
            await asyncio.to_thread(lambda: None)  # stands for the worker's database call
            assert not any(task.done() for task in tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            release.set()
            server.close()
            await server.wait_closed()
        threads = fetch_threads()
        await asyncio.to_thread(join, threads)  # cancelled fetches shut their sockets down
        assert not any(thread.is_alive() for thread in threads)

    run(scenario())


def test_a_fetch_that_found_no_free_slot_is_asked_again_at_once(
    resolver: Resolver, clock: FakeClock
) -> None:
    """No five-minute wait: the policy host did nothing wrong."""
    calls: list[str] = []

    async def fetch(domain: str) -> str:
        calls.append(domain)
        if len(calls) == 1:
            raise PolicyFetchBusy("no fetch slot free within 60 s")
        return POLICY

    cache = MtaStsCache(resolver, fetch=fetch, clock=clock)
    assert run(cache.policy("example.test")) is None
    assert cache.size == 0
    assert run(cache.policy("example.test")) == parse_policy(POLICY)
    assert calls == ["example.test", "example.test"]


def test_fetch_concurrency_must_allow_a_fetch(resolver: Resolver) -> None:
    with pytest.raises(InvalidInput, match="at least 1"):
        HttpsPolicyFetcher(resolver, concurrency=0)
