"""DKIM signing: checked by other implementations, never by our own verifier.

Three independent witnesses: dkimpy verifies what we sign and signs the same
input itself (its ``bh=`` and RSA ``b=`` must equal ours byte for byte); the
published example of RFC 8463 must come out of our canonicalisation and
Ed25519 signing exactly; OpenDKIM's ``opendkim-testmsg`` verifies our
signatures when it is installed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from dkim.canonicalization import Relaxed
from dkim.util import parse_tag_value
from hypothesis import given
from hypothesis import strategies as st

from postlane.delivery.client_protocol import prepare_content
from postlane.errors import InvalidInput
from postlane.render import dkim as ours
from postlane.render.dkim import (
    DkimKey,
    header_hash_input,
    parse_message,
    relaxed_body,
    relaxed_header,
    sign,
)
from postlane.render.line_ends import crlf_lines

NOW = 1_700_000_000
EMPTY_SHA256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="

MESSAGE = (
    b"Received: from relay.example.net by mx.example.org; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: =?utf-8?q?Caf=C3=A9?= <news@example.com>\r\n"
    b"To: Ada <ada@example.org>,\r\n"
    b"\tGrace <grace@example.org>\r\n"
    b"Cc: one@example.org\r\n"
    b"Subject:  Hello \t there,\r\n"
    b"   folded   subject  \r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"X-Mailer: not signed\r\n"
    b"Cc: two@example.org\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Unsubscribe: <https://example.com/u/1>, <mailto:u@example.com>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"\r\n"
    b"Caf\xc3\xa9  au lait \t\r\n"
    b"\tindented line\r\n"
    b"trailing tab\t\r\n"
    b"\r\n"
    b"last line\r\n"
    b"\r\n"
    b"\r\n"
)


# --- keys and a DNS stand-in ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_private() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def rsa_key(rsa_private: rsa.RSAPrivateKey) -> DkimKey:
    return DkimKey("example.com", "rsa2023", rsa_private)


@pytest.fixture(scope="module")
def ed_key(ed_private: ed25519.Ed25519PrivateKey) -> DkimKey:
    return DkimKey("example.com", "ed2023", ed_private)


def txt_record(key: DkimKey) -> str:
    """The DNS TXT record a domain publishes for ``key`` (RFC 6376 3.6.1, RFC 8463 4)."""
    public = key.private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


def records(*keys: DkimKey) -> dict[str, str]:
    return {f"{k.selector}._domainkey.{k.domain}": txt_record(k) for k in keys}


def dnsfunc(*keys: DkimKey) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering the keys' TXT records and nothing else."""
    table = records(*keys)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        text = table.get(name.decode().rstrip("."))
        return text.encode() if text is not None else None

    return lookup


# --- dkimpy's Ed25519 backend ---------------------------------------------------------------


class _NaclValueError(ValueError):
    pass


class _BadSignatureError(Exception):
    pass


class _VerifyKey:
    """PyNaCl's ``VerifyKey`` as dkimpy 1.1 calls it, on ``cryptography``'s Ed25519."""

    def __init__(self, key: bytes, encoder: object = None) -> None:
        try:
            raw = base64.b64decode(key)
            self._key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise _NaclValueError(str(exc)) from None

    def verify(self, smessage: bytes, signature: bytes) -> bytes:
        try:
            self._key.verify(signature, smessage)
        except InvalidSignature:
            raise _BadSignatureError("signature was forged or corrupt") from None
        return smessage


_NACL_STAND_IN = SimpleNamespace(
    signing=SimpleNamespace(VerifyKey=_VerifyKey),
    encoding=SimpleNamespace(Base64Encoder=object()),
    exceptions=SimpleNamespace(ValueError=_NaclValueError, BadSignatureError=_BadSignatureError),
)


