"""DKIM signatures (RFC 6376, RSA-SHA256; RFC 8463, Ed25519-SHA256) for each outgoing copy.

Signing is the last step of rendering: every recipient's copy is different
(personalisation, tracking links), so every copy is signed, at the rate the
delivery workers send — thousands a second on two cores. So it is written on
``cryptography``'s primitives (OpenSSL) with our own canonicalisation, and
measured against dkimpy with ``bench/dkim_sign.py`` (a 10 KiB message signed
2,000 times per signer, c=relaxed/relaxed, the same ``h=`` for both; one
core; Python 3.11, OpenSSL 4.0, dkimpy 1.1.8; four runs on the shared
2-core machine, load average 3 to 5 from other work, hence the ranges):

==============================  =================
signer                          signatures/s
==============================  =================
ours, RSA-2048                  2,800 to 3,700
dkimpy, RSA-2048                147 to 187
ours, Ed25519                   8,000 to 11,900
ours, RSA-2048 and Ed25519      3,100 to 3,200 (both signatures on each copy)
==============================  =================

Ours is 19 to 20 times dkimpy's rate in every run, so ours is kept; dkimpy
stays a test dependency, as the independent verifier. Profiling dkimpy shows
where the gap is: about 86% of its time is the RSA private-key operation done with Python
integers (``pow`` with CRT), and it re-parses the PEM key on every call; its
canonicalisation (~0.3 ms for this message) is about ten times ours (~0.03 ms),
which is what matters for Ed25519, where the curve operation is only ~20 us.

What is signed, and why:

* ``c=relaxed/relaxed``: survives the re-folding and whitespace changes that
  relays make; ``simple`` is never used.
* ``h=`` lists each header of :data:`SIGNED_HEADERS` once per instance present
  (instances are signed bottom-up, RFC 6376 5.4.2), and From once more than
  present (*oversigning*): the extra entry matches no field, so it signs "no
  further From", and a second From added in transit — the header a reader sees
  and DMARC aligns on — breaks the signature.
* One DKIM-Signature per key, RSA before Ed25519: RSA is what every receiver
  checks, and some verifiers only look at the first signature; Ed25519
  (RFC 8463) rides along for the receivers that use it.
* Ed25519-SHA256 is PureEdDSA over the 32-byte SHA-256 digest of the
  canonicalised data (RFC 8463 section 3), not over the data itself.
* ``b=`` is on its own line, folded at 76 columns, so the signed form of the
  header (with ``b=`` empty) does not depend on the signature's length.

Input conventions: messages should use CRLF line endings. A bare LF (as some
submission clients and tests produce) or a bare CR is made a CRLF first, and
a message that does not end in CRLF gets one, because that is what the SMTP
client puts on the wire (:mod:`postlane.render.line_ends`, shared with it);
the returned bytes are the normalised message, so what is signed is exactly
what is sent, and the client need not look again.
Signing does not judge the header beyond parsing it: a message with two of a
header RFC 5322 allows once (say two Cc) is signed (bottom-up) and verifies
with dkimpy, but OpenDKIM refuses such a message as a syntax error before
looking at any signature; keeping those out is intake's RFC 5322 check.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from postlane.errors import InvalidInput
from postlane.render.line_ends import crlf_lines

__all__ = [
    "OVERSIGNED_HEADERS",
    "SIGNED_HEADERS",
    "DkimKey",
    "Unsigned",
    "header_hash_input",
    "parse_message",
    "prepare",
    "relaxed_body",
    "relaxed_header",
    "sign",
    "sign_digest",
]

#: Header fields signed when present (lower-case), in ``h=`` order. From, the
#: recipients, Subject, Date and Message-ID are what a reader trusts; the MIME
#: headers decide how the body is shown; the List-* and Feedback-ID headers
#: are what mailbox providers act on (one-click unsubscribe, RFC 8058, needs
#: List-Unsubscribe and List-Unsubscribe-Post signed). Headers that relays
#: add or rewrite (Received, Return-Path) are never signed.
SIGNED_HEADERS: Final[tuple[str, ...]] = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)

#: Headers listed in ``h=`` once more than they occur, so none can be added.
OVERSIGNED_HEADERS: Final[frozenset[str]] = frozenset({"from"})

#: Longest line of the DKIM-Signature header we write (RFC 5322 asks for 78).
FOLD_WIDTH: Final = 76

_SIGNED: Final = tuple(name.encode("ascii") for name in SIGNED_HEADERS)
_SIGNED_SET: Final = frozenset(_SIGNED)
_OVERSIGNED: Final = frozenset(name.encode("ascii") for name in OVERSIGNED_HEADERS)

# RFC 5322 field name (printable ASCII but colon), then obsolete WSP before
# the colon (RFC 5322 4.5.8), which relaxed canonicalisation drops.
_FIELD_NAME: Final = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*")
# d= and s= go into the header verbatim: DNS labels only, no way to inject a tag.
_DNS_LABEL: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_DNS_NAME: Final = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

_MIN_RSA_BITS: Final = 1024
_SIG_NAME: Final = b"DKIM-Signature"

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing identity: the ``d=`` domain, the ``s=`` selector and the private key.

    Built once per sending domain and reused for every message; constructing
    it checks the names (they go into the header verbatim, so only DNS labels,
    an international domain in its ASCII form) and the key size.
    """

    domain: str
    selector: str
    private_key: PrivateKey = field(repr=False)
    #: Whether the key is RSA, decided once: the key classes are ABCs, and
    #: asking isinstance of them for every copy was 2% of the delivery role's
    #: time with Python's lock (measured draining a bench/relay backlog).
    is_rsa: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for what, value in (("domain", self.domain), ("selector", self.selector)):
            if not _DNS_NAME.fullmatch(value):
                raise InvalidInput(f"invalid DKIM {what} {value!r}: use DNS labels only")
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            if self.private_key.key_size < _MIN_RSA_BITS:
                raise InvalidInput(
                    f"DKIM RSA key for {self.domain} has {self.private_key.key_size} bits; "
                    f"receivers reject keys under {_MIN_RSA_BITS} (use 2048)"
                )
        elif not isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            raise InvalidInput(f"DKIM key for {self.domain} must be RSA or Ed25519")
        object.__setattr__(self, "is_rsa", isinstance(self.private_key, rsa.RSAPrivateKey))

    @classmethod
    def from_pem(cls, domain: str, selector: str, pem: bytes) -> DkimKey:
        """The key from an unencrypted PEM private key (PKCS#8 or PKCS#1).

        Raises InvalidInput for anything that is not an RSA key of at least
        1024 bits or an Ed25519 key, saying which domain's key is wrong.
        """
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise InvalidInput(
                f"DKIM private key for {domain} is not a readable PEM key: {exc}"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise InvalidInput(
                f"DKIM private key for {domain} is {type(key).__name__}; use RSA or Ed25519"
            )
        return cls(domain, selector, key)

    @property
    def algorithm(self) -> str:
        """The ``a=`` tag value for this key."""
        return "rsa-sha256" if self.is_rsa else "ed25519-sha256"


def parse_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Split a CRLF message into its header fields and its body.

    Each field is ``(name, value)`` as written: the name up to the colon
    (which may end in obsolete WSP), the value after it with folds kept
    (``\\r\\n`` followed by the continuation line), and without the field's
    final CRLF. The body is everything after the empty line. Raises
    InvalidInput for a header line that is not a field (signing would give a
    signature no verifier can check).
    """
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end == -1:
        head = message[:-2] if message.endswith(b"\r\n") else message
        body = b""
    else:
        head = message[:end]
        body = message[end + 4 :]
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise InvalidInput("message header starts with a continuation line")
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        colon = line.find(b":")
        if colon <= 0 or not _FIELD_NAME.fullmatch(line, 0, colon):
            shown = line[:40].decode("ascii", "replace")
            raise InvalidInput(f"malformed message header line {shown!r}")
        fields.append((line[:colon], line[colon + 1 :]))
    return fields, body


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """One header field in relaxed canonical form (RFC 6376 3.4.2), CRLF included.

    Lower-cases the name, unfolds the value, reduces each run of WSP to one
    SP, and drops WSP at both ends of the value and before the colon.
    """
    value = _reduce_wsp(value.replace(b"\r\n", b""))
    return name.rstrip(b" \t").lower() + b":" + value.strip(b" \t") + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The body in relaxed canonical form (RFC 6376 3.4.4 with errata 1384).

    Drops WSP at line ends, reduces other WSP runs to one SP, and drops empty
    lines at the end. An empty body (or one of empty lines only) canonicalises
    to nothing, as the erratum and dkimpy have it, not to a CRLF. A last line
    without CRLF gets one, after its trailing WSP is dropped like any line's
    (dkimpy keeps one SP there; :func:`sign` never meets the case, because it
    makes the message end in CRLF first, as it will on the wire).
    """
    if body and not body.endswith(b"\r\n"):
        body = body.rstrip(b" \t") + b"\r\n"
    body = _reduce_wsp(body)
    if b" \r\n" in body:  # runs are single spaces now, so one pass strips them
        body = body.replace(b" \r\n", b"\r\n")
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    return body[: end + 2] if end else b""


def _reduce_wsp(data: bytes) -> bytes:
    """Each run of SP and HTAB as one SP.

    Done with ``bytes.replace`` (tabs to spaces, then halving runs of spaces
    until none is left, one pass per doubling of the longest run) rather than
    a regex: on a 10 KiB body this is about ten times faster, and
    canonicalisation is most of the cost of an Ed25519 signature.
    """
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def header_hash_input(
    fields: Sequence[tuple[bytes, bytes]],
    signed: Sequence[bytes],
    signature_value: bytes,
) -> bytes:
    """The exact bytes a DKIM-Signature's ``b=`` signs (RFC 6376 3.7), relaxed headers.

    ``fields`` are the message's header fields as :func:`parse_message` gives
    them, ``signed`` the lower-case names of ``h=`` in order, and
    ``signature_value`` the DKIM-Signature value as it will be written, with
    ``b=`` empty. Each name in ``signed`` takes the lowest instance not yet
    taken; a name with no instance left contributes nothing. The signature
    header comes last, canonicalised, without its final CRLF.
    """
    return _selected_fields(fields, signed) + relaxed_header(_SIG_NAME, signature_value)[:-2]


def _selected_fields(fields: Sequence[tuple[bytes, bytes]], signed: Sequence[bytes]) -> bytes:
    """The relaxed fields ``signed`` names, each name taking its lowest instance not yet taken."""
    wanted = set(signed)
    by_name: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in fields:
        key = name.rstrip(b" \t").lower()
        if key in wanted:
            by_name.setdefault(key, []).append((name, value))
    parts: list[bytes] = []
    for name in signed:
        instances = by_name.get(name)
        if instances:
            parts.append(relaxed_header(*instances.pop()))
    return b"".join(parts)


def sign(message: bytes, keys: Sequence[DkimKey], *, timestamp: int | None = None) -> bytes:
    """The message with one DKIM-Signature per key prepended, RSA keys' first.

    Each signature has ``c=relaxed/relaxed``, ``h=`` naming the present
    :data:`SIGNED_HEADERS` with From oversigned, ``t=`` from ``timestamp``
    (now when None), and the body hash computed once for all keys. The message
    is normalised first (bare LF to CRLF, a final CRLF), see the module notes.
    Raises ValueError when ``keys`` is empty (an unsigned copy must be a
    decision, not an accident) and InvalidInput for a malformed header block.
    """
    unsigned = prepare(message, keys, timestamp=timestamp)
    return unsigned.finish(unsigned.sign_all())


@dataclass(frozen=True, slots=True)
class Unsigned:
    """A copy canonicalised and hashed, waiting for one signature per key.

    :func:`sign` in two halves. The private-key operation is most of the cost
    of a signed copy (an RSA-2048 signature takes about 0.26 ms here, the
    rest of the copy's rendering about 0.08 ms) and it is the one step that
    runs without Python's lock, so a caller with many copies hands them to
    other threads in batches, which call :meth:`sign_all` and :meth:`finish`
    (:mod:`postlane.delivery.signer`).
    """

    message: bytes
    keys: tuple[DkimKey, ...]
    values: tuple[bytes, ...]
    digests: tuple[bytes, ...]

    def sign_all(self) -> list[bytes]:
        """Each key's raw signature over its digest, in ``keys`` order."""
        return [
            sign_digest(key.private_key, digest)
            for key, digest in zip(self.keys, self.digests, strict=True)
        ]

    def finish(self, signatures: Sequence[bytes]) -> bytes:
        """The signed message: a DKIM-Signature per key, each with its raw ``signature``."""
        if len(signatures) != len(self.keys):
            raise ValueError(f"{len(self.keys)} signatures needed, {len(signatures)} given")
        out = [
            _SIG_NAME + b":" + value + _fold_b64(base64.b64encode(raw)) + b"\r\n"
            for value, raw in zip(self.values, signatures, strict=True)
        ]
        out.append(self.message)
        return b"".join(out)


def prepare(message: bytes, keys: Sequence[DkimKey], *, timestamp: int | None = None) -> Unsigned:
    """Everything of :func:`sign` but the private-key operations; same arguments and errors."""
    if not keys:
        raise ValueError("DKIM sign() needs at least one key")
    message = _normalise(message)
    fields, body = parse_message(message)
    body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())

    # One h= and one block of canonical fields serve every key.
    counts: dict[bytes, int] = {}
    for name, _ in fields:
        key_name = name.rstrip(b" \t").lower()
        if key_name in _SIGNED_SET:
            counts[key_name] = counts.get(key_name, 0) + 1
    h_names: list[bytes] = []
    for name in _SIGNED:
        h_names.extend([name] * (counts.get(name, 0) + (name in _OVERSIGNED)))
    header_data = _selected_fields(fields, h_names)
    t = str(int(time.time()) if timestamp is None else timestamp).encode("ascii")

    ordered = tuple(sorted(keys, key=lambda k: not k.is_rsa))
    values = tuple(_signature_value(key, t, h_names, body_hash) for key in ordered)
    digests = tuple(
        hashlib.sha256(header_data + relaxed_header(_SIG_NAME, value)[:-2]).digest()
        for value in values
    )
    return Unsigned(message, ordered, values, digests)


