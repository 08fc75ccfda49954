"""PROXY protocol v1/v2 header parsing."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from postlane.errors import InvalidInput
from postlane.smtp.proxy import MAX_PROXY_HEADER, ProxyInfo, parse_proxy_header

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
SMTP = b"EHLO client.example\r\n"


def v2(command: int, family: int, body: bytes, *, version: int = 2) -> bytes:
    return (
        V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(body)) + body
    )


def v2_inet(src: str, dst: str, sport: int, dport: int, *, tlvs: bytes = b"") -> bytes:
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if source.version == 4 else 0x21
    body = source.packed + destination.packed + struct.pack("!HH", sport, dport) + tlvs
    return v2(0x1, family, body)


UNKNOWN = ProxyInfo(None, None, None, None)
# A TLV long enough to take the header past 536 bytes (PP2_TYPE_NOOP).
LONG_TLV = b"\x04" + struct.pack("!H", 600) + bytes(600)


@pytest.mark.parametrize(
    ("header", "info"),
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
            ProxyInfo("192.0.2.1", 56324, "198.51.100.2", 25),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8:0:0:0:0:0:2 0 65535\r\n",
            ProxyInfo("2001:db8::1", 0, "2001:db8::2", 65535),
        ),
        (b"PROXY UNKNOWN\r\n", UNKNOWN),
        (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n", UNKNOWN),
        (
            v2_inet("203.0.113.7", "198.51.100.2", 40000, 587),
            ProxyInfo("203.0.113.7", 40000, "198.51.100.2", 587),
        ),
        (
            v2_inet("2001:db8::7", "2001:db8::2", 1, 465),
            ProxyInfo("2001:db8::7", 1, "2001:db8::2", 465),
        ),
        (
            v2_inet("203.0.113.7", "198.51.100.2", 1, 2, tlvs=b"\x01\x00\x02h2"),
            ProxyInfo("203.0.113.7", 1, "198.51.100.2", 2),
        ),
        (v2(0x0, 0x00, b""), UNKNOWN),
        (v2(0x0, 0x11, bytes(12)), UNKNOWN),
        (v2(0x1, 0x00, b""), UNKNOWN),
        (v2(0x1, 0x31, bytes(216)), UNKNOWN),
    ],
)
def test_headers_are_parsed_and_smtp_bytes_left_alone(header: bytes, info: ProxyInfo) -> None:
    assert parse_proxy_header(header + SMTP) == (info, len(header))


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n",
        b"PROXY UNKNOWN\r\n",
        v2_inet("2001:db8::7", "2001:db8::2", 1, 465),
        v2_inet("203.0.113.7", "198.51.100.2", 1, 2, tlvs=LONG_TLV),
        v2(0x0, 0x00, b""),
    ],
)
def test_split_header_asks_for_more_until_complete(header: bytes) -> None:
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) == (None, 0)
    info, used = parse_proxy_header(header)
    assert info is not None
    assert used == len(header)


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client\r\n",
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
        b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
        b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 x\r\n",
        b"PROXY TCP4 192.0.2.\xff 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
        b"PROXY " + b"x" * 101,
        v2(0x1, 0x11, b"", version=1),
        v2(0x2, 0x11, bytes(12)),
        v2(0x1, 0x41, bytes(12)),
        v2(0x1, 0x13, bytes(12)),
        v2(0x1, 0x11, bytes(11)),
        v2(0x1, 0x21, bytes(35)),
    ],
)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_proxy_header(data)


def test_longest_v1_header_is_accepted() -> None:
    address = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = f"PROXY TCP6 {address} {address} 65535 65535\r\n".encode()
    assert len(header) == 104
    assert parse_proxy_header(header) == (ProxyInfo(address, 65535, address, 65535), 104)


def test_the_longest_v2_header_is_bounded_by_its_length_field() -> None:
    """The driver relies on this bound, not on a guess the way TCP splits could cross."""
    header = v2(0x0, 0x00, bytes(0xFFFF))
    assert len(header) == MAX_PROXY_HEADER
    assert parse_proxy_header(header[:-1]) == (None, 0)
    assert parse_proxy_header(header + SMTP) == (UNKNOWN, MAX_PROXY_HEADER)