@pytest.fixture
def dkimpy_ed25519(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Let dkimpy verify Ed25519 signatures; yields which backend does it.

    dkimpy 1.1 verifies Ed25519 only through PyNaCl (``nacl.signing.VerifyKey``
    over the SHA-256 digest of the signed headers), which Postlane does not
    depend on. When PyNaCl is installed it is used as is; otherwise a stand-in
    with the same three names, on ``cryptography``'s RFC 8032 Ed25519, is put
    where dkimpy looks for it. Either way dkimpy's own code chooses, hashes and
    canonicalises what is verified; only the final curve operation differs.
    """
    if importlib.util.find_spec("nacl") is not None:
        yield "pynacl"
    else:
        monkeypatch.setattr(dkim, "nacl", _NACL_STAND_IN, raising=False)
        yield "cryptography stand-in"


def dkimpy_verify(message: bytes, keys: Callable[..., bytes | None], idx: int = 0) -> bool:
    """dkimpy's verdict on the ``idx``-th DKIM-Signature from the top."""
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=keys))
    except dkim.DKIMException:
        return False


def signature_tags(signed: bytes, idx: int = 0) -> dict[bytes, bytes]:
    fields, _ = parse_message(signed)
    values = [v for n, v in fields if n.lower() == b"dkim-signature"]
    tags: dict[bytes, bytes] = parse_tag_value(values[idx])
    return tags


def h_list(tags: dict[bytes, bytes]) -> list[bytes]:
    return [n.strip().lower() for n in tags[b"h"].split(b":")]


def without_b(value: bytes) -> bytes:
    """A DKIM-Signature value with its ``b=`` emptied (``b=`` is the last tag here)."""
    tag = re.search(rb";\s*b=", value)
    assert tag is not None
    return value[: tag.end()]


# --- signing, verified by dkimpy ------------------------------------------------------------


def test_rsa_signature_verifies_with_dkimpy(rsa_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key], timestamp=NOW)
    assert signed.endswith(MESSAGE)
    assert dkimpy_verify(signed, dnsfunc(rsa_key))


def test_ed25519_signature_verifies_with_dkimpy(ed_key: DkimKey, dkimpy_ed25519: str) -> None:
    signed = sign(MESSAGE, [ed_key], timestamp=NOW)
    assert dkimpy_verify(signed, dnsfunc(ed_key)), dkimpy_ed25519
    # And a wrong key fails: the backend really verifies.
    other = DkimKey("example.com", "ed2023", ed25519.Ed25519PrivateKey.generate())
    assert not dkimpy_verify(signed, dnsfunc(other))


def test_both_signatures_rsa_first_and_each_verifies(
    rsa_key: DkimKey, ed_key: DkimKey, dkimpy_ed25519: str
) -> None:
    signed = sign(MESSAGE, [ed_key, rsa_key], timestamp=NOW)
    assert signature_tags(signed, 0)[b"a"] == b"rsa-sha256"
    assert signature_tags(signed, 1)[b"a"] == b"ed25519-sha256"
    keys = dnsfunc(rsa_key, ed_key)
    assert dkimpy_verify(signed, keys, 0)
    assert dkimpy_verify(signed, keys, 1)


@pytest.mark.parametrize(
    ("what", "tamper"),
    [
        ("body", lambda m: m.replace(b"au lait", b"au the")),
        ("body appended", lambda m: m + b"P.S. buy now\r\n"),
        ("subject", lambda m: m.replace(b"folded   subject", b"folded   object")),
        (
            "second From on top",
            lambda m: m.replace(b"From: =?utf", b"From: Mallory <m@evil.example>\r\nFrom: =?utf"),
        ),
        (
            "second From at the bottom",
            lambda m: m.replace(
                b"List-Unsubscribe-Post:",
                b"From: Mallory <m@evil.example>\r\nList-Unsubscribe-Post:",
            ),
        ),
        ("third Cc", lambda m: m.replace(b"MIME-Version", b"Cc: x@evil.example\r\nMIME-Version")),
    ],
)
def test_tampering_breaks_both_signatures(
    rsa_key: DkimKey,
    ed_key: DkimKey,
    dkimpy_ed25519: str,
    what: str,
    tamper: Callable[[bytes], bytes],
) -> None:
    signed = sign(MESSAGE, [rsa_key, ed_key], timestamp=NOW)
    changed = tamper(signed)
    assert changed != signed, what
    keys = dnsfunc(rsa_key, ed_key)
    assert not dkimpy_verify(changed, keys, 0), what
    assert not dkimpy_verify(changed, keys, 1), what


