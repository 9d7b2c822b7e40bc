"""Unit parsers: what admins may write in the policy, and what they get told when it is wrong."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from filter.units import (
    Address,
    format_duration,
    format_size,
    parse_address,
    parse_duration,
    parse_network,
    parse_size,
)

DURATIONS: list[tuple[Any, float]] = [
    (30, 30.0),
    (1.5, 1.5),
    (0, 0.0),
    ("0", 0.0),
    ("90", 90.0),
    ("90s", 90.0),
    ("500ms", 0.5),
    ("1.5m", 90.0),
    ("5m", 300.0),
    ("2h", 7200.0),
    ("35d", 35 * 86400.0),
    ("1w", 604800.0),
    (" 5m ", 300.0),
    ("5 m", 300.0),
]


@pytest.mark.parametrize(("raw", "seconds"), DURATIONS)
def test_parse_duration(raw: Any, seconds: float) -> None:
    assert parse_duration(raw) == seconds


BAD_DURATIONS: list[tuple[Any, str]] = [
    (True, "got true"),
    (False, "got false"),
    (-1, "cannot be negative"),
    ("-5m", 'expected a duration like "90s"'),
    ("5min", "unknown duration unit 'min'"),
    ("5M", "unknown duration unit 'M'"),
    ("m", 'expected a duration like "90s"'),
    ("", 'expected a duration like "90s"'),
    ("1h30m", 'expected a duration like "90s"'),
    (float("nan"), "got nan"),
    (float("inf"), "got inf"),
    ([1], "got an array"),
    (None, "got None"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_DURATIONS)
def test_parse_duration_rejects(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(raw)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (1.5, "1.5s"),
        (0.5, "0.5s"),
        (0.25, "0.25s"),
        (0.005, "5ms"),
        (0.001, "1ms"),
        (90, "90s"),
        (300, "5m"),
        (5400, "90m"),
        (7200, "2h"),
        (172800, "2d"),
        (35 * 86400, "35d"),
        (604800, "7d"),
        (0.1234, "0.1234s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


SIZES: list[tuple[Any, int]] = [
    (0, 0),
    (1000, 1000),
    ("1000", 1000),
    ("1000B", 1000),
    ("512KiB", 512 * 1024),
    ("25MiB", 25 * 1024**2),
    ("25mib", 25 * 1024**2),
    ("1GiB", 1024**3),
    ("1.5MiB", 1572864),
    ("10MB", 10 * 10**6),
    ("100kB", 100_000),
    ("2TB", 2 * 10**12),
]


@pytest.mark.parametrize(("raw", "size"), SIZES)
def test_parse_size(raw: Any, size: int) -> None:
    assert parse_size(raw) == size


BAD_SIZES: list[tuple[Any, str]] = [
    (True, "got true"),
    (-1, "cannot be negative"),
    (1.5, "got 1.5"),
    ("100k", r"ambiguous .* 100KiB .* 100kB"),
    ("10M", r"ambiguous .* 10MiB .* 10MB"),
    ("10 furlongs", "unknown size unit 'furlongs'"),
    ("1.3B", "not a whole number of bytes"),
    ("MiB", 'expected a size like "25MiB"'),
    ("", 'expected a size like "25MiB"'),
]


@pytest.mark.parametrize(("raw", "message"), BAD_SIZES)
def test_parse_size_rejects(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(raw)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1000, "1kB"),
        (1023, "1023"),
        (1024, "1KiB"),
        (25 * 1024**2, "25MiB"),
        (1572864, "1536KiB"),
        (10 * 10**6, "10MB"),
        (1024**3, "1GiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


ADDRESSES: list[tuple[str, int | None, Address]] = [
    ("0.0.0.0:25", None, Address("0.0.0.0", 25)),
    ("[::]:25", None, Address("::", 25)),
    ("[2001:db8::1]:10025", None, Address("2001:db8::1", 10025)),
    ("localhost:10025", None, Address("localhost", 10025)),
    ("mx.example.org:25", None, Address("mx.example.org", 25)),
    ("127.0.0.1", 53, Address("127.0.0.1", 53)),
    ("::1", 53, Address("::1", 53)),
    ("[::1]", 53, Address("::1", 53)),
    ("127.0.0.1:5353", 53, Address("127.0.0.1", 5353)),
    ("127.0.0.1:0", None, Address("127.0.0.1", 0)),
]


@pytest.mark.parametrize(("raw", "default_port", "expected"), ADDRESSES)
def test_parse_address(raw: str, default_port: int | None, expected: Address) -> None:
    assert parse_address(raw, default_port) == expected


BAD_ADDRESSES: list[tuple[Any, int | None, str]] = [
    ("127.0.0.1", None, "missing port"),
    ("::1", None, "missing port"),
    ("[::1]", None, "missing port"),
    ("127.0.0.1:99999", None, "out of range"),
    ("127.0.0.1:smtp", None, "not a number"),
    ("127.0.0.1:", None, "not a number"),
    (":25", None, "missing host"),
    ("[127.0.0.1]:25", None, "not an IPv6 address"),
    ("[::1:25", None, r"missing '\]'"),
    ("[::1]25", None, "unexpected"),
    ("::1:25:x", 25, "not an address"),
    ("bad host:25", None, "neither an IP address nor a host name"),
    (25, None, "expected an address"),
]


@pytest.mark.parametrize(("raw", "default_port", "message"), BAD_ADDRESSES)
def test_parse_address_rejects(raw: Any, default_port: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(raw, default_port)


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("0.0.0.0", 25), "0.0.0.0:25"),
        (Address("::", 25), "[::]:25"),
        (Address("localhost", 10025), "localhost:10025"),
    ],
)
def test_address_str_round_trips(address: Address, text: str) -> None:
    assert str(address) == text
    assert parse_address(text) == address


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1/32", "127.0.0.1/32"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("::1", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        (" 10.0.0.0/8 ", "10.0.0.0/8"),
    ],
)
def test_parse_network(raw: str, expected: str) -> None:
    assert parse_network(raw) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("10.0.0.1/8", 'host bits set; did you mean "10.0.0.0/8"'),
        ("2001:db8::1/32", 'did you mean "2001:db8::/32"'),
        ("10.0.0.0/33", "not a network"),
        ("example.org", "not a network"),
        ("", "not a network"),
        (True, "expected a network"),
    ],
)
def test_parse_network_rejects(raw: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_network(raw)
