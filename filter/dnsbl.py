"""DNSBL / DNSWL logic without I/O: query names, answer meaning, symbols, the sum (L1).

The check (``filter.checks.dnsbl``) does the lookups and keeps zone health; every
decision about what a name or an answer *means* lives here, so it can be tested
as a table and read in one place.

Decided here:

- Query names follow RFC 5782: IPv4 as reversed octets (2.1), IPv6 as 32 reversed
  nibbles (2.4), domains as themselves in A-labels (2.3), each followed by the zone.
- An A answer is a listing only inside 127.0.0.0/8 (RFC 5782 2.1), and never for
  127.0.0.1 (2.1 forbids listing it; URIBL-style lists answer it for a refused
  query), for 127.255.255.0/24 (Spamhaus' error range: public resolver, rate
  limit, bad DQS key), for an address the zone declares in ``blocked_codes``
  (dnswl.org's 127.0.0.255) or for anything outside 127/8 (a resolver that
  rewrites NXDOMAIN to an advertising page). Those answers say "this resolver
  cannot use the list", never "this client is listed": treating them as a
  listing would reject every client at once.
- One answer with any such address is blocked as a whole: a zone that mixes an
  error code into a listing is not an answer to trust.
- Symbols: ``DNSBL_<ZONE>`` or ``DNSBL_<ZONE>_<LABEL>`` (``DNSWL_`` for allowlist
  zones), ``<ZONE>`` being the zone's ``name`` or its first label that is not an
  access key (``zen.spamhaus.org`` and ``KEY.zen.dq.spamhaus.net`` are both ZEN).
- Access keys (Spamhaus DQS puts one as the zone's first label) are masked in
  everything that leaves the process: logs, metric labels, decision reasons.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import TYPE_CHECKING

from filter.domains import is_multi_label_host, to_a_label
from filter.netaddr import parse_ip

if TYPE_CHECKING:
    from filter.policy.schema import DNSBLZone

__all__ = [
    "BLOCKED",
    "ERROR_NET",
    "LISTED",
    "LISTING_NET",
    "Hit",
    "Tally",
    "ZoneAnswer",
    "a_label",
    "classify",
    "derived_tag",
    "domain_query_name",
    "interpret",
    "ip_query_name",
    "ipv6_probe_names",
    "is_listing_code",
    "looks_like_key",
    "mask_zone",
    "probe_names",
    "probe_verdict",
    "reversed_ip",
    "symbol_for",
    "tally",
]

LISTED = "listed"
BLOCKED = "blocked"

LISTING_NET = IPv4Network("127.0.0.0/8")
ERROR_NET = IPv4Network("127.255.255.0/24")
NEVER_LISTED = IPv4Address("127.0.0.1")
# RFC 5782 5: an IPv6 list's test entries.
IPV6_TEST_LISTED = IPv6Address("::ffff:7f00:2")
IPV6_TEST_UNLISTED = IPv6Address("::ffff:7f00:1")

# A Spamhaus DQS key is 26 lower-case letters and digits; no real zone label that
# long is made only of those, so 16+ alphanumerics as the *first* label is a key.
_KEY_LABEL = re.compile(r"[A-Za-z0-9]{16,}")
_NOT_SYMBOL = re.compile(r"[^A-Z0-9]+")


# --- query names ------------------------------------------------------------------------


def reversed_ip(ip: str) -> str:
    """The RFC 5782 label sequence for ``ip``: 2.1 (IPv4 octets) or 2.4 (IPv6 nibbles).

    IPv4-mapped IPv6 becomes IPv4 first (a dual-stack socket's view of an IPv4
    client is listed under its IPv4 address); a bad address raises ValueError.
    """
    addr = parse_ip(ip)
    if isinstance(addr, IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return _nibbles(addr)


def _nibbles(addr: IPv6Address) -> str:
    """RFC 5782 2.4: the 32 nibbles of ``addr``, least significant first."""
    return ".".join(reversed(addr.exploded.replace(":", "")))


def ip_query_name(ip: str, zone: str) -> str:
    """``<reversed ip>.<zone>``, e.g. ``2.0.0.127.zen.spamhaus.org``."""
    return f"{reversed_ip(ip)}.{zone.rstrip('.').lower()}"


def a_label(domain: str) -> str | None:
    """``domain`` in lower-case A-labels, or None when it is no domain to look up.

    None for empty names, address literals, single labels and all-numeric top
    labels (a bare IP given as HELO): a DNSBL holds no entry for those, and
    querying them only leaks noise to the list operator.
    """
    name = to_a_label(domain)
    return name if name is not None and is_multi_label_host(name) else None


def domain_query_name(domain: str, zone: str) -> str | None:
    """RFC 5782 2.3: ``<domain>.<zone>``, or None when no query can carry it."""
    name = a_label(domain)
    if name is None:
        return None
    full = f"{name}.{zone.rstrip('.').lower()}"
    return full if len(full) <= 253 else None


def probe_names(zone: str, kind: str) -> tuple[str, str]:
    """RFC 5782 section 5 test points: (must be listed, must not be listed).

    IPv4 lists hold 127.0.0.2 and never 127.0.0.1; domain lists hold TEST and
    never INVALID.
    """
    zone = zone.rstrip(".").lower()
    if kind == "domain":
        return f"test.{zone}", f"invalid.{zone}"
    return f"2.0.0.127.{zone}", f"1.0.0.127.{zone}"


def ipv6_probe_names(zone: str) -> tuple[str, str]:
    """An IPv6 list's test points (RFC 5782 5): ::FFFF:7F00:2 and ::FFFF:7F00:1 as nibbles.

    Asked when a zone lacks 127.0.0.2: an IPv6-only list holds these instead and
    would otherwise be disabled as dead. Spelled out here, not through
    ``reversed_ip``, which looks IPv4-mapped addresses up as IPv4 (right for a
    client, but it would turn these back into the IPv4 test points).
    """
    zone = zone.rstrip(".").lower()
    return (
        f"{_nibbles(IPV6_TEST_LISTED)}.{zone}",
        f"{_nibbles(IPV6_TEST_UNLISTED)}.{zone}",
    )


# --- answers ----------------------------------------------------------------------------


def classify(address: str, blocked_codes: Collection[str] = ()) -> str:
    """``LISTED`` or ``BLOCKED`` for one address of an A answer (see the module notes)."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return BLOCKED
    if not isinstance(addr, IPv4Address) or addr not in LISTING_NET:
        return BLOCKED
    if addr in ERROR_NET or addr == NEVER_LISTED or str(addr) in blocked_codes:
        return BLOCKED
    return LISTED


