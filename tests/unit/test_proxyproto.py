"""PROXY protocol v1/v2 parser: valid headers, every split point, malformed input."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from filter.proxyproto import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    crc32c,
    parse_proxy_header,
)

SMTP = b"EHLO client.example\r\n"


def v2(
    ver_cmd: int = 0x21,
    fam: int = 0x11,
    body: bytes = b"",
    length: int | None = None,
) -> bytes:
    """Build a v2 header; ``length`` overrides the declared body length."""
    declared = len(body) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", declared) + body


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 56324 25\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_TCP4 = v2(body=inet4("192.0.2.1", "198.51.100.2", 56324, 25))
V2_TCP6 = v2(fam=0x21, body=inet6("2001:db8::1", "2001:db8::2", 56324, 25))
V2_LOCAL = v2(ver_cmd=0x20, fam=0x00)

VALID: list[tuple[str, bytes, ProxyHeader]] = [
    (
        "v1 tcp4",
        V1_TCP4,
        ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.1", 56324), ("198.51.100.2", 25)),
    ),
    (
        "v1 tcp6 canonicalised",
        V1_TCP6,
        ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::1", 56324), ("2001:db8::2", 25)),
    ),
    (
        "v1 tcp6 ipv4-mapped",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.2 1 65535\r\n",
        ProxyHeader(1, "PROXY", "TCP6", ("192.0.2.1", 1), ("198.51.100.2", 65535)),
    ),
    ("v1 unknown", V1_UNKNOWN, ProxyHeader(1, "PROXY", "UNKNOWN", None, None)),
    (
        "v1 unknown with ignored rest",
        b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None),
    ),
    (
        "v1 port zero",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 0 25\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.1", 0), ("198.51.100.2", 25)),
    ),
    (
        "v2 tcp4",
        V2_TCP4,
        ProxyHeader(2, "PROXY", "TCP4", ("192.0.2.1", 56324), ("198.51.100.2", 25)),
    ),
    (
        "v2 tcp6",
        V2_TCP6,
        ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 56324), ("2001:db8::2", 25)),
    ),
    (
        "v2 tcp6 ipv4-mapped",
        v2(fam=0x21, body=inet6("::ffff:192.0.2.1", "::ffff:198.51.100.2", 5, 25)),
        ProxyHeader(2, "PROXY", "TCP6", ("192.0.2.1", 5), ("198.51.100.2", 25)),
    ),
    ("v2 local", V2_LOCAL, ProxyHeader(2, "LOCAL", "UNKNOWN", None, None)),
    (
        "v2 local ignores address block",
        v2(ver_cmd=0x20, fam=0x11, body=b"\x00\x01"),
        ProxyHeader(2, "LOCAL", "TCP4", None, None),
    ),
    (
        "v2 proxy unspec",
        v2(fam=0x00, body=b"whatever"),
        ProxyHeader(2, "PROXY", "UNKNOWN", None, None),
    ),
    (
        "v2 unix",
        v2(fam=0x31, body=b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),
        ProxyHeader(2, "PROXY", "UNIX", None, None),
    ),
    (
        "v2 tcp4 with tlvs",
        v2(
            body=inet4("192.0.2.1", "198.51.100.2", 1, 25)
            + tlv(0x02, b"mx.example")
            + tlv(0x04, b"")
            + tlv(0xE0, b"x" * 100)
        ),
        ProxyHeader(2, "PROXY", "TCP4", ("192.0.2.1", 1), ("198.51.100.2", 25)),
    ),
    (
        "v2 transport unspec",
        v2(fam=0x10, body=inet4("192.0.2.1", "198.51.100.2", 1, 25)),
        ProxyHeader(2, "PROXY", "TCP4", ("192.0.2.1", 1), ("198.51.100.2", 25)),
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [(r, e) for _, r, e in VALID], ids=[n for n, *_ in VALID]
)
def test_valid_headers_and_consumed_length(raw: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(raw) == (expected, len(raw))
    # Bytes after the header are SMTP and must not be consumed.
    assert parse_proxy_header(raw + SMTP) == (expected, len(raw))


@pytest.mark.parametrize("raw", [r for _, r, _ in VALID], ids=[n for n, *_ in VALID])
def test_every_split_point_needs_more(raw: bytes) -> None:
    for cut in range(len(raw)):
        assert parse_proxy_header(raw[:cut]) is None, cut


def with_crc(body_without_crc: bytes, fam: int = 0x11) -> bytes:
    body = body_without_crc + tlv(0x03, b"\0\0\0\0")
    header = v2(fam=fam, body=body)
    return header[:-4] + struct.pack("!I", crc32c(header))


def test_crc32c_known_vector() -> None:
    # RFC 3720 B.4: 32 bytes of zeros.
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"123456789") == 0xE3069283


def test_v2_crc32c_verified() -> None:
    raw = with_crc(inet4("192.0.2.1", "198.51.100.2", 1, 25))
    result = parse_proxy_header(raw)
    assert result is not None
    assert result[0].src == ("192.0.2.1", 1)
    broken = raw[:-1] + bytes([raw[-1] ^ 0xFF])
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse_proxy_header(broken)


MALFORMED: list[tuple[str, bytes]] = [
    ("smtp first", b"EHLO x\r\n"),
    ("lower-case proxy", b"proxy TCP4 192.0.2.1 198.51.100.2 1 25\r\n"),
    ("wrong v1 prefix", b"PROXX"),
    ("v1 bare LF", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 25\n"),
    ("v1 bare CR", b"PROXY TCP4 192.0.2.1\r198.51.100.2 1 25\r\n"),
    ("v1 bare CR before more", b"PROXY TCP4 192.0.2.1\rX"),
    ("v1 too long", b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n"),
    ("v1 no CRLF within 107", b"PROXY TCP4 " + b"1" * 200),
    ("v1 bad protocol", b"PROXY TCP5 192.0.2.1 198.51.100.2 1 25\r\n"),
    ("v1 empty protocol", b"PROXY \r\n"),
    ("v1 double space", b"PROXY TCP4  192.0.2.1 198.51.100.2 1 25\r\n"),
    ("v1 missing port", b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n"),
    ("v1 extra field", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 25 x\r\n"),
    ("v1 trailing space", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 25 \r\n"),
    ("v1 bad ipv4", b"PROXY TCP4 192.0.2.300 198.51.100.2 1 25\r\n"),
    ("v1 ipv4 leading zero", b"PROXY TCP4 192.0.2.01 198.51.100.2 1 25\r\n"),
    ("v1 hostname", b"PROXY TCP4 mx.example 198.51.100.2 1 25\r\n"),
    ("v1 ipv6 under tcp4", b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n"),
    ("v1 ipv4 under tcp6", b"PROXY TCP6 192.0.2.1 2001:db8::2 1 25\r\n"),
    ("v1 zone id", b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 25\r\n"),
    ("v1 port too big", b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n"),
    ("v1 port negative", b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 25\r\n"),
    ("v1 port plus", b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 25\r\n"),
    ("v1 port leading zero", b"PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\n"),
    ("v1 port underscore", b"PROXY TCP4 192.0.2.1 198.51.100.2 1_0 25\r\n"),
    ("v1 port unicode digit", "PROXY TCP4 192.0.2.1 198.51.100.2 ١ 25\r\n".encode()),
    ("v1 non-ascii", b"PROXY UNKNOWN \xff\r\n"),
    ("v2 bad signature", V2_SIGNATURE[:11] + b"X" + bytes(4)),
    ("v2 bad signature early", b"\r\n\r\nX"),
    ("v2 version 1", v2(ver_cmd=0x11)),
    ("v2 version 3", v2(ver_cmd=0x31)),
    ("v2 unknown command", v2(ver_cmd=0x22)),
    ("v2 unknown family", v2(fam=0x41)),
    ("v2 unknown transport", v2(fam=0x13)),
    ("v2 dgram", v2(fam=0x12, body=inet4("192.0.2.1", "198.51.100.2", 1, 25))),
    ("v2 inet short", v2(body=inet4("192.0.2.1", "198.51.100.2", 1, 25)[:11])),
    ("v2 inet6 short", v2(fam=0x21, body=inet4("192.0.2.1", "198.51.100.2", 1, 25))),
    ("v2 unix short", v2(fam=0x31, body=bytes(215))),
    ("v2 empty proxy inet", v2()),
    ("v2 over max header", v2(length=MAX_HEADER - 16 + 1)),
    ("v2 max length", v2(length=0xFFFF)),
    ("v2 truncated tlv", v2(body=inet4("192.0.2.1", "198.51.100.2", 1, 25) + b"\x02\x00")),
    (
        "v2 tlv past end",
        v2(body=inet4("192.0.2.1", "198.51.100.2", 1, 25) + b"\x02\x00\x05abc"),
    ),
    (
        "v2 crc wrong length",
        v2(body=inet4("192.0.2.1", "198.51.100.2", 1, 25) + tlv(0x03, b"\0\0")),
    ),
]


@pytest.mark.parametrize("raw", [r for _, r in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_raises(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(raw)


def test_error_is_a_value_error() -> None:
    assert issubclass(ProxyProtocolError, ValueError)


def test_v2_header_errors_before_body_arrives() -> None:
    # A bad version byte is refused without waiting for the rest.
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(V2_SIGNATURE + b"\x11")
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(V2_SIGNATURE + b"\x21\x41")
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(v2(length=0xFFFF)[:16])


def test_v1_at_exact_limit_is_accepted() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(line) == 107
    result = parse_proxy_header(line)
    assert result is not None and result[1] == 107


def test_v2_at_max_header_is_accepted() -> None:
    addr = inet4("192.0.2.1", "198.51.100.2", 1, 25)
    pad = MAX_HEADER - 16 - len(addr) - 3
    raw = v2(body=addr + tlv(0xEE, b"p" * pad))
    assert len(raw) == MAX_HEADER
    result = parse_proxy_header(raw)
    assert result is not None and result[1] == MAX_HEADER


def test_empty_needs_more() -> None:
    assert parse_proxy_header(b"") is None


def test_random_mutations_only_raise_proxy_errors() -> None:
    """Flipped bytes give a header, "need more", or ProxyProtocolError; nothing else."""
    rng = random.Random(1)
    seeds = [raw for _, raw, _ in VALID]
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.randint(0, len(data))
        try:
            result = parse_proxy_header(bytes(data[:cut]))
        except ProxyProtocolError:
            continue
        if result is not None:
            assert 0 < result[1] <= cut
