"""Fixtures for the outbound client against real servers on loopback.

- ``run`` runs a coroutine on a fresh event loop, once on asyncio's and once on
  uvloop's (production runs on uvloop; asyncio's is the reference behaviour,
  and their TLS layers differ).
- ``pki`` makes a test CA and certificates with ``cryptography``: one signed by
  the CA for ``mx.test.example``, one self-signed.
- ``smtp_sink`` starts Postfix's ``smtp-sink`` on a free port (skipped with the
  reason when it is not installed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]
SMTP_SINK = "/usr/sbin/smtp-sink"
MX_NAME = "mx.test.example"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(coro)

    return runner


@pytest.fixture
def run_uvloop() -> Runner[Any]:
    """For the throughput tests: the loop production uses, only."""

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
            return loop_runner.run(coro)

    return runner


# -- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    signed: ssl.SSLContext  # server context: certificate for MX_NAME signed by the CA
    self_signed: ssl.SSLContext  # server context: self-signed certificate for MX_NAME

    def client_context(self) -> ssl.SSLContext:
        """Verifies certificates and host names against the test CA only."""
        return ssl.create_default_context(cadata=self.ca_pem.decode())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
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
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = (
            builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _server_context(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> ssl.SSLContext:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Postlane Test CA", ca_key, "Postlane Test CA", ca_key, ca=True)
    mx_key = ec.generate_private_key(ec.SECP256R1())
    signed = _certificate(MX_NAME, mx_key, "Postlane Test CA", ca_key, ca=False)
    self_key = ec.generate_private_key(ec.SECP256R1())
    self_signed = _certificate(MX_NAME, self_key, MX_NAME, self_key, ca=False)
    return Pki(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        signed=_server_context(directory, "signed", signed, mx_key),
        self_signed=_server_context(directory, "self", self_signed, self_key),
    )


# -- smtp-sink -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def smtp_sink() -> Callable[..., AbstractContextManager[int]]:
    """``with smtp_sink("-p") as port:`` runs smtp-sink with those flags on a free port."""
    if shutil.which(SMTP_SINK) is None:
        pytest.skip(f"{SMTP_SINK} is not installed (Debian package postfix)")

    @contextmanager
    def start(*flags: str) -> Iterator[int]:
        port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        process = subprocess.Popen(
            [SMTP_SINK, *user, *flags, f"127.0.0.1:{port}", "100"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_for_port(port, process)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=10)
            if process.stderr is not None:
                process.stderr.close()

    return start


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode() if process.stderr else ""
            pytest.fail(f"smtp-sink exited with {process.returncode}: {error}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"smtp-sink did not listen on port {port}")
