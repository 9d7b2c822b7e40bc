"""HAProxy PROXY protocol v1/v2 header parser (pure, sans-I/O).

Behind a TCP load balancer the socket peer is the balancer, not the mail
client; SPF, DNSBL, greylisting and XCLIENT all need the real client address,
which the balancer sends in this header before any SMTP byte. Written from
haproxy's ``doc/proxy-protocol.txt``. The caller feeds whatever bytes it has
read; the parser says "need more", "here is the header and its length", or
raises. It never reads past the header, so the remaining bytes belong to SMTP.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from filter.netaddr import normalize_ip

__all__ = [
    "MAX_HEADER",
    "MAX_V1_LINE",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "crc32c",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
# The spec's worst case line: "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n".
MAX_V1_LINE = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# The spec sizes a v2 header to fit the smallest TCP segment every host must
# accept (536 bytes), so that it always arrives in one read. Anything longer is
# refused instead of letting an unauthenticated peer make us buffer 64 KiB.
MAX_HEADER = 536

_V2_ADDR_LEN = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX
_V2_FAMILY = {0x0: "UNKNOWN", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}
_PP2_TYPE_CRC32C = 0x03


class ProxyProtocolError(ValueError):
    """The peer sent something that is not a valid PROXY header; drop it."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer told us about the connection.

    ``src``/``dst`` are ``None`` when the header carries no usable IP endpoint
    (LOCAL command, UNKNOWN or UNIX family): the caller keeps the socket peer.
    """

    version: int
    command: str  # "PROXY" | "LOCAL"
    family: str  # "TCP4" | "TCP6" | "UNKNOWN" | "UNIX"
    src: tuple[str, int] | None
    dst: tuple[str, int] | None


def parse_proxy_header(buf: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header at the start of ``buf``.

    Returns ``None`` while ``buf`` is a valid but incomplete beginning, else the
    header and the number of bytes it occupies. Raises ProxyProtocolError as
    soon as the bytes cannot become a valid header, so a client that is not a
    balancer (or speaks SMTP first) is refused without waiting for a timeout.
    """
    if buf[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(buf)
    if buf[:1] == V1_PREFIX[:1]:
        return _parse_v1(buf)
    if not buf:
        return None
    raise ProxyProtocolError("no PROXY protocol signature")


# --- v1 (text) ---------------------------------------------------------------


def _parse_v1(buf: bytes) -> tuple[ProxyHeader, int] | None:
    head = buf[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise ProxyProtocolError("bad v1 signature")
    end = buf.find(b"\n", 0, MAX_V1_LINE)
    if end < 0:
        if len(buf) >= MAX_V1_LINE:
            raise ProxyProtocolError(f"v1 line longer than {MAX_V1_LINE} bytes")
        if b"\r" in buf[:-1]:
            raise ProxyProtocolError("bare CR in v1 line")
        return None
    if end == 0 or buf[end - 1 : end] != b"\r":
        raise ProxyProtocolError("v1 line not terminated by CRLF")
    try:
        line = buf[: end - 1].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("non-ASCII byte in v1 line") from None
    if "\r" in line:
        raise ProxyProtocolError("bare CR in v1 line")
    return _parse_v1_line(line), end + 1


def _parse_v1_line(line: str) -> ProxyHeader:
    fields = line.split(" ")
    proto = fields[1] if len(fields) > 1 else ""
    if proto == "UNKNOWN":
        # The spec tells receivers to ignore whatever follows UNKNOWN.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"bad v1 protocol {proto!r}")
    if len(fields) != 6:
        raise ProxyProtocolError("v1 line needs exactly 4 fields after the protocol")
    version = 4 if proto == "TCP4" else 6
    src_ip = _v1_address(fields[2], version)
    dst_ip = _v1_address(fields[3], version)
    src_port = _v1_port(fields[4])
    dst_port = _v1_port(fields[5])
    return ProxyHeader(1, "PROXY", proto, (src_ip, src_port), (dst_ip, dst_port))


def _v1_address(text: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"bad v1 address {text!r}") from None
    if addr.version != version:
        raise ProxyProtocolError(f"address {text!r} does not match TCP{version}")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ProxyProtocolError(f"zone id in v1 address {text!r}")
    return normalize_ip(text)


def _v1_port(text: str) -> int:
    # Plain decimal only: int() would also take "+25", " 25" or "2_5".
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise ProxyProtocolError(f"bad v1 port {text!r}")
    if len(text) > 1 and text[0] == "0":
        raise ProxyProtocolError(f"leading zero in v1 port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 port out of range {text!r}")
    return port


# --- v2 (binary) -------------------------------------------------------------


def _parse_v2(buf: bytes) -> tuple[ProxyHeader, int] | None:
    sig = buf[: len(V2_SIGNATURE)]
    if sig != V2_SIGNATURE[: len(sig)]:
        raise ProxyProtocolError("bad v2 signature")
    if len(buf) < V2_FIXED:
        # Validate the version/command and family bytes as soon as they arrive.
        if len(buf) > 12:
            _v2_command(buf[12])
        if len(buf) > 13:
            _v2_family(buf[13])
        return None
    command = _v2_command(buf[12])
    family_code = _v2_family(buf[13])
    (length,) = struct.unpack_from("!H", buf, 14)
    total = V2_FIXED + length
    if total > MAX_HEADER:
        raise ProxyProtocolError(f"v2 header of {total} bytes exceeds {MAX_HEADER}")
    if len(buf) < total:
        return None
    body = buf[V2_FIXED:total]
    family = _V2_FAMILY[family_code]
    if command == "LOCAL" or family_code == 0x0:
        # LOCAL is the balancer's own health check, UNSPEC an unsupported
        # protocol: the spec says to keep the real endpoints and ignore the
        # address block (whose layout is then unspecified, so no TLV walk).
        return ProxyHeader(2, command, family, None, None), total
    addr_len = _V2_ADDR_LEN[family_code]
    if len(body) < addr_len:
        raise ProxyProtocolError(f"v2 address block of {len(body)} bytes too short for {family}")
    _check_tlvs(buf[:total], addr_len)
    if family_code == 0x3:
        return ProxyHeader(2, command, family, None, None), total
    src, dst = _v2_addresses(body, family_code)
    return ProxyHeader(2, command, family, src, dst), total


def _v2_command(byte: int) -> str:
    if byte >> 4 != 2:
        raise ProxyProtocolError(f"unsupported v2 version {byte >> 4}")
    cmd = byte & 0x0F
    if cmd == 0x0:
        return "LOCAL"
    if cmd == 0x1:
        return "PROXY"
    raise ProxyProtocolError(f"unknown v2 command {cmd}")


def _v2_family(byte: int) -> int:
    family, transport = byte >> 4, byte & 0x0F
    if family not in _V2_FAMILY:
        raise ProxyProtocolError(f"unknown v2 address family {family}")
    if transport == 0x2:
        raise ProxyProtocolError("v2 DGRAM transport on a stream listener")
    if transport not in (0x0, 0x1):
        raise ProxyProtocolError(f"unknown v2 transport {transport}")
    return family


def _v2_addresses(body: bytes, family_code: int) -> tuple[tuple[str, int], tuple[str, int]]:
    if family_code == 0x1:
        s, d, sp, dp = struct.unpack_from("!4s4sHH", body)
        return (str(ipaddress.IPv4Address(s)), sp), (str(ipaddress.IPv4Address(d)), dp)
    s, d, sp, dp = struct.unpack_from("!16s16sHH", body)
    src = normalize_ip(str(ipaddress.IPv6Address(s)))
    dst = normalize_ip(str(ipaddress.IPv6Address(d)))
    return (src, sp), (dst, dp)


def _check_tlvs(header: bytes, addr_len: int) -> None:
    """Walk the TLVs after the address block; each must fit exactly.

    Unknown types are skipped as the spec requires. A CRC32C TLV, when
    present, is verified, since a receiver that understands it must.
    """
    pos = V2_FIXED + addr_len
    end = len(header)
    while pos < end:
        if end - pos < 3:
            raise ProxyProtocolError("truncated v2 TLV header")
        kind = header[pos]
        (length,) = struct.unpack_from("!H", header, pos + 1)
        value_at = pos + 3
        if value_at + length > end:
            raise ProxyProtocolError("v2 TLV runs past the header")
        if kind == _PP2_TYPE_CRC32C:
            if length != 4:
                raise ProxyProtocolError("v2 CRC32C TLV must be 4 bytes")
            zeroed = header[:value_at] + b"\x00\x00\x00\x00" + header[value_at + 4 :]
            (expected,) = struct.unpack_from("!I", header, value_at)
            if crc32c(zeroed) != expected:
                raise ProxyProtocolError("v2 CRC32C mismatch")
        pos = value_at + length


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum the v2 CRC32C TLV carries."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
