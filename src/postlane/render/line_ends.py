"""SMTP's line ends: what a message's lines end with on the wire, decided in one place.

The SMTP client sends every line with CRLF (RFC 5321 §2.3.8), turning a bare
CR or a bare LF into one; DKIM must sign the message in that same form, or
a copy with a bare CR or LF would leave with a signature over bytes that
were never sent. Both call :func:`crlf_lines`, so they cannot disagree.
"""

from __future__ import annotations

__all__ = ["crlf_lines"]


def crlf_lines(data: bytes) -> bytes:
    """``data`` with each bare CR and each bare LF made a CRLF; ``data`` itself when it has none.

    Composed copies are CRLF throughout: three counts (no copies) find that,
    and the three rewriting passes are only made for a bare CR or LF. A CR
    right before a CRLF is a line of its own ("a\\r\\r\\n" is two lines).
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data
