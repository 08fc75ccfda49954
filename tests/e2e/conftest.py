"""A real ``postlane serve`` delivering over real (virtual) links to receivers in namespaces.

Set-up per test module:

- two network namespaces, each joined to the root namespace by a veth pair
  (:mod:`e2e.netns`): ``mx1`` at 198.18.1.2 offers STARTTLS (a self-signed
  certificate for ``mx1.e2e.test``), ``mx2`` at 198.18.2.2 offers no TLS;
  each runs ``receiver.py`` on port 25, recording what it accepts; a third,
  ``mx3`` at 198.18.3.2, runs Postfix's ``smtp-sink`` on port 25 (when
  Postfix is installed; the README's test command installs it);
- the test DNS server (``tests/dnsserver.py``) on 127.0.0.1 with MX and A
  records pointing the test domains at those addresses, a null MX and a
  SERVFAIL name;
- ``postlane serve --role smtp --role delivery`` in the root namespace, with
  ``[delivery] nameservers`` naming that DNS server and the default
  ``mx_port`` 25, so delivery takes the production path (MX lookup, A lookup,
  TCP to port 25 of a non-loopback address, STARTTLS).

Everything is removed at the end of the module, also when a test or the set-up
fails.
"""

from __future__ import annotations

import datetime as dt
import itertools
import signal
from collections.abc import Generator, Iterator
from pathlib import Path

import pluggy
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dnsserver import DnsServer
from e2e.netns import SMTP_SINK, Mx, namespaces_unavailable, unavailable
from integration.harness import PostlaneServer, ServerConfig

MX1_NAME = "mx1.e2e.test"
MX2_NAME = "mx2.e2e.test"
MX3_NAME = "mx3.e2e.test"  # Postfix's smtp-sink
SINK_DOMAIN = "sink.test"
#: Recipient domains whose MX is mx1 (STARTTLS) and mx2 (plaintext only).
#: The crash test spreads its batch over three domains: the shipped traffic-shaping
#: defaults let a burst of only 10 messages go to one domain at once.
CRASH_DOMAINS = ("crash1.test", "crash2.test", "crash3.test")
MX1_DOMAINS = ("tls.test", "bounce.test", "retry.test", "prio.test", "sched.test", *CRASH_DOMAINS)
MX2_DOMAINS = ("plain.test",)
NULL_MX_DOMAIN = "nullmx.test"
SERVFAIL_DOMAIN = "broken.test"
LEASE_SECONDS = 10
LEASE_BATCH = 10


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


_instances = itertools.count(1)


@pytest.fixture(scope="module")
def mxs(
    module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Mx]]:
    """``{"mx1": Mx (STARTTLS), "mx2": Mx (no TLS)}``, running.

    Fresh for each database the module runs on (hence ``module_database_url``),
    so receivers never hold another run's mail or attempt counts.
    """
    reason = unavailable() or namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("mx")
    cert = _self_signed(base, MX1_NAME)
    instance = next(_instances)
    started: list[Mx] = []
    try:
        mx1 = Mx("mx1", 1, base / "mx1", cert=cert, instance=instance)
        started.append(mx1)
        mx1.start()
        mx2 = Mx("mx2", 2, base / "mx2", cert=None, instance=instance)
        started.append(mx2)
        mx2.start()
        found = {"mx1": mx1, "mx2": mx2}
        if Path(SMTP_SINK).exists():
            mx3 = Mx("mx3", 3, base / "mx3", cert=None, instance=instance, sink=True)
            started.append(mx3)
            found["mx3"] = mx3.start()
        yield found
    finally:
        for mx in started:
            mx.close()


@pytest.fixture(scope="module")
def dns(mxs: dict[str, Mx]) -> Iterator[DnsServer]:
    records: dict[tuple[str, str], list[str]] = {
        (MX1_NAME, "A"): [mxs["mx1"].ip],
        (MX2_NAME, "A"): [mxs["mx2"].ip],
        (NULL_MX_DOMAIN, "MX"): ["0 ."],
    }
    for domain in MX1_DOMAINS:
        records[(domain, "MX")] = [f"10 {MX1_NAME}"]
    for domain in MX2_DOMAINS:
        records[(domain, "MX")] = [f"10 {MX2_NAME}"]
    if "mx3" in mxs:
        records[(MX3_NAME, "A")] = [mxs["mx3"].ip]
        records[(SINK_DOMAIN, "MX")] = [f"10 {MX3_NAME}"]
    with DnsServer(records, servfail={SERVFAIL_DOMAIN}) as server:
        yield server


@pytest.fixture(scope="module")
def server(
    module_database_url: str,
    dns: DnsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PostlaneServer]:
    config = ServerConfig(
        roles=("smtp", "delivery"),
        extra_toml=(
            f'\n[delivery]\nnameservers = ["{dns.nameserver}"]\n'
            "allow_internal_mx = true\n"  # the namespaces' addresses are private
            f"poll_interval = 0.1\nlease_seconds = {LEASE_SECONDS}\n"
            f"lease_batch = {LEASE_BATCH}\n"
        ),
    )
    instance = PostlaneServer(tmp_path_factory.mktemp("postlane"), module_database_url, config)
    try:
        instance.cli("db", "upgrade")
        instance.add_account("acme", "acme.com")
        instance.add_user("acme", "app1")
        instance.start()
        yield instance
        if instance.running:
            code, _ = instance.stop(signal.SIGTERM)
            assert code == 0, instance.describe()
    finally:
        if instance.running:
            instance.kill()
        instance.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """A failed test's report shows what its server printed and what the receivers logged."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    instance = funcargs.get("server")
    if isinstance(instance, PostlaneServer):
        report.sections.append(("postlane serve", instance.describe()))
    for name, mx in (funcargs.get("mxs") or {}).items():
        report.sections.append((f"receiver {name}", mx.log()[-4000:]))
