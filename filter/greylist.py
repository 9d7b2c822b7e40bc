"""Greylisting's pure logic (L1): what a triplet is, and the allowlist matching rules.

A greylist triplet is (client origin, sender, recipient). Each part is normalised
here, once, because two spellings of one sender would be two triplets: the retry
would be greylisted again and a legitimate message delayed twice.

* Origin: the client's network (``ipv4_prefix``/``ipv6_prefix``), since big senders
  retry from another address of the same farm; or, in pool-aware mode, the
  SPF-authenticated sender domain (``spf:example.org``), since a pool spread over
  several networks is still one sender when SPF vouches for all its addresses.
* Sender: lower-cased, with per-message tags removed: BATV (``prvs=TAG=user@``, and
  ``prvs=user=TAG@`` as some MTAs write it), SRS (``SRS0=…=domain=user@forwarder`` is
  really ``user@domain``) and a ``+extension`` (never ``-``: it is part of many real
  names). These change on every message (or every retry, for BATV), which would
  otherwise make every retry a new triplet. A quoted local part that needs no quotes
  is the same mailbox unquoted (RFC 5321 4.1.2); any other is kept whole. In the
  triplet (not in list matching) each standalone run of digits in the local part is
  ``#``, as postgrey does: VERP bounce addresses (``bounce-12345-678@lists``) number
  every message, and a retry of one would otherwise never meet its first attempt.
* Recipient: lower-cased; its ``+extension`` kept (it may be a different mailbox).

The store keys a triplet by a one-way hash of these three strings (fixed length,
no separators to escape); the readable parts are stored alongside for the admin.

No I/O here: the store (L2) and the check (L3) build on it.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from filter.domains import to_a_label
from filter.netaddr import parse_ip
from filter.units import Network, is_hostname

__all__ = [
    "MIN_ALLOW_PREFIX",
    "AllowTarget",
    "Triplet",
    "allow_argument",
    "allow_fields",
    "client_network",
    "covering_networks",
    "domain_matches",
    "normalise_domain",
    "normalise_recipient",
    "normalise_sender",
    "parse_allow_target",
    "parse_forget_target",
    "rdns_matches",
    "recipient_matches",
    "triplet_digest",
    "triplet_sender",
]

# The widest networks an admin may allowlist by `mailgate greylist allow`: wider would
# make the per-lookup candidate list long and is almost certainly a typo.
MIN_ALLOW_PREFIX = {4: 8, 6: 16}

# BATV (draft-levine-smtp-batv): "prvs=" + 4 digits key/day + 6 hex hash + "=" + local.
# A few MTAs add a variant keyword (msprvs1=) or Barracuda's "btv1==…==" form.
_BATV = re.compile(r"^(?:prvs|msprvs1)=[0-9a-z]{4,16}=(?P<local>.+)$|^btv1==[^=]+==(?P<b>.+)$")
# Some MTAs write the tag last ("prvs=user=0123abcdef"), as postgrey also undoes: only
# when the last part is a strict prvs tag (key digit, 3-digit day, 6 hex) and the
# first is not, or "user" would be taken for the tag and every message differ.
_BATV_REVERSED = re.compile(r"^prvs=(?P<local>[^=]+)=(?P<tag>[0-9]{4}[0-9a-f]{6})$")
_PRVS_TAG = re.compile(r"^[0-9]{4}[0-9a-f]{6}$")
# RFC 5321 4.1.2 dot-atom: a quoted local part made of these is the same mailbox unquoted.
_DOT_ATOM = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
# SRS (Shen's scheme, as libsrs2/postsrsd write it): the separator after SRS0/SRS1
# may be "=", "+" or "-"; hash and timestamp come before the original domain and
# local part. SRS1 wraps an SRS0 address of an earlier forwarder after "==".
_SRS0 = re.compile(r"^srs0[=+-][^=]+=[^=]+=(?P<domain>[^=]+)=(?P<local>.+)$")
_SRS1 = re.compile(r"^srs1[=+-][^=]+=[^=]+==[^=]+=[^=]+=(?P<domain>[^=]+)=(?P<local>.+)$")


@functools.lru_cache(maxsize=16384)
def client_network(ip: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client's network as CIDR text (``192.0.2.0/24``, ``2001:db8::/64``).

    IPv4-mapped IPv6 counts as IPv4 (netaddr's one spelling of a client), so a
    dual-stack listener and a plain one key the same client alike.
    """
    addr = parse_ip(ip)
    prefix = ipv4_prefix if addr.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@functools.lru_cache(maxsize=2048)