def test_changes_relaxed_allows_still_verify(rsa_key: DkimKey) -> None:
    """Relays re-fold, re-space and add trace headers; relaxed signatures survive that."""
    signed = sign(MESSAGE, [rsa_key], timestamp=NOW)
    relayed = b"Received: from mx.example.org by inbox.example.org\r\n" + signed.replace(
        b"Message-ID: <m1", b"Message-ID:    <m1"
    ).replace(b"X-Mailer: not signed", b"X-Mailer: rewritten").replace(
        b",\r\n\tGrace", b",  Grace"
    ).replace(b"last line\r\n", b"last   line \r\n")
    assert dkimpy_verify(relayed, dnsfunc(rsa_key))


def test_h_lists_present_headers_bottom_up_and_oversigns_from(rsa_key: DkimKey) -> None:
    tags = signature_tags(sign(MESSAGE, [rsa_key], timestamp=NOW))
    assert h_list(tags) == [
        b"from",
        b"from",
        b"to",
        b"cc",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"content-transfer-encoding",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
    ]
    assert tags[b"v"] == b"1"
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.com"
    assert tags[b"s"] == b"rsa2023"
    assert tags[b"t"] == str(NOW).encode()


def test_oversigning_is_what_covers_a_from_added_on_top() -> None:
    """A From added above the signed one is bottom-up second: only an extra ``from`` sees it.

    (dkimpy's verifier adds that extra ``from`` itself, so it cannot show this.)
    """
    fields, _ = parse_message(MESSAGE)
    injected, _ = parse_message(b"From: Mallory <m@evil.example>\r\n" + MESSAGE)
    oversigned = [b"from", b"from", b"subject"]
    assert header_hash_input(fields, oversigned, b" b=") != header_hash_input(
        injected, oversigned, b" b="
    )
    once = [b"from", b"subject"]
    assert header_hash_input(fields, once, b" b=") == header_hash_input(injected, once, b" b=")


def test_minimal_message_still_signs_from(rsa_key: DkimKey) -> None:
    signed = sign(b"Subject: no sender\r\n\r\nhi\r\n", [rsa_key], timestamp=NOW)
    assert h_list(signature_tags(signed)) == [b"from", b"subject"]
    assert dkimpy_verify(signed, dnsfunc(rsa_key))


def test_header_is_folded_at_76_with_b_on_its_own_lines(rsa_key: DkimKey, ed_key: DkimKey) -> None:
    signed = sign(MESSAGE, [rsa_key, ed_key], timestamp=NOW)
    head = signed[: signed.index(b"Received:")]
    lines = head.split(b"\r\n")[:-1]
    assert all(len(line) <= 76 for line in lines), lines
    assert sum(line.startswith(b"DKIM-Signature: v=1; ") for line in lines) == 2
    assert sum(line.startswith(b" b=") for line in lines) == 2
    assert all(line.startswith(b" ") for line in lines if not line.startswith(b"DKIM"))


def test_bare_lf_and_missing_final_crlf_are_normalised(rsa_key: DkimKey) -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    signed = sign(lf, [rsa_key], timestamp=NOW)
    assert signed == sign(MESSAGE, [rsa_key], timestamp=NOW)
    assert b"\n" not in signed.replace(b"\r\n", b"")
    unterminated = b"From: a@example.com\r\nSubject: s\r\n\r\nno newline at end  "
    signed = sign(unterminated, [rsa_key], timestamp=NOW)
    assert signed.endswith(b"no newline at end  \r\n")
    assert dkimpy_verify(signed, dnsfunc(rsa_key))


