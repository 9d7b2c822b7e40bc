"""HELO/EHLO sanity: what the client calls itself, as scored symbols (L3).

RFC 5321 4.1.1.1 asks for the client's fully qualified domain name or, when it
has none, an address literal of its own address; 4.1.4 forbids refusing mail
only because that name does not check out. So nothing here decides: each rule
is a symbol whose score the policy sets, and the admin weighs them.

The rules, each one symbol (a HELO may raise several):

- ``HELO_INVALID``: neither a domain nor an address literal in RFC 5321 syntax
  (``foo_bar``, ``a..b``, ``[garbage]``), or a name DNS cannot hold.
- ``HELO_BARE_IP``: an address without brackets (``192.0.2.1``): RFC 5321 wants
  ``[192.0.2.1]``; real MTAs write it right, spam software often does not.
- ``HELO_LITERAL_MISMATCH``: an address literal that is not the client's address.
- ``HELO_NOT_FQDN``: a single label (``DESKTOP-1``), a numeric top label, or a
  top label that no public host has (``localdomain``, ``local``, ...).
- ``HELO_OURS``: our own host name or one of our listening addresses: a client
  claiming to be the server it talks to is forging (the strongest rule). It
  replaces ``HELO_LITERAL_MISMATCH`` (the same fact, said louder) but adds to
  ``HELO_BARE_IP`` (a different fact: bad syntax).
- ``HELO_NXDOMAIN``: a well-formed FQDN that does not exist in DNS (one A
  lookup; NODATA is fine: the name exists). A temporary DNS error raises no
  symbol: it says nothing about the client.

Result words: there is no RFC 8601 method for HELO sanity, so the check uses
three of its words with one meaning each: ``pass`` (no rule fired), ``fail``
(at least one did), ``none`` (no HELO to judge, or disabled). A failed DNS
lookup never turns into ``temperror`` here: the syntax rules stand without it,
and ``data["lookup"]`` tells.

Result ``data`` keys: ``helo`` (as received), ``lookup`` ("ok", "nxdomain",
"nodata", "temperror", "skipped"), ``reason``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from filter.checks import Context
from filter.model import Stage
from filter.netaddr import parse_ip
from filter.policy.schema import Policy
from filter.resolver import DNSTempError, Resolver
from filter.results import CheckResult, Symbol
from filter.smtpsyntax import is_domain_or_literal
from filter.units import is_ip

__all__ = [
    "NON_PUBLIC_TLDS",
    "Assessment",
    "HeloCheck",
    "Own",
    "assess",
    "build_result",
    "own_identity",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Top labels no host on the public internet can have: RFC 6761/6762 special
# names, ICANN's private-use "internal", and the ubiquitous default of
# misconfigured Unix hosts ("localhost.localdomain"). "test" and "example" are
# special too, but test networks (and ours) use them for real mail.
NON_PUBLIC_TLDS = frozenset({"localhost", "localdomain", "local", "invalid", "internal"})


@dataclass(frozen=True)
class Own:
    """What the server calls itself: host names (lower case) and listening addresses."""

    names: frozenset[str] = frozenset()
    addresses: frozenset[IPAddress] = frozenset()


def own_identity(hostname: str, listen_hosts: Iterable[str]) -> Own:
    """Our names and addresses as a HELO would spell them.

    Wildcard listeners (``0.0.0.0``, ``::``) name no address and a one-label
    machine name (an unconfigured ``server.hostname``) is not one a client would
    copy from our banner by accident, so neither counts.
    """
    name = hostname.strip().rstrip(".").lower()
    names = frozenset({name}) if "." in name else frozenset()
    addresses = set()
    for host in listen_hosts:
        if is_ip(host):
            addr = parse_ip(host)
            if not addr.is_unspecified:
                addresses.add(addr)
    return Own(names, frozenset(addresses))


@dataclass(frozen=True)
class Assessment:
    """The syntax rules' findings, and the name to look up in DNS (None: no lookup)."""

    findings: tuple[tuple[str, str], ...]  # (symbol, detail)
    lookup: str | None = None


def _parse_literal(literal: str) -> IPAddress | None:
    """The address inside ``[...]``: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``.

    A bracketed IPv6 address without the ``IPv6:`` tag is sloppy but unambiguous,
    so it is read as meant; anything else (other tags, leading zeros, garbage)
    is None.
    """
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            addr: IPAddress = ipaddress.IPv6Address(inner[5:])
        else:
            addr = ipaddress.ip_address(inner)
    except ValueError:
        return None
    # A zone id ("%eth0") names an interface of the host that wrote it: no literal.
    return None if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id else addr


