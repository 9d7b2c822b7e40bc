"""Client address normalisation and network membership (pure).

Every place that compares, logs or keys on a client address (trusted networks,
per-IP connection limits, greylist triplets, DNSBL queries) must see the same
spelling of it, or ``::ffff:192.0.2.1`` and ``192.0.2.1`` would count as two
clients. This module is that one spelling.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = ["ip_in", "normalize_ip", "parse_ip"]


#: Why memoised: one client's address is parsed by several checks for every message
#: of its session (ipaddress parses in Python, a few µs each). The objects are
#: immutable; a bad address raises and is not remembered.
@functools.lru_cache(maxsize=4096)
def parse_ip(ip: str) -> IPv4Address | IPv6Address:
    """Parse ``ip`` into its canonical address object.

    IPv4-mapped IPv6 addresses (a dual-stack socket's view of an IPv4 peer)
    become plain IPv4 so that IPv4 policy applies to them. Zone ids
    (``fe80::1%eth0``) are refused: they name a local interface, never a
    mail client, and would otherwise leak into keys and logs.
    """
    addr = ipaddress.ip_address(ip.strip())
    if isinstance(addr, IPv6Address):
        if addr.scope_id is not None:
            raise ValueError(f"zone id not allowed in client address: {ip!r}")
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr


@functools.lru_cache(maxsize=4096)
def normalize_ip(ip: str) -> str:
    """Return the canonical text form of ``ip`` (ValueError if it is not one).

    IPv6 comes back compressed and lower-case (RFC 5952 style, as Python
    prints it); IPv4-mapped IPv6 comes back as dotted-quad IPv4.
    """
    return str(parse_ip(ip))


def ip_in(ip: str, networks: Iterable[IPv4Network | IPv6Network]) -> bool:
    """Whether ``ip`` lies in any of ``networks`` (ValueError on a bad address).

    The address is normalised first, so an IPv4-mapped client matches IPv4
    networks; networks of the other family never match.
    """
    addr = parse_ip(ip)
    return any(net.version == addr.version and addr in net for net in networks)