@pytest.mark.parametrize(
    "body",
    [b"bare\rcr\r\n", b"cr before crlf\r\r\nnext\r\n", b"lf\nand\rcr\r\n", b"last\r"],
)
def test_what_is_signed_is_what_the_client_sends(rsa_key: DkimKey, body: bytes) -> None:
    """A bare CR is made a CRLF before signing, as the client sends it (it used to be kept)."""
    signed = sign(b"From: a@example.com\r\nSubject: s\r\n\r\n" + body, [rsa_key], timestamp=NOW)
    assert crlf_lines(signed) == signed  # nothing left for the client to rewrite
    assert prepare_content(signed) == prepare_content(signed, crlf_only=True)
    assert b"\r" not in signed.replace(b"\r\n", b"")
    assert dkimpy_verify(signed, dnsfunc(rsa_key))


def test_empty_body_signs_the_empty_string(rsa_key: DkimKey) -> None:
    for message in (b"From: a@example.com\r\n\r\n", b"From: a@example.com\r\n"):
        signed = sign(message, [rsa_key], timestamp=NOW)
        assert signature_tags(signed)[b"bh"] == EMPTY_SHA256.encode()
        assert dkimpy_verify(signed, dnsfunc(rsa_key))


def test_default_timestamp_is_now(rsa_key: DkimKey) -> None:
    before = int(time.time())
    t = int(signature_tags(sign(MESSAGE, [rsa_key]))[b"t"])
    assert before <= t <= int(time.time())


