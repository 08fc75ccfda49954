from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from postlane.errors import ConfigError
from postlane.smtp import tls


def test_self_signed_made_once_for_hostname(tmp_path: Path) -> None:
    paths = tls.certificate_paths("mail.example.test", tmp_path, None, None)
    assert paths.self_signed
    assert paths.cert.is_file()
    assert paths.key.stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    first = paths.cert.read_bytes()
    again = tls.certificate_paths("mail.example.test", tmp_path, None, None)
    assert again.cert.read_bytes() == first
    context = tls.server_context(paths)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_link_planted_where_the_key_goes_is_replaced_not_followed(tmp_path: Path) -> None:
    """The key was written through a symbolic link at its path, wherever it pointed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("someone else's file\n")
    (tmp_path / "tls").mkdir()
    (tmp_path / tls.SELF_SIGNED_KEY).symlink_to(elsewhere)
    paths = tls.certificate_paths("mail.example.test", tmp_path, None, None)
    assert elsewhere.read_text() == "someone else's file\n"
    assert not paths.key.is_symlink()
    assert paths.key.stat().st_mode & 0o077 == 0
    assert b"PRIVATE KEY" in paths.key.read_bytes()
    left = sorted(p.name for p in paths.key.parent.iterdir())
    assert left == ["selfsigned.crt", "selfsigned.key"]  # no temporary files
    tls.server_context(paths)  # the pair matches


def test_configured_paths_must_exist_and_pair(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be set together"):
        tls.certificate_paths("h.example", tmp_path, tmp_path / "c.pem", None)
    with pytest.raises(ConfigError, match=r"'smtp\.tls_cert'.*does not exist"):
        tls.certificate_paths("h.example", tmp_path, tmp_path / "c.pem", tmp_path / "k.pem")


def test_reload_keeps_old_context_when_files_break(tmp_path: Path) -> None:
    paths = tls.certificate_paths("h.example", tmp_path, None, None)
    holder = tls.TlsContextHolder(paths)
    context = holder.context
    tls.write_self_signed("h.example", paths.cert, paths.key)  # renewed on disk
    assert holder.reload()
    assert holder.context is context  # the same object the listeners hold
    paths.cert.write_text("garbage")
    assert not holder.reload()
    assert holder.context is context
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        tls.server_context(paths)