def covering_networks(ip: str) -> tuple[str, ...]:
    """Every network an admin allow entry could name that contains ``ip``, narrowest first.

    The store looks these up in one command instead of scanning all allow entries:
    25 names for IPv4 (/32../8), 113 for IPv6 (/128../16). Memoised: building them
    cost ~0.2 ms per recipient in profiles, and clients send many recipients. The
    bound matters: an IPv6 entry holds ~7 KB, and a botnet's random addresses would
    fill any size; 2,048 recent clients cover a client's recipients and messages.
    """
    addr = parse_ip(ip)
    top = 32 if addr.version == 4 else 128
    return tuple(
        str(ipaddress.ip_network(f"{addr}/{p}", strict=False))
        for p in range(top, MIN_ALLOW_PREFIX[addr.version] - 1, -1)
    )


def _strip_tags(local: str, domain: str) -> tuple[str, str]:
    """Undo BATV and SRS rewriting (either order, as forwarders stack them)."""
    for _ in range(3):  # SRS of a BATV address, BATV of SRS: never more than that
        m = _BATV_REVERSED.match(local)
        if m and not _PRVS_TAG.match(m["local"]):
            local = m["local"]
            continue
        m = _BATV.match(local)
        if m:
            local = m["local"] or m["b"]
            continue
        m = _SRS1.match(local) or _SRS0.match(local)
        if m:
            local, domain = m["local"], m["domain"]
            continue
        break
    return local, domain


def normalise_sender(address: str) -> str:
    """The sender as greylisting compares it; ``""`` for the null sender.

    Local parts are case-sensitive in theory (RFC 5321 2.4) but never in practice,
    and a retry that changes case is the same sender. Without an ``@`` the whole
    string is kept lower-cased: it is still a stable identity of that client.
    """
    text = address.strip().strip("<>").strip().lower()
    local, at, domain = text.rpartition("@")
    if not at:
        return text
    if len(local) >= 2 and local[0] == local[-1] == '"':
        # RFC 5321 4.1.2: "john"@ is john@. Any other quoted local part is kept whole:
        # its "+" or "=" are characters of the mailbox, not tags to cut at.
        inner = re.sub(r"\\(.)", r"\1", local[1:-1])
        if not _DOT_ATOM.match(inner):
            return f"{local}@{domain.rstrip('.')}"
        local = inner
    local, domain = _strip_tags(local, domain)
    local = local.split("+", 1)[0] if not local.startswith("+") else local
    return f"{local}@{domain.rstrip('.')}"


# A run of digits standing alone between non-word characters (postgrey's \b\d+\b):
# VERP's message and subscriber numbers, not the digits inside a name like "user42".
_VERP_NUMBER = re.compile(r"(?<![0-9A-Za-z_])[0-9]+(?![0-9A-Za-z_])")


def triplet_sender(address: str) -> str:
    """The sender as a greylist triplet holds it: ``normalise_sender`` with VERP numbers
    folded to ``#`` in the local part (``bounce-123-45@l.example`` -> ``bounce-#-#@…``).

    Only here, not in ``normalise_sender``: list entries name real addresses, and an
    allow entry for ``bounces-123@`` must not also match ``bounces-456@``. The folding
    loses no protection worth having: the triplet still pins the client network (or
    SPF-verified domain) and the recipient, and a spammer who varies digits per
    message gains nothing over one who keeps them fixed.
    """
    text = normalise_sender(address)
    local, at, domain = text.rpartition("@")
    if not at or local.startswith('"'):
        return text  # the bare "postmaster" form, or a quoted local part kept whole
    return f"{_VERP_NUMBER.sub('#', local)}@{domain}"


def normalise_recipient(address: str) -> str:
    """The recipient as greylisting compares it: lower-case, no brackets.

    The ``+extension`` stays: ``user+lists@`` may be filed apart, and its mail may
    come from other senders than ``user@``'s.
    """
    return address.strip().strip("<>").strip().lower().rstrip(".")


def normalise_domain(domain: str) -> str:
    """Lower-case, no trailing dot: how allowlist domains are compared."""
    return domain.strip().lower().rstrip(".")


def _parents(domain: str) -> list[str]:
    """``a.b.example.org`` -> itself and every parent with at least two labels."""
    labels = normalise_domain(domain).split(".")
    return [".".join(labels[i:]) for i in range(max(1, len(labels) - 1))]


def domain_matches(domain: str, allowed: Iterable[str]) -> bool:
    """Whether ``domain`` is one of ``allowed`` or a subdomain of one."""
    wanted = {normalise_domain(d) for d in allowed}
    return any(p in wanted for p in _parents(domain)) if domain else False


def rdns_matches(hostname: str | None, suffixes: Iterable[str]) -> bool:
    """Whether a verified client name ends in one of ``suffixes``.

    A suffix matches whole labels only: ``example.org`` matches ``mx.example.org``
    and itself, never ``badexample.org``.
    """
    if not hostname:
        return False
    return domain_matches(hostname, suffixes)