def test_sign_needs_a_key_and_a_parsable_header() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        sign(MESSAGE, [])
    key = DkimKey("example.com", "s", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(InvalidInput, match="malformed message header"):
        sign(b"From: a@example.com\r\nnot a header\r\n\r\nbody\r\n", [key])
    with pytest.raises(InvalidInput, match="continuation"):
        sign(b" folded: first\r\nFrom: a@example.com\r\n\r\n", [key])


def test_signatures_made_elsewhere_finish_into_what_sign_makes(
    rsa_key: DkimKey, ed_key: DkimKey, dkimpy_ed25519: str
) -> None:
    """prepare, then each digest signed apart, then finish: byte for byte sign's copy."""
    unsigned = ours.prepare(MESSAGE, [ed_key, rsa_key], timestamp=NOW)
    assert [key.algorithm for key in unsigned.keys] == ["rsa-sha256", "ed25519-sha256"]
    raw = [
        ours.sign_digest(key.private_key, digest)
        for key, digest in zip(unsigned.keys, unsigned.digests, strict=True)
    ]
    signed = unsigned.finish(raw)
    assert signed == sign(MESSAGE, [ed_key, rsa_key], timestamp=NOW)
    assert dkimpy_verify(signed, dnsfunc(rsa_key, ed_key), 0)
    assert dkimpy_verify(signed, dnsfunc(rsa_key, ed_key), 1)


def test_finish_wants_one_signature_per_key(rsa_key: DkimKey) -> None:
    unsigned = ours.prepare(MESSAGE, [rsa_key], timestamp=NOW)
    with pytest.raises(ValueError, match="1 signatures needed, 2 given"):
        unsigned.finish([b"x", b"y"])


def test_prepare_refuses_what_sign_refuses() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        ours.prepare(MESSAGE, [])


# --- byte-exact agreement with dkimpy's own signer ------------------------------------------


def dkimpy_sign(
    message: bytes, key: DkimKey, include: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> bytes:
    """dkimpy's DKIM-Signature value for ``message``, relaxed/relaxed, at time NOW."""
    private = key.private_key
    assert isinstance(private, rsa.RSAPrivateKey)
    pem = private.private_bytes(  # dkimpy reads PKCS#1 only
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    monkeypatch.setattr(dkim.time, "time", lambda: float(NOW))
    header = dkim.sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    assert header.startswith(b"DKIM-Signature:")
    value: bytes = header[len(b"DKIM-Signature:") :].removesuffix(b"\r\n")
    return value


@pytest.mark.parametrize(
    "message",
    [
        MESSAGE,
        b"From: a@example.com\r\nSubject: empty body\r\n\r\n",
        b"FROM: A  <a@example.com>\t\r\nsubject:\tx\r\nTo: b@example.org\r\n\r\n \t\r\n\r\n",
        b"From: a@example.com\r\nSubject: =?iso-8859-1?q?x?= \xe9\xff\r\n\r\n\xe9\xa0\x85 \r\n",
    ],
    ids=["full", "empty-body", "odd-spacing", "8bit"],
)
def test_bh_and_rsa_b_equal_dkimpys(
    rsa_key: DkimKey, monkeypatch: pytest.MonkeyPatch, message: bytes
) -> None:
    signed = sign(message, [rsa_key], timestamp=NOW)
    mine = signature_tags(signed)
    include = h_list(mine)
    theirs_value = dkimpy_sign(message, rsa_key, include, monkeypatch)
    theirs = parse_tag_value(theirs_value)

    # Same relaxed body, same body hash.
    assert mine[b"bh"] == theirs[b"bh"]
    # dkimpy writes h= as "from : from : to"; the same names in the same order.
    assert h_list(theirs) == include
    # Over dkimpy's own tag text, our header canonicalisation and our RSA
    # signing give dkimpy's b= exactly (PKCS#1 v1.5 is deterministic).
    fields, _ = parse_message(message)
    data = header_hash_input(fields, include, without_b(theirs_value))
    ours_b = ours.sign_digest(rsa_key.private_key, hashlib.sha256(data).digest())
    assert base64.b64encode(ours_b) == re.sub(rb"\s+", b"", theirs[b"b"])


def test_ed25519_b_equals_dkimpys(
    ed_key: DkimKey, ed_private: ed25519.Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ed25519 is deterministic too; dkimpy signs it only through PyNaCl."""
    pytest.importorskip("nacl.signing", reason="dkimpy signs Ed25519 only with PyNaCl")
    seed = ed_private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    include = h_list(signature_tags(sign(MESSAGE, [ed_key], timestamp=NOW)))
    monkeypatch.setattr(dkim.time, "time", lambda: float(NOW))
    header = dkim.sign(
        MESSAGE,
        ed_key.selector.encode(),
        ed_key.domain.encode(),
        base64.b64encode(seed),
        signature_algorithm=b"ed25519-sha256",
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    value = header[len(b"DKIM-Signature:") :].removesuffix(b"\r\n")
    fields, _ = parse_message(MESSAGE)
    data = header_hash_input(fields, include, without_b(value))
    mine = ours.sign_digest(ed_private, hashlib.sha256(data).digest())
    assert base64.b64encode(mine) == re.sub(rb"\s+", b"", parse_tag_value(value)[b"b"])


# --- the published example of RFC 8463 (Appendix A) -----------------------------------------

RFC8463_SIGNED = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
    b"\r\n"
)
RFC8463_ED25519_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_ED25519_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_RSA_PUBLIC = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0"
    "Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G"
    "+2kryOTIKT+l/K4w3QIDAQAB"
)
RFC8463_H = [b"from", b"to", b"subject", b"date", b"message-id", b"from", b"subject", b"date"]


def test_rfc8463_example_body_hash() -> None:
    _, body = parse_message(RFC8463_SIGNED)
    digest = hashlib.sha256(relaxed_body(body)).digest()
    assert base64.b64encode(digest) == b"2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="


def test_rfc8463_example_ed25519_signature_is_reproduced() -> None:
    """Ed25519 is deterministic: our canonical data and signing give the RFC's b= exactly."""
    seed = base64.b64decode(RFC8463_ED25519_SEED)
    private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raw_public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert base64.b64encode(raw_public).decode() == RFC8463_ED25519_PUBLIC
    fields, _ = parse_message(RFC8463_SIGNED)
    name, value = fields[0]
    assert name == b"DKIM-Signature"
    data = header_hash_input(fields, RFC8463_H, without_b(value))
    assert data == (
        b"from:Joe SixPack <joe@football.example.com>\r\n"
        b"to:Suzie Q <suzie@shopping.example.net>\r\n"
        b"subject:Is dinner ready?\r\n"
        b"date:Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
        b"message-id:<20030712040037.46341.5F8J@football.example.com>\r\n"
        b"dkim-signature:v=1; a=ed25519-sha256; c=relaxed/relaxed; d=football.example.com; "
        b"i=@football.example.com; q=dns/txt; s=brisbane; t=1528637909; h=from : to : "
        b"subject : date : message-id : from : subject : date; "
        b"bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=; b="
    )
    signature = ours.sign_digest(private, hashlib.sha256(data).digest())
    published = re.sub(rb"\s+", b"", parse_tag_value(value)[b"b"])
    assert base64.b64encode(signature) == published


def test_rfc8463_example_rsa_signature_verifies_over_our_canonical_data() -> None:
    fields, _ = parse_message(RFC8463_SIGNED)
    name, value = fields[1]
    assert name == b"DKIM-Signature"
    data = header_hash_input(fields, RFC8463_H, without_b(value))
    public = serialization.load_der_public_key(base64.b64decode(RFC8463_RSA_PUBLIC))
    assert isinstance(public, rsa.RSAPublicKey)
    published = base64.b64decode(re.sub(rb"\s+", b"", parse_tag_value(value)[b"b"]))
    public.verify(published, data, padding.PKCS1v15(), hashes.SHA256())


# --- canonicalisation -----------------------------------------------------------------------


def test_rfc6376_section_3_4_5_example() -> None:
    message = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n"
    fields, body = parse_message(message)
    assert fields == [(b"A", b" X"), (b"B ", b" Y\t\r\n\tZ  ")]
    assert b"".join(relaxed_header(n, v) for n, v in fields) == b"a:X\r\nb:Y Z\r\n"
    assert relaxed_body(body) == b" C\r\nD E\r\n"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (b"Subject", b" plain", b"subject:plain\r\n"),
        (b"SUBJECT", b"no-space", b"subject:no-space\r\n"),
        (b"To", b" a@x,\r\n\tb@y,\r\n  c@z", b"to:a@x, b@y, c@z\r\n"),
        (b"X", b"\t tabs\t\tinside \t", b"x:tabs inside\r\n"),
        (b"X", b"   ", b"x:\r\n"),
        (b"X", b"", b"x:\r\n"),
        (b"Subject ", b"\t obs space before colon", b"subject:obs space before colon\r\n"),
        (b"Subject", b" caf\xc3\xa9 \xa0\x85 \xff  ", b"subject:caf\xc3\xa9 \xa0\x85 \xff\r\n"),
    ],
)
def test_relaxed_header(name: bytes, value: bytes, expected: bytes) -> None:
    assert relaxed_header(name, value) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", b""),
        (b"\r\n", b""),
        (b"\r\n\r\n\r\n", b""),
        (b"  \r\n\t\r\n", b""),
        (b"text", b"text\r\n"),
        (b"text  \t", b"text\r\n"),
        (b"a\r\nlast", b"a\r\nlast\r\n"),
        (b"a  b\t\tc \r\n", b"a b c\r\n"),
        (b"\tlead\r\n", b" lead\r\n"),
        (b"a\r\n\r\nb\r\n\r\n", b"a\r\n\r\nb\r\n"),
        (b"bare\rcr \r\r\n", b"bare\rcr \r\r\n"),
        (b"caf\xc3\xa9\xa0\x85  \xff \r\n", b"caf\xc3\xa9\xa0\x85 \xff\r\n"),
    ],
)
def test_relaxed_body(body: bytes, expected: bytes) -> None:
    assert relaxed_body(body) == expected


