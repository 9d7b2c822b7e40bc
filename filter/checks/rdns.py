"""Forward-confirmed reverse DNS (FCrDNS) of the client address, at connect (L3).

What this module owns: the RFC 8601 ``iprev`` evaluation (section 3 of RFC 8601,
method ``iprev``): look up the PTR names of the client address, look up the
addresses of (at most ten of) those names, and call the client's name verified
when one of them leads back to the client address. The verified name is what
Postfix calls the client "name" (``reject_unknown_client_hostname``, the
``NAME`` of XCLIENT); without one Postfix says "unknown".

Why scored, never decided: a missing or unconfirmed reverse name is common for
small legitimate senders and normal for botnets, so it is evidence for the
score, not a verdict. A temporary DNS error says nothing about the client: it
becomes ``temperror`` with a zero-score symbol, never ``fail``.

Which names count: only those Postfix's own lookup would accept as a host name
(``is_host_name``); the verified name goes upstream as XCLIENT ``NAME``, which
Postfix refuses otherwise.

Why the ten-name limit: a PTR set can be large and every name costs a forward
lookup; RFC 7208 5.5 caps the same walk at ten names, and a real host never
needs more.

Filter mode: when Postfix told us the client through XFORWARD and gave a name,
Postfix already did exactly this walk (its NAME is the verified name), so the
check trusts it instead of repeating the lookups.

Result ``data`` keys: ``verified_name`` (the confirmed name, or ""),
``ptr_names`` (the PTR names seen, sorted), ``reason``; on temperror also
``error``. ``xclient_name(result)`` turns a result into the XCLIENT ``NAME``
value Postfix expects.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from filter.checks import Context
from filter.model import Stage
from filter.netaddr import normalize_ip, parse_ip
from filter.policy.schema import Policy
from filter.resolver import DNSTempError, Resolver
from filter.results import CheckResult, Symbol

__all__ = [
    "MAX_PTR_NAMES",
    "SYMBOLS",
    "Forward",
    "RDNSCheck",
    "build_result",
    "confirm",
    "is_host_name",
    "xclient_name",
    "xclient_reverse_name",
]

# RFC 7208 5.5 validates at most ten PTR names; the same bound suits iprev.
MAX_PTR_NAMES = 10

# RFC 8601 iprev result word -> symbol. RFC 8601 3: no PTR data at all is
# "permerror" (the evaluation cannot be completed); PTR names of which none leads back
# to the client is "fail".
SYMBOLS = {
    "pass": "RDNS_PASS",
    "permerror": "RDNS_NONE",  # no PTR record at all
    "fail": "RDNS_MISMATCH",  # PTR names, none leading back
    "temperror": "RDNS_TEMPERROR",
}


# --- pure parts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """The forward lookup of one PTR name: its addresses, or why there are none usable.

    ``error`` is set for a temporary DNS failure (the name may still confirm later).
    """

    name: str
    addresses: tuple[str, ...] = ()
    error: str = ""


def _same_address(a: str, b: str) -> bool:
    """Equality of two address texts in any spelling (``2001:DB8::1`` = ``2001:db8:0::1``)."""
    try:
        return parse_ip(a) == parse_ip(b)
    except ValueError:
        return False


def confirm(ip: str, forwards: list[Forward]) -> tuple[str, str, str]:
    """(word, verified name, reason) from the forward lookups of the PTR names.

    ``forwards`` are in the order the names were tried (sorted, so that the same
    PTR set always yields the same verified name: the name is part of the
    identity the upstream sees, and a different one would reopen the upstream
    connection). The first confirming name wins. With no confirming name, any
    temporary failure makes the answer temperror: one of the unanswered names
    might have confirmed.
    """
    for fwd in forwards:
        if any(_same_address(ip, a) for a in fwd.addresses):
            return "pass", fwd.name, f"{fwd.name} resolves back to {ip}"
    failed = [f for f in forwards if f.error]
    if failed:
        first = failed[0]
        return "temperror", "", f"forward lookup of {first.name} failed: {first.error}"
    if not forwards:
        return "fail", "", f"no PTR name of {ip} is a host name"
    names = ", ".join(f.name for f in forwards)
    return "fail", "", f"no PTR name of {ip} resolves back to it ({names})"


def build_result(
    word: str,
    policy: Policy,
    *,
    verified_name: str = "",
    ptr_names: tuple[str, ...] = (),
    reason: str,
    error: str = "",
) -> CheckResult:
    """The check's report: one symbol for every outcome (pass and temperror score 0)."""
    symbol = SYMBOLS[word]
    data: dict[str, object] = {
        "verified_name": verified_name,
        "ptr_names": list(ptr_names),
        "reason": reason,
    }
    if error:
        data["error"] = error
    return CheckResult("rdns", word, (Symbol(symbol, policy.score(symbol), reason),), None, data)


def xclient_name(result: CheckResult | None) -> str:
    """The XCLIENT/XFORWARD ``NAME`` for an rdns result (Postfix's XCLIENT_README).

    The verified name; ``[TEMPUNAVAIL]`` after a temporary DNS error, so that
    Postfix's ``reject_unknown_client_hostname`` defers instead of rejecting;
    ``[UNAVAILABLE]`` when there is no verified name (or no result at all).
    """
    if result is None:
        return "[UNAVAILABLE]"
    name = result.data.get("verified_name")
    if result.result == "pass" and isinstance(name, str) and name:
        return name
    if result.result == "temperror":
        return "[TEMPUNAVAIL]"
    return "[UNAVAILABLE]"