def recipient_matches(recipient: str, patterns: Iterable[str]) -> bool:
    """Whether a recipient opted out: ``user@domain``, ``@domain`` or ``user@`` patterns.

    ``+extensions`` are ignored for the comparison, so ``postmaster@`` also covers
    ``postmaster+abuse@``.
    """
    rcpt = normalise_recipient(recipient)
    local, _, domain = rcpt.rpartition("@")
    base = local.split("+", 1)[0]
    for pattern in patterns:
        p = normalise_recipient(pattern)
        p_local, p_at, p_domain = p.partition("@")
        if not p_at:
            continue
        if (not p_local or p_local in (local, base)) and (not p_domain or p_domain == domain):
            return True
    return False


@dataclass(frozen=True)
class Triplet:
    """One greylisting identity: who (origin), from whom (sender), to whom (recipient)."""

    origin: str  # "192.0.2.0/24" or "spf:example.org"
    sender: str  # normalised; "" is the null sender
    recipient: str  # normalised

    def digest(self) -> str:
        return triplet_digest(self.origin, self.sender, self.recipient)

    def __str__(self) -> str:
        return f"{self.origin} <{self.sender}> -> <{self.recipient}>"


def triplet_digest(origin: str, sender: str, recipient: str) -> str:
    """Fixed-length key part for a triplet (SHA-1: a key name, not a security boundary).

    NUL separates the parts because no normalised part can contain it.
    """
    data = "\0".join((origin, sender, recipient)).encode("utf-8", "surrogatepass")
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class AllowTarget:
    """An admin allow/forget argument: a network or a sender domain."""

    kind: str  # "net" | "domain"
    value: str  # canonical CIDR text or normalised domain

    @property
    def field(self) -> str:
        """The field name in the store's allow hash."""
        return f"{self.kind}:{self.value}"

    @property
    def network(self) -> Network:
        if self.kind != "net":
            raise ValueError(f"{self.value} is not a network")
        return ipaddress.ip_network(self.value)


def _parse_network(text: str) -> Network:
    """IP or CIDR; host bits set is an error naming the intended network (as units does)."""
    raw = text.strip()
    if "/" not in raw:
        addr = parse_ip(raw)
        return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")
    try:
        return ipaddress.ip_network(raw)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise exc from None
        raise ValueError(f"{raw} has host bits set; did you mean {loose}?") from None


def parse_allow_target(text: str) -> AllowTarget:
    """``192.0.2.7``, ``192.0.2.0/24``, ``2001:db8::/48`` or ``example.org``.

    ValueError with an admin-readable message otherwise. Networks wider than
    ``MIN_ALLOW_PREFIX`` are refused; a domain needs at least two labels (a whole
    top-level domain is never what an admin means).
    """
    raw = text.strip()
    if not raw:
        raise ValueError("expected an IP address, a CIDR network or a domain")
    looks_ip = "/" in raw or ":" in raw or raw.replace(".", "").isdigit()
    if looks_ip:
        try:
            net = _parse_network(raw)
        except ValueError as exc:
            raise ValueError(f"{raw!r} is not an IP address or CIDR network: {exc}") from None
        if net.prefixlen < MIN_ALLOW_PREFIX[net.version]:
            limit = MIN_ALLOW_PREFIX[net.version]
            raise ValueError(f"{net} is wider than /{limit}; allow narrower networks")
        return AllowTarget("net", str(net))
    # an internationalised name is kept as its A-label, the form SPF reports
    domain = to_a_label(raw) or normalise_domain(raw)
    if not is_hostname(domain) or "." not in domain:
        raise ValueError(f"{raw!r} is not an IP address, CIDR network or domain name")
    return AllowTarget("domain", domain)


def parse_forget_target(text: str) -> AllowTarget:
    """Like :func:`parse_allow_target`, but any network width may be forgotten."""
    raw = text.strip()
    if "/" in raw or ":" in raw or raw.replace(".", "").isdigit():
        try:
            return AllowTarget("net", str(_parse_network(raw)))
        except ValueError as exc:
            raise ValueError(f"{raw!r} is not an IP address or CIDR network: {exc}") from None
    return parse_allow_target(raw)


def allow_fields(ip: str, spf_domain: str | None) -> list[str]:
    """The allow-hash fields that exempt this client (and this SPF-passing domain).

    Domain fields are only asked for when SPF passed for the domain: anyone can
    write any MAIL FROM, so an unauthenticated domain must not unlock anything.
    """
    fields = [f"net:{n}" for n in covering_networks(ip)]
    if spf_domain:
        fields.extend(f"domain:{d}" for d in _parents(spf_domain))
    return fields


@functools.lru_cache(maxsize=2048)
def allow_argument(ip: str, spf_domain: str | None) -> str:
    """``allow_fields`` as the one newline-joined script argument the store sends.

    Memoised: the same client sends recipient after recipient, and building the 25
    (IPv6: 113) fields was a tenth of the greylist check's CPU in profiles. With
    ``covering_networks`` at most ~23 MB for 2,048 IPv6 clients (measured 11 KB each).
    """
    return "\n".join(allow_fields(ip, spf_domain))
