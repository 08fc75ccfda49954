"""The PROXY protocol header (HAProxy, versions 1 and 2), parsed sans-IO.

Why: behind a TCP load balancer every connection seems to come from the
balancer, yet rate limits, trusted networks, logs and the Received header need
the real client address, which the balancer sends in this header before any
SMTP byte. Only listeners configured for it may parse one: from an untrusted
peer the header is a forged address, so whether to call this is the driver's
decision, not the parser's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from postlane.errors import InvalidInput

__all__ = ["MAX_PROXY_HEADER", "ProxyInfo", "parse_proxy_header"]

_V1_PREFIX = b"PROXY "
_V1_MAX = 107  # the longest v1 line, CRLF included (spec section 2.1)
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/transport, length
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_INET, _V2_INET6 = 0x1, 0x2
_V2_MAX_FAMILY, _V2_MAX_TRANSPORT = 0x3, 0x2
_V2_INET_LENGTH, _V2_INET6_LENGTH = 12, 36
_MAX_PORT = 65535
#: The longest header there can be: v2's length field is 16 bits.
MAX_PROXY_HEADER = _V2_FIXED + 0xFFFF


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Where the proxied connection really came from and went to.

    All four are None when the proxy did not say (v1 UNKNOWN, v2 LOCAL such as
    a health check, or an address family other than IPv4/IPv6); the driver then
    uses the socket's own addresses.
    """

    source_address: str | None
    source_port: int | None
    destination_address: str | None
    destination_port: int | None


_UNKNOWN = ProxyInfo(None, None, None, None)


def parse_proxy_header(buf: bytes) -> tuple[ProxyInfo | None, int]:
    """Parse the header at the start of ``buf``: (info, bytes used), or (None, 0) for more.

    It never asks for more than the header can hold (v1's 107 bytes, or what
    v2's length field says), so the driver need not guess a limit that the
    way TCP splits the header could cross. Raises InvalidInput when ``buf``
    does not start with a well-formed header.
    """
    if buf.startswith(_V2_SIGNATURE):
        return _parse_v2(buf)
    if buf.startswith(_V1_PREFIX):
        return _parse_v1(buf)
    if _V2_SIGNATURE.startswith(buf) or _V1_PREFIX.startswith(buf):
        return None, 0
    raise InvalidInput("the connection did not start with a PROXY protocol header")


def _parse_v1(buf: bytes) -> tuple[ProxyInfo | None, int]:
    newline = buf.find(b"\n", 0, _V1_MAX)
    if newline < 0:
        if len(buf) >= _V1_MAX:
            raise InvalidInput("PROXY v1 header is longer than 107 bytes")
        return None, 0
    if buf[newline - 1] != 0x0D:
        raise InvalidInput("PROXY v1 header does not end in CRLF")
    end = newline - 1
    fields = buf[len(_V1_PREFIX) : end].split(b" ")
    if fields[0] == b"UNKNOWN":
        return _UNKNOWN, end + 2
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise InvalidInput("PROXY v1 header is not 'TCP4|TCP6 source destination ports'")
    version = 4 if fields[0] == b"TCP4" else 6
    info = ProxyInfo(
        _v1_address(fields[1], version),
        _v1_port(fields[3]),
        _v1_address(fields[2], version),
        _v1_port(fields[4]),
    )
    return info, end + 2


def _v1_address(field: bytes, version: int) -> str:
    if b"%" in field:
        raise InvalidInput("PROXY v1 header has an address with a zone")
    try:
        text = field.decode("ascii")
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise InvalidInput(f"PROXY v1 header has an invalid IPv{version} address") from exc
    return str(address)


def _v1_port(field: bytes) -> int:
    if not field.isdigit() or (len(field) > 1 and field.startswith(b"0")):
        raise InvalidInput("PROXY v1 header has an invalid port")
    port = int(field)
    if port > _MAX_PORT:
        raise InvalidInput("PROXY v1 header has a port above 65535")
    return port


def _parse_v2(buf: bytes) -> tuple[ProxyInfo | None, int]:
    if len(buf) < _V2_FIXED:
        return None, 0
    version, command = buf[12] >> 4, buf[12] & 0x0F
    family, transport = buf[13] >> 4, buf[13] & 0x0F
    total = _V2_FIXED + int.from_bytes(buf[14:16], "big")
    if version != 2:
        raise InvalidInput(f"PROXY v2 header has version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise InvalidInput(f"PROXY v2 header has unknown command {command}")
    if family > _V2_MAX_FAMILY or transport > _V2_MAX_TRANSPORT:
        raise InvalidInput("PROXY v2 header has an unknown address family or transport")
    if len(buf) < total:
        return None, 0
    if command == _V2_LOCAL:
        return _UNKNOWN, total
    if family == _V2_INET:
        return _v2_addresses(buf, total, 4, _V2_INET_LENGTH), total
    if family == _V2_INET6:
        return _v2_addresses(buf, total, 16, _V2_INET6_LENGTH), total
    return _UNKNOWN, total


def _v2_addresses(buf: bytes, total: int, width: int, needed: int) -> ProxyInfo:
    """Source and destination addresses, then ports; any TLVs after them are skipped."""
    if total - _V2_FIXED < needed:
        raise InvalidInput("PROXY v2 header is too short for its address family")
    start = _V2_FIXED
    ports = start + 2 * width
    source = ipaddress.ip_address(buf[start : start + width])
    destination = ipaddress.ip_address(buf[start + width : ports])
    return ProxyInfo(
        str(source),
        int.from_bytes(buf[ports : ports + 2], "big"),
        str(destination),
        int.from_bytes(buf[ports + 2 : ports + 4], "big"),
    )
