"""DKIM signing speed: Postlane's signer against dkimpy, on one 10 KiB message.

Usage: .venv/bin/python bench/dkim_sign.py [--count 2000]

Signs the same 10 KiB newsletter-like message ``--count`` times with each
signer (c=relaxed/relaxed, the same h= list for both, RSA-2048) and with ours
on Ed25519, then prints signatures per second and how many times faster ours
is. Every signer's output is first checked by dkimpy's verifier, so a fast but
wrong signer cannot win. One process, one thread: the numbers are per core.
The figures in ``postlane.render.dkim``'s docstring come from this script.
"""

from __future__ import annotations

import argparse
import base64
import platform
import time
from collections.abc import Callable
from importlib import metadata

import dkim
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postlane.render.dkim import DkimKey, parse_message, sign

SIZE = 10 * 1024
TIMESTAMP = 1_700_000_000

HEADERS = (
    b"From: Example News <news@example.com>\r\n"
    b"To: Ada Lovelace <ada@example.org>\r\n"
    b"Subject: Your weekly digest: 12 new stories from the people you follow\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <20231114221320.4f2a9c@mail.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"List-Unsubscribe: <https://example.com/u/8f3a1c>, <mailto:u+8f3a1c@example.com>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Mailer: Postlane\r\n"
    b"\r\n"
)


def make_message(size: int = SIZE) -> bytes:
    """A message of exactly ``size`` bytes: the headers above and a QP HTML body.

    Body lines are at most 76 characters like quoted-printable output, with
    an occasional double space and tab so relaxed canonicalisation has work.
    """
    lines = []
    i = 0
    while True:
        line = (
            f'<p style=3D"margin:0">Story {i}: something  happened, read more at '
            f"https://example.com/s/{i:05d}</p>"
        )
        if i % 7 == 0:
            line = "\t" + line
        lines.append(line[:76].encode())
        body = b"\r\n".join(lines) + b"\r\n"
        if len(HEADERS) + len(body) >= size:
            break
        i += 1
    message = HEADERS + body
    return message[: size - 2] + b"\r\n"


def per_second(fn: Callable[[], object], count: int) -> float:
    fn()  # warm up (first-call imports, key caches)
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="signatures per signer")
    count = parser.parse_args().count

    message = make_message()
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_private = ed25519.Ed25519PrivateKey.generate()
    rsa_key = DkimKey("example.com", "rsa", rsa_private)
    ed_key = DkimKey("example.com", "ed", ed_private)
    pkcs1 = rsa_private.private_bytes(  # dkimpy reads PKCS#1 PEM only
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = rsa_private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)

    # The same h= for dkimpy as ours writes, so both hash the same headers.
    ours_signed = sign(message, [rsa_key], timestamp=TIMESTAMP)
    h_value = dkim.util.parse_tag_value(parse_message(ours_signed)[0][0][1])[b"h"]
    include = [name.strip() for name in h_value.split(b":")]

    def ours_rsa() -> bytes:
        return sign(message, [rsa_key], timestamp=TIMESTAMP)

    def ours_ed() -> bytes:
        return sign(message, [ed_key], timestamp=TIMESTAMP)

    def ours_both() -> bytes:
        return sign(message, [rsa_key, ed_key], timestamp=TIMESTAMP)

    def dkimpy_rsa() -> bytes:
        header: bytes = dkim.sign(
            message,
            b"rsa",
            b"example.com",
            pkcs1,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        return header + message

    for name, fn in (("ours", ours_rsa), ("dkimpy", dkimpy_rsa)):
        if not dkim.verify(fn(), dnsfunc=lambda _name, timeout=5: txt):
            raise SystemExit(f"{name}'s RSA signature does not verify with dkimpy")

    print(f"message: {len(message)} bytes, {count} signatures per signer")
    print(
        f"python {platform.python_version()}, {backend.openssl_version_text()}, "
        f"dkimpy {metadata.version('dkimpy')}"
    )
    results = {
        "ours, RSA-2048": per_second(ours_rsa, count),
        "dkimpy, RSA-2048": per_second(dkimpy_rsa, count),
        "ours, Ed25519": per_second(ours_ed, count),
        "ours, RSA-2048 + Ed25519 (both signatures)": per_second(ours_both, count),
    }
    for label, rate in results.items():
        print(f"{label:45} {rate:9.0f} signatures/s")
    ratio = results["ours, RSA-2048"] / results["dkimpy, RSA-2048"]
    print(f"ours / dkimpy, RSA-2048: {ratio:.1f}x")


if __name__ == "__main__":
    main()
