"""Client address normalisation and network membership."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from filter.netaddr import ip_in, normalize_ip, parse_ip


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:c000:0201", "192.0.2.1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        ("::1", "::1"),
        ("::", "::"),
        ("::192.0.2.1", "::c000:201"),  # deprecated IPv4-compatible: not mapped
        ("64:ff9b::192.0.2.1", "64:ff9b::c000:201"),  # NAT64 stays IPv6
    ],
)
def test_normalize(raw: str, canonical: str) -> None:
    assert normalize_ip(raw) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "localhost",
        "192.0.2.256",
        "192.0.2.01",
        "192.0.2",
        "fe80::1%eth0",
        "[::1]",
        "1.2.3.4/32",
    ],
)
def test_normalize_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_ip(bad)


def test_parse_ip_returns_ipv4_for_mapped() -> None:
    assert parse_ip("::ffff:10.0.0.1").version == 4


NETS = [ip_network("127.0.0.0/8"), ip_network("10.1.0.0/16"), ip_network("2001:db8::/32")]


@pytest.mark.parametrize(
    ("ip", "inside"),
    [
        ("127.0.0.1", True),
        ("10.1.255.255", True),
        ("10.2.0.0", False),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.2.0.1", False),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("::1", False),
        ("::7f00:1", False),  # IPv4-compatible is not IPv4
    ],
)
def test_ip_in(ip: str, inside: bool) -> None:
    assert ip_in(ip, NETS) is inside


def test_ip_in_empty_and_generator() -> None:
    assert ip_in("192.0.2.1", []) is False
    assert ip_in("192.0.2.1", (n for n in [ip_network("0.0.0.0/0")])) is True
    assert ip_in("2001:db8::1", [ip_network("0.0.0.0/0")]) is False


def test_ip_in_bad_address() -> None:
    with pytest.raises(ValueError):
        ip_in("nope", NETS)


def test_memoised_parse_stays_bounded_and_never_remembers_a_refusal() -> None:
    """parse_ip/normalize_ip are memoised: a bad address must raise every time (an
    exception is not a value to remember) and the memo must not grow without bound
    (a botnet's random IPv6 addresses)."""
    for _ in range(2):
        with pytest.raises(ValueError):
            parse_ip("fe80::1%eth0")
        with pytest.raises(ValueError):
            normalize_ip("192.0.2.256")
    assert parse_ip("192.0.2.7") is parse_ip(" 192.0.2.7".strip())
    for i in range(5000):
        normalize_ip(f"2001:db8::{i:x}")
    for fn in (parse_ip, normalize_ip):
        info = fn.cache_info()
        assert info.maxsize is not None and info.currsize <= info.maxsize