def xclient_reverse_name(result: CheckResult | None) -> str:
    """The XCLIENT ``REVERSE_NAME`` for an rdns result: the client's PTR name, confirmed
    or not (Postfix's ``reverse_client_name``, which ``reject_unknown_reverse_client_
    hostname`` and ``check_reverse_client_hostname_access`` judge).

    Why send it: Postfix's XCLIENT copies ``NAME`` into the reverse name only when
    NAME is a name; after ``NAME=[UNAVAILABLE]`` (a PTR that does not lead back) the
    upstream kept the reverse name of *mailgate's own* connection, so reverse-name
    rules judged our address, not the client's. The name is the one Postfix would
    have found: the verified name, else the first PTR name that is a host name;
    ``[TEMPUNAVAIL]`` when the PTR lookup itself failed, else ``[UNAVAILABLE]``.
    """
    if result is None:
        return "[UNAVAILABLE]"
    verified = result.data.get("verified_name")
    if result.result == "pass" and isinstance(verified, str) and verified:
        return verified
    ptr_names = result.data.get("ptr_names")
    if isinstance(ptr_names, list):
        for name in ptr_names:
            if isinstance(name, str) and is_host_name(name):
                return name
    if result.result == "temperror" and not ptr_names:
        return "[TEMPUNAVAIL]"
    return "[UNAVAILABLE]"


# --- DNS ------------------------------------------------------------------------------


async def _forward(resolver: Resolver, name: str, rtype: str) -> Forward:
    """Addresses of one PTR name; a name DNS cannot hold simply has none."""
    try:
        return Forward(name, tuple(await resolver.addresses(name, rtype)))
    except DNSTempError as exc:
        return Forward(name, (), exc.reason)
    except ValueError:
        return Forward(name)


# One label as Postfix's valid_hostname() takes it: letters, digits, "_" and inner "-".
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def is_host_name(name: str) -> bool:
    """Whether Postfix would take ``name`` (lower case, no final dot) as a client name.

    Postfix's valid_hostname(): labels of letters, digits, "_" and "-" (not first
    or last), 63 octets each, 255 in all, and not all digits (no address text
    such as "192.0.2.1"). Postfix calls a client whose PTR name fails it
    "unknown", and answers ``XCLIENT NAME=`` with such a name "501 Bad NAME
    syntax": DNS holds "mail+1.example" or "-mx.example" without complaint.
    """
    if not name or len(name) > 255:
        return False
    if not all(_HOST_LABEL.match(label) for label in name.split(".")):
        return False
    return not name.replace(".", "").isdigit()


def _candidates(ptr_names: list[str]) -> list[str]:
    """The PTR names worth a forward lookup, sorted, at most MAX_PTR_NAMES.

    Only host names (:func:`is_host_name`): any other PTR target is a
    misconfiguration Postfix refuses too, and a verified name that is none
    would break the XCLIENT command that carries it upstream.
    """
    names = sorted({n.lower().rstrip(".") for n in ptr_names} - {""})
    return [n for n in names if is_host_name(n)][:MAX_PTR_NAMES]


async def evaluate(resolver: Resolver, ip: str, policy: Policy) -> CheckResult:
    """PTR lookup, then the forward lookups of the candidates concurrently."""
    try:
        ptr_names = await resolver.ptr(ip)
    except DNSTempError as exc:
        reason = f"PTR lookup for {ip} failed: {exc.reason}"
        return build_result("temperror", policy, reason=reason, error=exc.reason)
    seen = tuple(sorted({n.lower().rstrip(".") for n in ptr_names} - {""}))
    if not seen:
        return build_result("permerror", policy, reason=f"no PTR record for {ip}")
    candidates = _candidates(ptr_names)
    rtype = "AAAA" if ":" in ip else "A"
    if len(candidates) == 1:  # the usual case: no Task for gather to make
        forwards = [await _forward(resolver, candidates[0], rtype)]
    else:
        forwards = list(await asyncio.gather(*(_forward(resolver, n, rtype) for n in candidates)))
    word, name, reason = confirm(ip, forwards)
    error = next((f.error for f in forwards if f.error), "") if word == "temperror" else ""
    return build_result(
        word, policy, verified_name=name, ptr_names=seen, reason=reason, error=error
    )


# --- the check ------------------------------------------------------------------------


class RDNSCheck:
    """RFC 8601 iprev at connect: scored symbols and the verified client name."""

    name = "rdns"
    stage = Stage.CONNECT
    needs: tuple[str, ...] = ()

    async def run(self, ctx: Context) -> CheckResult:
        policy = ctx.policy
        if not policy.rdns.enabled:
            return CheckResult("rdns", "none", (), None, {"reason": "disabled by policy"})
        client = ctx.client
        if client.source == "xforward" and client.hostname:
            # Postfix sends NAME only after its own forward confirmation.
            name = client.hostname.lower().rstrip(".")
            reason = f"{name} verified by the MTA in front (XFORWARD)"
            return build_result("pass", policy, verified_name=name, reason=reason)
        # IPv4-mapped IPv6 is looked up as IPv4; a bad address raises: our bug.
        ip = normalize_ip(client.ip)
        if ctx.resolver is None:
            # Without DNS nothing can be confirmed: temperror, never a silent pass.
            reason = "no DNS resolver available"
            return build_result("temperror", policy, reason=reason, error=reason)
        return await evaluate(ctx.resolver, ip, policy)
