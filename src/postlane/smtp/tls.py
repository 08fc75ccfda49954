"""TLS for the SMTP listeners: the certificate, and a context that can be swapped live.

Postlane must speak TLS out of the box (port 465 is TLS from the first byte),
so with no certificate configured it makes a self-signed one for the
configured hostname once and keeps it in the data directory. Certificates
expire and get renewed by tools outside Postlane; on SIGHUP the files are read
again and new connections use them, while sessions already in TLS keep the
context they were established with.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postlane.errors import ConfigError

log = logging.getLogger("postlane.smtp.tls")

SELF_SIGNED_CERT = "tls/selfsigned.crt"
SELF_SIGNED_KEY = "tls/selfsigned.key"


@dataclass(frozen=True, slots=True)
class CertificatePaths:
    cert: Path
    key: Path
    self_signed: bool


def certificate_paths(
    hostname: str, data_dir: Path, cert: Path | None, key: Path | None
) -> CertificatePaths:
    """The configured certificate, or the self-signed one (made on first use)."""
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise ConfigError("smtp.tls_cert and smtp.tls_key must be set together")
        for what, path in (("smtp.tls_cert", cert), ("smtp.tls_key", key)):
            if not path.is_file():
                raise ConfigError(f"setting {what!r} = '{path}': file does not exist")
        return CertificatePaths(cert, key, self_signed=False)
    cert_path, key_path = data_dir / SELF_SIGNED_CERT, data_dir / SELF_SIGNED_KEY
    if not (cert_path.is_file() and key_path.is_file()):
        write_self_signed(hostname, cert_path, key_path)
        log.info("generated a self-signed certificate for %s at %s", hostname, cert_path)
    else:
        log.info("using the self-signed certificate at %s", cert_path)
    return CertificatePaths(cert_path, key_path, self_signed=True)


def write_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    """An ECDSA P-256 certificate for hostname (also in subjectAltName), valid ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        alt = x509.DNSName(hostname)
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Each file is written whole under a fresh name and renamed into place:
    # opening the final path would follow a symbolic link planted there (and
    # write the private key wherever it points), and a crash mid-write would
    # leave a truncated key that the next start took as made.
    _write_new(key_path, key_bytes)
    _write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM))


def _write_new(path: Path, data: bytes) -> None:
    """Replace ``path`` by a new 0600 file holding ``data``, flushed to disk."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def server_context(paths: CertificatePaths) -> ssl.SSLContext:
    """A server context: TLS 1.2 minimum, the certificate loaded, no client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(paths.cert, paths.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load TLS certificate {paths.cert} / {paths.key}: {exc}") from exc
    return context


class TlsContextHolder:
    """One server context for the life of the process; reload() renews its certificate.

    Listeners with implicit TLS hand the context to the event loop once, so it
    is the same object that must learn the new certificate: the files are
    first checked in a throwaway context, then loaded into the live one, which
    affects new handshakes only.
    """

    def __init__(self, paths: CertificatePaths) -> None:
        self.paths = paths
        self.context = server_context(paths)

    def reload(self) -> bool:
        """Read the certificate files again; keep the old certificate if they are broken."""
        try:
            server_context(self.paths)
            self.context.load_cert_chain(self.paths.cert, self.paths.key)
        except (ConfigError, ssl.SSLError, OSError) as exc:
            log.error("TLS reload failed, keeping the previous certificate: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", self.paths.cert)
        return True