def test_relaxed_body_of_empty_is_empty_per_errata_1384() -> None:
    assert base64.b64encode(hashlib.sha256(relaxed_body(b"")).digest()).decode() == EMPTY_SHA256


def test_parse_message_shapes() -> None:
    assert parse_message(b"\r\nbody\r\n") == ([], b"body\r\n")
    assert parse_message(b"A: 1\r\nB: 2\r\n") == ([(b"A", b" 1"), (b"B", b" 2")], b"")
    assert parse_message(b"A: 1\r\n\r\n") == ([(b"A", b" 1")], b"")
    assert parse_message(b"A:1\r\n x\r\n\ty\r\n\r\n\r\nb") == (
        [(b"A", b"1\r\n x\r\n\ty")],
        b"\r\nb",
    )
    for bad in (b": no name\r\n\r\n", b"Bad Name: x\r\n\r\n", b"X\x00: y\r\n\r\n"):
        with pytest.raises(InvalidInput):
            parse_message(bad)


_BODY_PIECES = st.sampled_from(
    [b"a", b"Z", b" ", b"  ", b"\t", b"\r\n", b"\r", b"\n", b"\xff", b"\xa0", b"\x85", b"."]
)


@given(st.lists(_BODY_PIECES, max_size=40).map(b"".join))
def test_relaxed_body_matches_dkimpy(body: bytes) -> None:
    """Byte-identical to dkimpy on every body as it is on the wire (ending in CRLF).

    On a body without a final CRLF dkimpy keeps one SP of the last line's
    trailing WSP; we drop it, which is what dkimpy itself gives once the CRLF
    the SMTP client adds is there.
    """
    wire = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    assert relaxed_body(body) == Relaxed.canonicalize_body(wire)
    assert relaxed_body(wire) == Relaxed.canonicalize_body(wire)


