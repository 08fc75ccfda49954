from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from postlane import crypto
from postlane.errors import ConfigError, SecretError


def test_master_key_created_once_private(tmp_path: Path) -> None:
    first = crypto.load_or_create_master_key(None, tmp_path / "var")
    path = tmp_path / "var" / crypto.SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert crypto.load_or_create_master_key(None, tmp_path / "var") == first
    assert crypto.load_or_create_master_key("x" * 32, tmp_path / "var") == b"x" * 32


def test_master_key_file_appears_whole_and_its_directory_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    key = crypto.load_or_create_master_key(None, data_dir)
    assert len(key) == 44
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert [p.name for p in data_dir.iterdir()] == [crypto.SECRET_FILE]  # no temporary left


@pytest.mark.parametrize("content", [b"", b"\n", b"short"])
def test_an_empty_or_cut_master_key_file_is_refused_not_used(
    tmp_path: Path, content: bytes
) -> None:
    # A crash between creating and writing it left an empty file, which was
    # then the master key: every encrypted secret readable by anyone.
    (tmp_path / crypto.SECRET_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match="restore it from a backup"):
        crypto.load_or_create_master_key(None, tmp_path)


def test_a_second_process_uses_the_first_ones_whole_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It read the file between the first one's create and write: an empty key.
    first = b"k" * 44
    real_link = os.link

    def link_after_the_other(src: str, dst: Path) -> None:
        Path(dst).write_bytes(first + b"\n")  # the other process linked its key first
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_other)
    assert crypto.load_or_create_master_key(None, tmp_path) == first


def test_secret_box_round_trip_and_wrong_key() -> None:
    box = crypto.SecretBox(b"a" * 32)
    token = box.encrypt(b"private key")
    assert b"private key" not in token
    assert box.decrypt(token) == b"private key"
    with pytest.raises(SecretError, match="cannot be decrypted"):
        crypto.SecretBox(b"b" * 32).decrypt(token)


def test_derived_keys_differ_by_purpose() -> None:
    assert crypto.derive_key(b"m" * 32, "a") != crypto.derive_key(b"m" * 32, "b")


def test_password_hash_is_argon2_and_verifies() -> None:
    password = crypto.generate_password()
    assert len(password) == 24
    hashed = crypto.hash_password(password)
    assert hashed.startswith("$argon2id$")
    assert password not in hashed
    assert crypto.verify_password(hashed, password)
    assert not crypto.verify_password(hashed, password + "x")
    assert not crypto.verify_password("not a hash", password)


def test_a_generated_password_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """swaks read such a password as an option ("Unknown option"): one in 64 used to."""
    drawn = iter(["-LGBeu14zOEjEMBiLEMH6b1E", "LGBeu14zOEjEMBiLEMH6b1E-"])
    monkeypatch.setattr(crypto.secrets, "token_urlsafe", lambda n: next(drawn))
    assert crypto.generate_password() == "LGBeu14zOEjEMBiLEMH6b1E-"