def is_listing_code(text: str) -> bool:
    """Whether ``text`` is an address a zone may answer for a listing (for ``codes`` keys)."""
    try:
        IPv4Address(text)
    except ValueError:
        return False
    return classify(text) == LISTED


def probe_verdict(
    kind: str,
    positive: Sequence[str] | None,
    negative: Sequence[str] | None,
    blocked_codes: Collection[str] = (),
) -> str:
    """Why a zone is unusable after its two probes, or "" when it is fine.

    ``positive``/``negative`` are the A answers for the two ``probe_names`` (an
    empty sequence for NXDOMAIN/NODATA); None means the lookup failed (timeout,
    SERVFAIL), which says nothing about the zone and never disables it.
    A blocked answer on either probe disables it; so does a listed "never listed"
    name (a zone that lists everything would reject every client). A missing
    test entry disables an IP zone (RFC 5782 5 requires 127.0.0.2, or
    ::FFFF:7F00:2 of an IPv6 list: the caller passes whichever pair it asked)
    but only counts as fine for a domain zone, since not every domain list
    publishes TEST.
    """
    for answer in (positive, negative):
        if answer and any(classify(a, blocked_codes) == BLOCKED for a in answer):
            return f"blocked answer {','.join(answer)}: the list refuses this resolver"
    if negative:
        return "lists the test entry that must never be listed: every client would match"
    if positive is not None and not positive and kind == "ip":
        return (
            "does not list the test entry 127.0.0.2 (nor ::FFFF:7F00:2): "
            "zone dead, renamed or rewritten"
        )
    return ""


# --- names and symbols ------------------------------------------------------------------


def looks_like_key(label: str) -> bool:
    """Whether a zone's first label is an access key rather than a name."""
    return bool(_KEY_LABEL.fullmatch(label))


def mask_zone(zone: str) -> str:
    """The zone as logs and metrics may show it: an access key label becomes ``***``."""
    first, dot, rest = zone.rstrip(".").partition(".")
    if dot and looks_like_key(first):
        return f"***.{rest}"
    return zone.rstrip(".")


def derived_tag(zone: str) -> str:
    """Upper-case symbol part for a zone: its first label that is not a key."""
    labels = zone.rstrip(".").split(".")
    for label in labels[:-1] if len(labels) > 1 else labels:
        if not looks_like_key(label):
            tag = _NOT_SYMBOL.sub("_", label.upper()).strip("_")
            if tag:
                return tag if tag[0].isalpha() else f"Z{tag}"
    return "ZONE"


def symbol_for(tag: str, label: str, allow: bool) -> str:
    """``DNSBL_ZEN_SBL``, ``DNSBL_SPAMCOP``, ``DNSWL_DNSWL_HI``, ..."""
    prefix = "DNSWL" if allow else "DNSBL"
    return f"{prefix}_{tag}_{label.upper()}" if label else f"{prefix}_{tag}"


