"""Secrets at rest: password hashes, encrypted keys, and the master key they derive from.

Passwords (SMTP users, API keys) are only ever verified, so they are stored as
Argon2 hashes. DKIM private keys and zip passwords must be used again, so they
are encrypted (Fernet: AES-CBC with an HMAC) under a key derived from the one
master secret. Each purpose gets its own HKDF-derived key, so a key leaked from
one use (say, a cache of verified credentials) says nothing about another.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from postlane.errors import ConfigError, SecretError

SECRET_FILE = "secret.key"
_hasher = PasswordHasher()


def load_or_create_master_key(configured: str | None, data_dir: Path) -> bytes:
    """The master secret: the configured one, else data_dir/secret.key (created once, mode 0600)."""
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    key = base64.urlsafe_b64encode(os.urandom(32))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def derive_key(master: bytes, purpose: str, length: int = 32) -> bytes:
    """A key for one purpose only, derived from the master secret."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose.encode())
    return hkdf.derive(master)


class SecretBox:
    """Encrypts the secrets Postlane must be able to read back (DKIM keys, zip passwords)."""

    def __init__(self, master: bytes) -> None:
        key = derive_key(master, "postlane/secret-box/v1")
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def decrypt(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken:
            raise SecretError(
                "a stored secret cannot be decrypted: "
                "was secret_key or data_dir/secret.key changed?"
            ) from None


def generate_password() -> str:
    """A strong password that survives copy and paste (URL-safe, 24 characters, ~144 bits).

    Never one that starts with ``-``: command-line clients (swaks, curl, a
    shell script's getopt) would read ``--auth-password -x...`` as an option.
    """
    while True:
        password = secrets.token_urlsafe(18)
        if not password.startswith("-"):
            return password


def hash_password(password: str) -> str:
    """The Argon2id hash that is the only thing stored of a password."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when the password matches; False for a mismatch or an unusable hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