_VALUE_PIECES = st.sampled_from(
    [b"v", b"Q", b":", b";", b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b"\xff", b"\xc3\xa9", b"\xa0"]
)


@given(
    st.sampled_from([b"Subject", b"FROM", b"x-Y", b"List-Unsubscribe-Post"]),
    st.lists(_VALUE_PIECES, max_size=30).map(b"".join),
)
def test_relaxed_header_matches_dkimpy(name: bytes, value: bytes) -> None:
    [(their_name, their_value)] = Relaxed.canonicalize_headers([(name, value + b"\r\n")])
    assert relaxed_header(name, value) == their_name + b":" + their_value


# --- keys -----------------------------------------------------------------------------------

RSA_512_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA4gC9XP/xc8fnUImY
4n4bUZQkFrLhdp1Dr588OWTnYNK6b2GpnvfI2A8BNcWNPXshJ6BNarl8PWAW6hpk
1hsgcwIDAQABAkAZGfnuTWMU9/wCHvZDGbyRCAImH0IZeYgeBnKa8VEdmLSsUimV
vCTH2YWGhNXvbYZdOk3HTdqdQ6Xvj8nzox9pAiEA/EFLD88tMha9GEeHb1IIPCLK
TGzNqHEIYURBXYM/m3cCIQDlW6yITQFCdCWnO3ZoVFf/Q6AfrHItpw20ntvS+ekp
5QIgMANVgCrU1WXSlB55Ps0EWD3e93D2LAtnpuvQ7TWgE70CIQDUBGh7HuP5MDDW
ZGtSihVGTJcqcFijxvcubmM6pfZZ2QIhAOchwni8z5XdjEWiM0VJdbTL6ilp2LIs
k+lNxzIqHoJf
-----END PRIVATE KEY-----
"""


def _pem(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, fmt: serialization.PrivateFormat
) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def test_from_pem_reads_pkcs8_and_pkcs1(
    rsa_private: rsa.RSAPrivateKey, ed_private: ed25519.Ed25519PrivateKey
) -> None:
    pkcs8 = serialization.PrivateFormat.PKCS8
    for pem in (
        _pem(rsa_private, pkcs8),
        _pem(rsa_private, serialization.PrivateFormat.TraditionalOpenSSL),
    ):
        key = DkimKey.from_pem("example.com", "s1", pem)
        assert key.algorithm == "rsa-sha256"
        assert isinstance(key.private_key, rsa.RSAPrivateKey)
        assert key.private_key.private_numbers() == rsa_private.private_numbers()
    ed = DkimKey.from_pem("example.com", "s2", _pem(ed_private, pkcs8))
    assert ed.algorithm == "ed25519-sha256"
    assert "PRIVATE" not in repr(ed) and "private_key" not in repr(ed)


def test_from_pem_refuses_bad_keys(rsa_private: rsa.RSAPrivateKey) -> None:
    with pytest.raises(InvalidInput, match="1024"):
        DkimKey.from_pem("example.com", "s", RSA_512_PEM)
    with pytest.raises(InvalidInput, match="not a readable PEM"):
        DkimKey.from_pem("example.com", "s", b"-----BEGIN PRIVATE KEY-----\nnope\n-----END")
    encrypted = rsa_private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(InvalidInput, match="not a readable PEM"):
        DkimKey.from_pem("example.com", "s", encrypted)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(InvalidInput, match="RSA or Ed25519"):
        DkimKey.from_pem("example.com", "s", ec_pem)


@pytest.mark.parametrize(
    ("domain", "selector"),
    [("example.com; x=1", "s"), ("example.com", "s\r\nX: y"), ("", "s"), ("example.com", "-s")],
)
def test_names_that_could_inject_tags_are_refused(domain: str, selector: str) -> None:
    with pytest.raises(InvalidInput):
        DkimKey(domain, selector, ed25519.Ed25519PrivateKey.generate())


# --- OpenDKIM -------------------------------------------------------------------------------

DRIVER = Path(__file__).with_name("opendkim_driver.py")


def _opendkim_unavailable() -> str | None:
    if shutil.which("opendkim-testmsg") is None:
        return "opendkim-testmsg is not installed (Debian package opendkim-tools)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2) to give OpenDKIM a private DNS"
    if os.geteuid() != 0:
        return "needs root to give OpenDKIM a private DNS in its own mount and network namespace"
    probe = subprocess.run(
        ["unshare", "--mount", "--net", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def opendkim_verify(message: bytes, table: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    """OpenDKIM's verdict: (exit status of opendkim-testmsg, its stderr)."""
    path = tmp_path / f"message-{len(list(tmp_path.iterdir()))}.eml"
    path.write_bytes(message)
    run = subprocess.run(
        ["unshare", "--mount", "--net", sys.executable, str(DRIVER), json.dumps(table), str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return run.returncode, run.stderr.decode(errors="replace")


def test_opendkim_verifies_our_signatures(
    rsa_key: DkimKey, ed_key: DkimKey, tmp_path: Path
) -> None:
    """opendkim-testmsg verifies with DNS only; the driver gives it a private one.

    It has no option for a key file, so it runs in its own mount and network
    namespaces, where /etc/resolv.conf names a DNS responder on that
    namespace's loopback serving the test keys. Each algorithm is signed
    alone, so OpenDKIM's single verdict is about that signature; tampered
    copies must fail, which shows the verdicts are real.
    """
    reason = _opendkim_unavailable()
    if reason is not None:
        pytest.skip(reason)
    table = records(rsa_key, ed_key)
    # OpenDKIM refuses a second Cc (RFC 5322 allows one) as a syntax error.
    message = MESSAGE.replace(b"Cc: two@example.org\r\n", b"")
    for key in (rsa_key, ed_key):
        signed = sign(message, [key], timestamp=NOW)
        status, err = opendkim_verify(signed, table, tmp_path)
        assert status == 0, (key.algorithm, err)
        for tampered in (
            signed.replace(b"au lait", b"au the"),
            signed.replace(b"folded   subject", b"folded   object"),
        ):
            status, err = opendkim_verify(tampered, table, tmp_path)
            assert status != 0, (key.algorithm, err)
            assert "Bad signature" in err, err
        # A second From is refused before any signature is looked at.
        injected = signed.replace(b"From: =?utf", b"From: Mallory <m@evil.example>\r\nFrom: =?utf")
        status, err = opendkim_verify(injected, table, tmp_path)
        assert status != 0, (key.algorithm, err)
