from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from postlane.tenants import dkim_keys


def test_rsa_key_is_2048_bits_and_public_value_matches() -> None:
    pair = dkim_keys.generate("rsa")
    private = serialization.load_pem_private_key(pair.private_pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.key_size == 2048
    public = serialization.load_der_public_key(base64.b64decode(pair.public_value))
    assert isinstance(public, rsa.RSAPublicKey)
    signature = private.sign(b"data", padding.PKCS1v15(), hashes.SHA256())
    public.verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())
    assert pair.txt_record().startswith("v=DKIM1; k=rsa; p=MIIBIjAN")


def test_ed25519_public_value_is_raw_32_bytes() -> None:
    pair = dkim_keys.generate("ed25519")
    raw = base64.b64decode(pair.public_value)
    assert len(raw) == 32
    private = serialization.load_pem_private_key(pair.private_pem, password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(private.sign(b"m"), b"m")
    assert pair.txt_record().startswith("v=DKIM1; k=ed25519; p=")


def test_short_rsa_refused() -> None:
    with pytest.raises(ValueError, match="2048"):
        dkim_keys.generate("rsa", bits=1024)
