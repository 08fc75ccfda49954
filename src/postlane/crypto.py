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
import tempfile
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from postlane.errors import ConfigError, SecretError

SECRET_FILE = "secret.key"
_MIN_KEY_BYTES = 32  # as for a configured secret_key
_hasher = PasswordHasher()


def load_or_create_master_key(configured: str | None, data_dir: Path) -> bytes:
    """The master secret: the configured one, else data_dir/secret.key (created once, mode 0600).

    The file appears whole or not at all: it is written and synced under a
    temporary name and then linked into place, which fails if another process
    got there first (its complete key is then used). Before, a process could
    read the file between another's create and write, and a crash there left
    an empty file; either way the master key was empty and every encrypted
    secret readable by anyone. A key file that is too short is refused, not
    replaced: the secrets encrypted under it would be lost with it.
    """
    if configured:
        return configured.encode()
    path = data_dir / SECRET_FILE
    try:
        return _checked(path, path.read_bytes().strip())
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    key = base64.urlsafe_b64encode(os.urandom(32))
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".secret-", dir=data_dir)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:  # another process made it first: use theirs
                return _checked(path, path.read_bytes().strip())
        finally:
            os.unlink(temporary)
        directory = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    return key


def _checked(path: Path, key: bytes) -> bytes:
    if len(key) < _MIN_KEY_BYTES:
        raise ConfigError(
            f"{path} holds {len(key)} bytes, not a key of at least {_MIN_KEY_BYTES}: restore it"
            " from a backup (the DKIM keys and passwords encrypted under it need it), or"
            " remove it only if nothing was ever encrypted under it"
        )
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