def _normalise(message: bytes) -> bytes:
    """CRLF line endings throughout and a final CRLF: the form the message has on the wire."""
    message = crlf_lines(message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def _signature_value(key: DkimKey, t: bytes, h_names: Sequence[bytes], body_hash: bytes) -> bytes:
    """The DKIM-Signature value up to and including an empty ``b=``, folded at FOLD_WIDTH.

    Tags are separated by ``; `` and folded between tags; ``h=`` may fold
    after any colon (FWS is allowed there). ``b=`` starts its own line.
    """
    tokens: list[tuple[bytes, bytes]] = [
        (b" ", b"v=1;"),
        (b" ", b"a=" + key.algorithm.encode("ascii") + b";"),
        (b" ", b"c=relaxed/relaxed;"),
        (b" ", b"d=" + key.domain.encode("ascii") + b";"),
        (b" ", b"s=" + key.selector.encode("ascii") + b";"),
        (b" ", b"t=" + t + b";"),
    ]
    for i, name in enumerate(h_names):
        first, last = i == 0, i == len(h_names) - 1
        tokens.append(
            (b" " if first else b"", (b"h=" if first else b"") + name + (b";" if last else b":"))
        )
    tokens.append((b" ", b"bh=" + body_hash + b";"))
    lines: list[bytes] = []
    line = first_line = _SIG_NAME + b":"
    for sep, token in tokens:
        if len(line) + len(sep) + len(token) > FOLD_WIDTH and line != first_line:
            lines.append(line)
            line = b" " + token
        else:
            line += sep + token
    lines.append(line)
    lines.append(b" b=")
    return b"\r\n".join(lines)[len(_SIG_NAME) + 1 :]


def _fold_b64(signature: bytes) -> bytes:
    """The base64 signature to follow `` b=``, folded so no line passes FOLD_WIDTH."""
    first = FOLD_WIDTH - 3
    chunks = [signature[:first]]
    rest = FOLD_WIDTH - 1
    for i in range(first, len(signature), rest):
        chunks.append(signature[i : i + rest])
    return b"\r\n ".join(chunks)


def sign_digest(private_key: PrivateKey, digest: bytes) -> bytes:
    """The raw signature over a SHA-256 digest: PKCS#1 v1.5 for RSA, PureEdDSA for Ed25519.

    RFC 8463 has Ed25519 sign the digest itself (32 bytes) as its message, so
    both algorithms take the same hash of the canonical header data.
    """
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    return private_key.sign(digest)