def _plain(addr: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 as the IPv4 address it is, as the client's and ours are kept."""
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return mapped or addr


def _same(addr: IPAddress, client_ip: str) -> bool:
    """Whether ``addr`` is the client's address (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        return _plain(addr) == parse_ip(client_ip)
    except ValueError:
        return False


def assess(helo: str, client_ip: str, own: Own) -> Assessment:
    """The pure HELO rules (see the module docstring); DNS is the caller's part."""
    name = helo.strip()
    if not name:
        return Assessment(())
    if name.startswith("[") and name.endswith("]"):
        addr = _parse_literal(name)
        if addr is None:
            return Assessment((("HELO_INVALID", f"{name} is not an address literal"),))
        if _same(addr, client_ip):
            return Assessment(())
        if _plain(addr) in own.addresses:
            return Assessment((("HELO_OURS", f"{name} is our own address"),))
        detail = f"{name} is not the client's address {client_ip}"
        return Assessment((("HELO_LITERAL_MISMATCH", detail),))
    bare = name.removesuffix(".")
    if is_ip(bare):
        try:
            addr = parse_ip(bare)
        except ValueError:  # a zone id, "fe80::1%eth0": no address a client can have
            return Assessment((("HELO_INVALID", f"{name!r} is not an address literal"),))
        findings = [("HELO_BARE_IP", f"{name} is an address without [brackets]")]
        if addr in own.addresses:
            findings.append(("HELO_OURS", f"{name} is our own address"))
        return Assessment(tuple(findings))
    host = bare.lower()
    if not is_domain_or_literal(name) or any(len(x) > 63 for x in host.split(".")):
        return Assessment((("HELO_INVALID", f"{name!r} is not a domain name"),))
    if host in own.names:
        return Assessment((("HELO_OURS", f"{name} is our own host name"),))
    top = host.rsplit(".", 1)[-1]
    if "." not in host:
        return Assessment((("HELO_NOT_FQDN", f"{name} is a single label"),))
    if top.isdigit() or top in NON_PUBLIC_TLDS:
        return Assessment((("HELO_NOT_FQDN", f"{name} has no public top-level domain"),))
    return Assessment((), lookup=host)


def build_result(
    helo: str, findings: Iterable[tuple[str, str]], lookup: str, policy: Policy
) -> CheckResult:
    """``fail`` with one symbol per finding, else ``pass``; never a decision."""
    symbols = tuple(Symbol(name, policy.score(name), detail) for name, detail in findings)
    word = "fail" if symbols else "pass"
    reason = "; ".join(s.detail for s in symbols) or f"{helo} looks like a host name"
    return CheckResult(
        "helo", word, symbols, None, {"helo": helo, "lookup": lookup, "reason": reason}
    )


async def _lookup(resolver: Resolver, host: str) -> tuple[str, tuple[str, str] | None]:
    """(lookup outcome, extra finding) for a well-formed FQDN."""
    try:
        res = await resolver.resolve(host, "A")
    except DNSTempError:
        return "temperror", None
    except ValueError:  # IDNA refuses it: no DNS name, so no host name either
        return "skipped", ("HELO_INVALID", f"{host!r} cannot be a DNS name")
    if res.outcome == "nxdomain":
        return res.outcome, ("HELO_NXDOMAIN", f"{host} does not exist in DNS")
    return res.outcome, None


class HeloCheck:
    """HELO/EHLO name sanity at HELO: scored symbols only."""

    name = "helo"
    stage = Stage.HELO
    needs: tuple[str, ...] = ()

    async def run(self, ctx: Context) -> CheckResult:
        policy = ctx.policy
        helo = (ctx.client.helo or "").strip()
        if not policy.helo.enabled:
            return CheckResult("helo", "none", (), None, {"reason": "disabled by policy"})
        if not helo:
            return CheckResult("helo", "none", (), None, {"helo": "", "reason": "no HELO"})
        # effective_hostname may ask the system once; the session asked it already
        # for its banner, so this is a cached value, not a lookup on the loop.
        own = own_identity(policy.server.effective_hostname, (a.host for a in policy.server.listen))
        found = assess(helo, ctx.client.ip, own)
        findings = list(found.findings)
        outcome = "skipped"
        if found.lookup is not None and ctx.resolver is not None:
            outcome, extra = await _lookup(ctx.resolver, found.lookup)
            if extra is not None:
                findings.append(extra)
        return build_result(helo, findings, outcome, policy)
