"""The signer: copies prepared on the loop, signed on its threads, exactly as sign() makes them."""

from __future__ import annotations

import asyncio
import base64
import threading

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postlane.delivery.signer import Signer
from postlane.render import dkim as dkim_render
from postlane.render.dkim import DkimKey

RSA = DkimKey("shop.example", "pl1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
ED = DkimKey("shop.example", "pl1e", ed25519.Ed25519PrivateKey.generate())
NOW = 1_700_000_000


def message(n: int) -> bytes:
    return (
        f"From: shop@shop.example\r\nTo: c{n}@example.org\r\nSubject: order {n}\r\n\r\n"
        f"Thank you for order {n}.\r\n"
    ).encode()


def test_a_batch_comes_back_in_order_as_sign_makes_each_copy() -> None:
    copies = [message(n) for n in range(20)]
    prepared = [dkim_render.prepare(copy, [RSA, ED], timestamp=NOW) for copy in copies]
    signer = Signer(2)
    try:
        signed = asyncio.run(signer.sign(prepared))
    finally:
        signer.close()
    assert signed == [dkim_render.sign(copy, [RSA, ED], timestamp=NOW) for copy in copies]


def test_signing_runs_on_the_signers_threads_not_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names: list[str] = []
    real = dkim_render.sign_digest

    def spy(private_key: dkim_render.PrivateKey, digest: bytes) -> bytes:
        names.append(threading.current_thread().name)
        return real(private_key, digest)

    monkeypatch.setattr(dkim_render, "sign_digest", spy)
    signer = Signer(1)
    try:
        (signed,) = asyncio.run(signer.sign([dkim_render.prepare(message(1), [RSA])]))
    finally:
        signer.close()
    assert names and all(name.startswith("dkim-sign") for name in names)
    public = RSA.private_key.public_key()  # type: ignore[union-attr]
    assert dkim.verify(signed, dnsfunc=lambda *_, **__: _txt(public))


def test_a_closed_signer_starts_new_threads_when_used_again() -> None:
    signer = Signer(1)
    first = asyncio.run(signer.sign([dkim_render.prepare(message(1), [ED], timestamp=NOW)]))
    signer.close()
    second = asyncio.run(signer.sign([dkim_render.prepare(message(1), [ED], timestamp=NOW)]))
    signer.close()
    assert first == second


def test_an_empty_batch_is_an_empty_list() -> None:
    signer = Signer(1)
    try:
        assert asyncio.run(signer.sign([])) == []
    finally:
        signer.close()


def test_a_signer_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread, not 0"):
        Signer(0)


def _txt(public: rsa.RSAPublicKey) -> bytes:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