@dataclass(frozen=True)
class Hit:
    """One listing: the zone, the code it answered, its label, symbol and score."""

    zone: str  # as configured (may hold a key: only ever shown through mask_zone)
    code: str
    label: str  # from the zone's codes, "" for a listing without a known code
    symbol: str
    score: float
    allow: bool
    reject: bool
    subject: str = ""  # domain zones: "helo" | "mail_from"; "" for the client IP

    def as_data(self) -> dict[str, object]:
        """The result-data form (logs, ``mailgate check --json``); the zone masked."""
        data: dict[str, object] = {
            "zone": mask_zone(self.zone),
            "code": self.code,
            "label": self.label,
            "score": self.score,
        }
        if self.subject:
            data["subject"] = self.subject
        return data


@dataclass(frozen=True)
class ZoneAnswer:
    """What one zone's A answer means: listings, or the blocked addresses that voided it."""

    hits: tuple[Hit, ...] = ()
    blocked: tuple[str, ...] = ()


def interpret(
    zone: DNSBLZone,
    addresses: Iterable[object],
    score_of: Callable[[str, float], float] = lambda _symbol, score: score,
    subject: str = "",
) -> ZoneAnswer:
    """Turn one zone's A answer into hits (one per distinct symbol) or a blocked verdict.

    A code from the zone's ``codes`` gives its label and score (the zone's score
    when the code has none); any other listing code is a plain listing at the
    zone's score. ``score_of(symbol, configured)`` lets ``[scores]`` override a
    symbol's score (the check passes ``policy.score``). Several codes with one
    label (PBL's .10 and .11) make one hit, so a label is never counted twice.
    """
    texts = sorted({str(a) for a in addresses})
    blocked = tuple(a for a in texts if classify(a, zone.blocked_codes) == BLOCKED)
    if blocked:
        return ZoneAnswer((), blocked)
    by_code = {c.code: c for c in zone.codes}
    hits: dict[str, Hit] = {}
    for code in texts:
        entry = by_code.get(code)
        label = entry.label if entry is not None else ""
        configured = entry.score if entry is not None and entry.score is not None else zone.score
        symbol = symbol_for(zone.tag, label, zone.allow)
        score = score_of(symbol, configured)
        if symbol not in hits or abs(score) > abs(hits[symbol].score):
            hits[symbol] = Hit(
                zone.zone, code, label, symbol, score, zone.allow, zone.reject, subject
            )
    return ZoneAnswer(tuple(hits.values()), ())


@dataclass(frozen=True)
class Tally:
    """The combined DNSBL outcome: summed score and, when due, why to reject."""

    total: float
    reject_reason: str  # "" when nothing rejects
    allowlisted: bool
    listed: bool


def tally(
    hits: Iterable[Hit], threshold: float, prior: float = 0.0, prior_zones: Iterable[str] = ()
) -> Tally:
    """postscreen-style: a hit on a ``reject`` zone rejects; else the sum may.

    The sum includes allowlist (negative) scores and ``prior`` (the connect-time
    IP sum, when the MAIL-time domain check adds its own hits; ``prior_zones``, the
    masked zones that sum came from, for the reason). ``threshold`` 0
    turns the sum rule off. An allowlist hit never rejects, and does not cancel a
    ``reject`` zone either: the admin asked for that zone alone to decide.

    ``allowlisted`` (which spares the client greylisting) needs a hit that lowers the
    score (a code scored 0 is a listing the admin does not trust, such as dnswl.org's
    trust level "none" (127.0.x.0), which covers whole ISP pools) and, as with
    postscreen's allowlist threshold, a sum below 0: a DNSWL-listed network's
    host that is also in a blocklist (a compromised machine) is not spared.

    The sum is rounded to 4 places like the verdict's score, so that 0.7 + 0.1
    meets a threshold of 0.8 (and reads 0.8 in the data).
    """
    hits = list(hits)
    total = round(prior + sum(h.score for h in hits), 4)
    listed = any(not h.allow for h in hits)
    reason = ""
    hard = [h for h in hits if h.reject and not h.allow]
    if hard:
        h = hard[0]
        reason = f"client listed in {mask_zone(h.zone)} ({h.label or h.code})"
        if h.subject:
            reason = f"{h.subject} domain listed in {mask_zone(h.zone)} ({h.label or h.code})"
    elif threshold > 0 and listed and total >= threshold:
        zones = ", ".join(
            sorted({mask_zone(h.zone) for h in hits if not h.allow} | set(prior_zones))
        )
        reason = f"DNSBL score {total:g} >= threshold {threshold:g} ({zones})"
    allowlisted = total < 0 and any(h.allow and h.score < 0 for h in hits)
    return Tally(total, reason, allowlisted, listed)
