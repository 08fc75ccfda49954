"""DKIM key pairs for sending domains.

RSA-2048 is what every receiver verifies; Ed25519 (RFC 8463) is smaller and
faster but not yet verified everywhere, so it is only ever an additional
signature. The private key is returned as PEM for the caller to encrypt; the
public half is returned in the exact form that goes into the DNS ``p=`` tag.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

KeyType = Literal["rsa", "ed25519"]


@dataclass(frozen=True, slots=True)
class DkimKeyPair:
    key_type: KeyType
    private_pem: bytes
    public_value: str  # base64, the DNS p= tag

    def txt_record(self) -> str:
        return f"v=DKIM1; k={self.key_type}; p={self.public_value}"


def generate(key_type: KeyType = "rsa", bits: int = 2048) -> DkimKeyPair:
    """A fresh key pair; RSA keys below 2048 bits are refused (receivers distrust them)."""
    if key_type == "ed25519":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        raw = ed_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        pem = ed_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return DkimKeyPair("ed25519", pem, base64.b64encode(raw).decode())
    if bits < 2048:
        raise ValueError("RSA DKIM keys must have at least 2048 bits")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return DkimKeyPair("rsa", pem, base64.b64encode(der).decode())
