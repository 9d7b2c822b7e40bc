"""SPF (RFC 7208) for the MAIL FROM and HELO identities, evaluated by pyspf (L3).

What this module owns: choosing the identity (MAIL FROM, or ``postmaster@<HELO>`` for
the null sender, RFC 7208 2.4; the HELO identity of 2.3 as extra information),
putting domains into A-labels (SMTPUTF8 senders may use U-labels; DNS only knows
A-labels), running pyspf off the event loop, and turning its answer into an RFC 8601
result word, a scored symbol and, only when the policy asks for it, a reject.

How pyspf's DNS is answered: pyspf is synchronous and, left alone, resolves through
the module global ``spf.DNSLookup`` with its own resolver. Patching that global per
call would race between worker threads, and would bypass our cache and metrics. So
each evaluation uses :class:`_ResolverQuery`, a ``spf.query`` subclass whose ``dns``
method (the one place every pyspf lookup goes through) asks our shared
:class:`~filter.resolver.Resolver` via its blocking adapter. That method keeps
pyspf's contract: lower-case name without trailing dot, list of answers, ``[]`` for
NXDOMAIN/NODATA, ``spf.TempError`` for a lookup that may work later, and the RFC
7208 4.6.4 void-lookup count (the ten-term limit stays with pyspf's
``check_lookups``, which counts terms, not queries).

Where the subclass corrects pyspf 2.0.14 against RFC 7208:

- the sender is split at its last "@" (a quoted local part may hold "@");
- a void lookup is counted once per term whose own lookup is void (a, mx, ptr,
  exists, include, redirect), not for the address lookups of MX or PTR names;
- modifier names are case-insensitive ("REDIRECT=", "Exp=");
- the exp= text explains a fail only, never a softfail;
- ptr skips a name whose address lookup fails instead of giving temperror;
- a macro expansion over 253 characters loses labels from the left until it fits.

What it must not do: decide on temperror (DMARC and the verdict do), reject unless
``spf.reject_on_fail`` is set (a DKIM signature may still align for DMARC), or let a
DNS timeout look like fail or none.

Result ``data`` keys (the Authentication-Results builder reads them): ``identity``
("mailfrom" | "helo"), ``smtp.mailfrom``, ``smtp.helo``, ``domain`` (A-label),
``reason``, ``helo_result`` (word or ""), ``helo_reason``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import filter.dnsfeatures  # noqa: F401  # before dns.query loads: no DoH (see there)

# isort: split
import spf

from filter import replies
from filter.checks import Context
from filter.domains import is_multi_label_host, to_a_label
from filter.model import Stage
from filter.netaddr import normalize_ip
from filter.policy.schema import Policy
from filter.resolver import DNSError, DNSResult, DNSTempError
from filter.results import Action, CheckResult, Decision, Symbol

__all__ = [
    "SPF_WORDS",
    "Identity",
    "SPFCheck",
    "Verdict",
    "a_label_domain",
    "build_result",
    "decision_for",
    "evaluate",
    "helo_domain",
    "helo_symbol",
    "normalise_modifier_names",
    "result_word",
    "select_identity",
    "split_sender",
    "symbol_name",
    "time_budget",
    "truncate_name",
]

# RFC 7208 2.6 results, spelled as RFC 8601 spells them in Authentication-Results.
SPF_WORDS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# RFC 7208 4.6.4: at most two void lookups (NXDOMAIN or empty answer).
MAX_VOID_LOOKUPS = 2
# RFC 7208 4.6.4: an mx term with more MX records than this is a permerror.
MAX_MX_NAMES = 10
# RFC 7208 5.5: at most ten PTR names are validated.
MAX_PTR_NAMES = 10


# --- pure parts ---------------------------------------------------------------------


def result_word(pyspf_result: str) -> str:
    """The RFC 8601 word for a pyspf result.

    pyspf already speaks RFC 7208's words; anything else (its "ambiguous" exists
    only in its harsh mode, which we never use) is treated as temperror, so an
    unexpected answer can never read as a pass or a fail.
    """
    word = pyspf_result.lower()
    return word if word in SPF_WORDS else "temperror"


def symbol_name(word: str) -> str:
    """``SPF_PASS``, ``SPF_SOFTFAIL``, ...: one symbol per result, scored by policy."""
    return f"SPF_{word.upper()}"


def helo_symbol(word: str) -> str | None:
    """The extra symbol a HELO result adds next to a MAIL FROM result, if any.

    Only pass and fail say something about the client (its name is or is not
    authorised); the other HELO results are too common to be worth a score.
    """
    return {"pass": "SPF_HELO_PASS", "fail": "SPF_HELO_FAIL"}.get(word)


def a_label_domain(domain: str) -> str | None:
    """``domain`` as RFC 7208 4.3 wants it for DNS, or None when it is malformed.

    Malformed means: not convertible to A-labels (IDNA 2008 with UTS 46 mapping), an
    empty or over-long label, over 253 octets, a single label, an all-numeric top
    label (an unbracketed IP address) or an address literal. RFC 7208 4.3 makes all
    of these "none" without a lookup. Pure-ASCII names are only lower-cased: IDNA
    2008 refuses some that DNS holds fine (underscores, odd hyphens), and SPF
    evaluation of those is the publisher's business.
    """
    name = to_a_label(domain)
    return name if name is not None and is_multi_label_host(name) else None


def helo_domain(helo: str | None) -> str | None:
    """The HELO name to check as an SPF identity, or None to skip it.

    RFC 7208 2.3: a HELO that is an address literal or not a fully qualified domain
    has no SPF record to check; checking it would only produce noise.
    """
    if not helo:
        return None
    return a_label_domain(helo)


@dataclass(frozen=True)
class Identity:
    """The identity one SPF evaluation checks and how it is reported.

    ``sender`` is what pyspf gets as <sender> (local-part @ A-label domain; the
    local part may hold "@", so the domain is what follows the last one, see
    :func:`split_sender`);
    ``address`` is what Authentication-Results shows as ``smtp.mailfrom``;
    ``domain`` is None when RFC 7208 4.3 makes the result "none" without DNS.
    """

    kind: str  # "mailfrom" | "helo"
    address: str
    sender: str
    domain: str | None
    why_none: str = ""


def select_identity(mail_from: str, helo: str | None) -> Identity:
    """MAIL FROM's identity; for the null sender ``postmaster@<HELO>`` (RFC 7208 2.4)."""
    helo_name = (helo or "").strip()
    if not mail_from:
        domain = helo_domain(helo_name)
        address = f"postmaster@{helo_name}" if helo_name else ""
        why = "" if domain else f"null sender and HELO {helo_name!r} is not a domain"
        return Identity("helo", address, f"postmaster@{domain}" if domain else "", domain, why)
    local, at, raw_domain = mail_from.rpartition("@")
    if not at:
        return Identity("mailfrom", mail_from, "", None, "MAIL FROM has no domain")
    domain = a_label_domain(raw_domain)
    if domain is None:
        return Identity("mailfrom", mail_from, "", None, f"malformed domain {raw_domain!r}")
    # RFC 7208 4.3: an empty local-part is "postmaster".
    return Identity("mailfrom", mail_from, f"{local or 'postmaster'}@{domain}", domain)


def split_sender(sender: str) -> tuple[str, str]:
    """(local-part, domain) of ``sender``, split at the *last* "@".

    RFC 5321's Mailbox is Local-part "@" Domain and a quoted local part may itself
    hold "@" (``"x@y"@victim.example``), while a domain never does. pyspf splits at
    the first "@", which made it check ``y"@victim.example`` instead of
    ``victim.example``: a way around the victim's -all. An empty local part is
    "postmaster" (RFC 7208 4.3); a sender without "@" is all domain, as in pyspf.
    """
    local, at, domain = sender.rpartition("@")
    if not at:
        return "postmaster", sender
    return local or "postmaster", domain


# RFC 7208 12: modifier = name "=" macro-string; name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )
_MODIFIER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*(?==)")


def normalise_modifier_names(record: str) -> str:
    """``record`` with every modifier name lower-cased, all else untouched.

    RFC 7208 12 (ABNF strings are case-insensitive, RFC 5234 2.3): "REDIRECT=" and
    "Exp=" are redirect= and exp=. pyspf compares modifier names case-sensitively,
    so it ignored them as unknown modifiers. A term is a modifier exactly when
    pyspf's own ``RE_MODIFIER`` says so (a name then "="), so mechanisms, and the
    values (where "%{L}" and "%{l}" differ, RFC 7208 7.3), are left as they are.
    Terms are split on single spaces, as pyspf splits them, so spacing survives.
    """
    return " ".join(
        _MODIFIER_NAME.sub(lambda m: m.group(0).lower(), term, count=1)
        for term in record.split(" ")
    )


def helo_identity(helo: str | None) -> Identity | None:
    """The RFC 7208 2.3 HELO identity, or None when the HELO cannot be checked."""
    domain = helo_domain(helo)
    if domain is None:
        return None
    return Identity("helo", f"postmaster@{(helo or '').strip()}", f"postmaster@{domain}", domain)


def decision_for(word: str, policy: Policy, reason: str) -> Decision | None:
    """A hard reject only for fail and only when the admin turned it on.

    Off by default: DMARC may still pass through an aligned DKIM signature, so an
    SPF fail alone is evidence, not a verdict. temperror never decides here.
    """
    if word == "fail" and policy.spf.reject_on_fail:
        return Decision(Action.REJECT, replies.REJECT_SPF, reason)
    return None


def time_budget(dns_timeout: float, check_timeout: float) -> float:
    """Seconds one SPF evaluation may spend on DNS in total.

    A few lookup lifetimes (an include chain rarely needs more when the cache is
    warm), but ending well inside the pipeline's check timeout, so that pyspf
    reports its own temperror before the pipeline gives up on the check and
    leaves the worker thread running behind it.
    """
    return max(0.05, min(4 * dns_timeout, max(check_timeout - dns_timeout, check_timeout / 2)))


@dataclass(frozen=True)
class Verdict:
    """One pyspf evaluation: the RFC 8601 word and pyspf's explanation."""

    word: str
    explanation: str


def build_result(
    identity: Identity,
    main: Verdict,
    helo: str | None,
    helo_verdict: Verdict | None,
    policy: Policy,
) -> CheckResult:
    """The check's report: the MAIL FROM (or null-sender HELO) result decides the word."""
    symbols = [
        Symbol(symbol_name(main.word), policy.score(symbol_name(main.word)), main.explanation)
    ]
    helo_word = ""
    helo_reason = ""
    if identity.kind == "helo":
        helo_word, helo_reason = main.word, main.explanation
    elif helo_verdict is not None:
        helo_word, helo_reason = helo_verdict.word, helo_verdict.explanation
        extra = helo_symbol(helo_word)
        if extra is not None:
            symbols.append(Symbol(extra, policy.score(extra), helo_reason))
    subject = identity.address or "<>"
    reason = f"SPF {main.word} for {subject}: {main.explanation}"
    data: dict[str, object] = {
        "identity": identity.kind,
        "smtp.mailfrom": identity.address,
        "smtp.helo": (helo or "").strip(),
        "domain": identity.domain or "",
        "reason": main.explanation,
        "helo_result": helo_word,
        "helo_reason": helo_reason,
    }
    return CheckResult(
        "spf", main.word, tuple(symbols), decision_for(main.word, policy, reason), data
    )


# --- the DNS seam ---------------------------------------------------------------------


class BlockingLookup(Protocol):
    """What the evaluation needs from ``Resolver.blocking(loop)``."""

    def resolve(self, name: str, rtype: str, wait: float | None = None) -> DNSResult: ...


#: RFC 7208 7.3 / RFC 1035: the longest domain name, in text form without the final dot.
MAX_NAME_LENGTH = 253


def _is_valid_query_name(name: str) -> bool:
    """RFC 1035 shape: what a DNS query can carry at all."""
    return (
        bool(name)
        and len(name) <= MAX_NAME_LENGTH
        and all(0 < len(x) < 64 for x in name.split("."))
    )


def truncate_name(name: str) -> str:
    """RFC 7208 7.3: a too-long expansion loses labels from the left until it fits.

    "the left side is truncated to fit, by removing successive labels (and their
    following dots) until the total length does not exceed 253 characters."
    """
    while len(name) > MAX_NAME_LENGTH and "." in name:
        name = name.partition(".")[2]
    return name


class _ResolverQuery(spf.query):  # type: ignore[misc]  # pyspf ships no types
    """A pyspf query whose lookups go to our resolver, within a time budget.

    One instance per evaluation and per thread: its state (answers, void count,
    deadline) is its own, so concurrent evaluations cannot see each other.
    """

    def __init__(self, lookup: BlockingLookup, deadline: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lookup = lookup
        self._deadline = deadline
        self._answers: dict[tuple[str, str], list[Any]] = {}
        # pyspf split <sender> at its first "@"; RFC 5321 puts the domain after the
        # last. Re-split, keeping RFC 7208 7.3's macros exact: %{s} stays the whole
        # sender, %{l} the whole local part (quoted, "@" and all: it is the
        # attacker's own text either way), %{o} and %{d} the real domain.
        if self.s:
            self.l, self.o = split_sender(str(self.s))
            self.d = self.o

    def expand(self, s: str, stripdot: bool = True) -> str:
        """pyspf's macro expansion, truncated as RFC 7208 7.3 says.

        pyspf removes a single label from an expansion over 253 characters, so a
        longer one was never queried (``dns`` answers nothing for it). ``stripdot``
        False means explanation text (exp=), which is no domain name: left as is.
        """
        expanded = str(super().expand(s, stripdot))
        return truncate_name(expanded) if stripdot else expanded

    def set_explanation(self, exp: str) -> None:
        """Use the exp= text for fail only (RFC 7208 6.2).

        pyspf also put it on softfail (and permerror, whose text it never shows),
        so a softfail read as the domain's rejection notice; the others keep
        pyspf's default texts.
        """
        self.exps["fail"] = exp

    def dns_spf(self, domain: str) -> str | None:
        """pyspf's SPF record lookup, with modifier names made case-insensitive.

        Every record pyspf evaluates (the sender's, include: and redirect= targets)
        comes through here, so normalising the text once here is enough.
        """
        record = super().dns_spf(domain)
        return None if record is None else normalise_modifier_names(str(record))

    def dns_mx(self, domainname: str) -> list[Any]:
        """Addresses of the MX hosts of ``domainname``, for the mx mechanism.

        As pyspf's, except for RFC 7208 4.6.4's void count: the term's lookup is
        the MX query, counted when it is void; the address lookups of its hosts are
        not terms (an IPv6 client asks AAAA of hosts that often only have A, and
        three such hosts made pyspf's count a permerror).
        """
        names = self.dns(domainname, "MX")
        if len(names) > MAX_MX_NAMES:
            raise spf.PermError(f"More than {MAX_MX_NAMES} MX records returned")
        return [
            address
            for _preference, host in sorted(names)
            for address in self.dns(host, self.A, ignore_void=True)
        ]

    def getp(self) -> str:
        """The %{p} macro (RFC 7208 7.3), as pyspf computes it.

        Its PTR lookups serve a macro inside some term, not a term of their own, so
        they are not void lookups; the term's own lookup is counted as usual.
        """
        known: str | None = getattr(self, "p", None)
        if known:
            return known
        names = self._validated_ptrs(count_void=False)
        domain = str(self.d)
        if not names:
            known = "unknown"
        elif domain in names:
            known = domain
        else:
            known = next((n for n in names if n.endswith("." + domain)), names[0])
        self.p = known
        return known

    def dns(
        self,
        name: str,
        qtype: str,
        cnames: object = None,
        ignore_void: bool = False,
    ) -> list[Any]:
        """pyspf's single lookup entry point, answered by our resolver.

        CNAMEs are followed by the resolver, so ``cnames`` is unused. A name that
        no query could carry is an empty answer without a void count (as pyspf
        itself does); a name the resolver refuses otherwise counts as nonexistent.
        Each call counts at most one void lookup; callers that are not a term's own
        lookup pass ``ignore_void`` (RFC 7208 4.6.4 counts terms, not queries).
        """
        key = (str(name).rstrip(".").lower(), qtype)
        if not _is_valid_query_name(key[0]):
            return []
        answers = self._answers.get(key)
        if answers is None:
            answers = self._query(*key)
            self._answers[key] = answers
        if not answers and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {MAX_VOID_LOOKUPS} exceeded")
        return answers

    def _query(self, name: str, qtype: str) -> list[Any]:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise spf.TempError("DNS time budget for the SPF evaluation exhausted")
        try:
            # The query in flight ends with the budget too: otherwise the last one
            # could run a whole DNS timeout past it, and a tight check_timeout would
            # fire first and leave a temperror without the SPF identity in it.
            result = self._lookup.resolve(name, qtype, wait=left)
        except DNSTempError as exc:
            if time.monotonic() >= self._deadline:
                raise spf.TempError(
                    f"DNS time budget for the SPF evaluation exhausted ({exc})"
                ) from exc
            raise spf.TempError(f"DNS {exc}") from exc
        except (DNSError, UnicodeError, ValueError):
            return []  # a name DNS cannot hold does not exist (RFC 7208 4.3 by analogy)
        if result.outcome != "ok":
            return []
        return [_pyspf_value(qtype, item) for item in result.data]

    def validated_ptrs(self) -> list[str]:
        """RFC 7208 5.5: PTR names whose address lookups lead back to the client.

        Replaces pyspf's version for one deviation from 5.5: there, a DNS error on
        one name's A/AAAA lookup made the whole evaluation temperror; the RFC says
        to skip that name, and that an error on the PTR lookup itself is no match.
        """
        return self._validated_ptrs(count_void=True)

    def _validated_ptrs(self, count_void: bool) -> list[str]:
        """validated_ptrs(); ``count_void`` for the ptr term's own PTR lookup.

        The names' address lookups are never void lookups (RFC 7208 4.6.4 counts
        terms): an IPv6 client whose PTR names have only A records is no error.
        """
        reverse = f"{spf.reverse_dots(self.i)}.{self.v}.arpa"
        try:
            names = self.dns(reverse, "PTR", ignore_void=not count_void)[:MAX_PTR_NAMES]
        except spf.TempError:
            return []
        valid = []
        for host in names:
            try:
                addresses = self.dns(host, self.A, ignore_void=True)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                valid.append(host)
        return valid


def _pyspf_value(qtype: str, item: object) -> object:
    """Our DNSResult data in the shapes pyspf's lookup functions return.

    A/AAAA: address text; MX: (preference, exchange); PTR: host; TXT: the record's
    character-strings as a list of bytes (pyspf joins them itself).
    """
    if qtype in ("TXT", "SPF"):
        return list(item) if isinstance(item, tuple | list) else [item]
    return item


def evaluate(
    lookup: BlockingLookup,
    ip: str,
    identity: Identity,
    helo: str,
    receiver: str,
    budget: float,
) -> Verdict:
    """check_host() for one identity, blocking: run it in a worker thread.

    ``helo`` is the HELO name for the ``%{h}`` macro (A-labels when it is a domain).
    """
    if identity.domain is None:
        return Verdict("none", identity.why_none or "no domain to check")
    query = _ResolverQuery(
        lookup,
        time.monotonic() + budget,
        i=ip,
        s=identity.sender,
        h=helo,
        receiver=receiver,
        strict=True,
        querytime=0,  # the deadline above replaces pyspf's own budget
    )
    result, _code, explanation = query.check()
    word = result_word(result)
    if not explanation and word == "none":
        # pyspf gives no text for "none"; `mailgate check`/`explain` showed a blank.
        explanation = f"no SPF record for {identity.domain}"
    return Verdict(word, str(explanation or f"SPF {word}"))


# --- a short memory of verdicts -----------------------------------------------------------


class VerdictCache:
    """Recent check_host() verdicts by (client IP, sender, HELO, receiver).

    Why: a pyspf evaluation costs a worker thread and a loop round trip per DNS
    answer even when every answer is cached; bulk senders repeat the same inputs
    many times a minute. The same inputs give the same verdict as long as the DNS
    answers behind it stand, so entries live ``ttl`` seconds (well under common
    record TTLs). Temporary errors are never remembered.
    """

    def __init__(self, ttl: float = 60.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, ...], tuple[float, Verdict]] = OrderedDict()

    def get(self, key: tuple[str, ...]) -> Verdict | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, key: tuple[str, ...], verdict: Verdict) -> None:
        if verdict.word == "temperror" or self.ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl, verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


# --- the check ------------------------------------------------------------------------


class SPFCheck:
    """RFC 7208 at MAIL FROM: the MAIL FROM identity decides, HELO adds information."""

    name = "spf"
    stage = Stage.MAIL
    needs: tuple[str, ...] = ()

    def __init__(
        self, evaluator: Callable[..., Verdict] = evaluate, cache: VerdictCache | None = None
    ) -> None:
        # Injectable so unit tests can observe calls without DNS.
        self._evaluate = evaluator
        self.cache = cache if cache is not None else VerdictCache()

    async def run(self, ctx: Context) -> CheckResult:
        policy = ctx.policy
        if ctx.envelope is None:
            raise RuntimeError("spf runs at MAIL FROM and needs the envelope")
        helo = ctx.client.helo
        identity = select_identity(ctx.envelope.mail_from, helo)
        if not policy.spf.enabled:
            return CheckResult("spf", "none", (), None, {"reason": "disabled by policy"})
        if ctx.resolver is None:
            return _no_resolver(identity, helo, policy)
        # IPv4-mapped IPv6 becomes IPv4 (RFC 7208 5); a bad address raises: our bug.
        ip = normalize_ip(ctx.client.ip)
        lookup = ctx.resolver.blocking(asyncio.get_running_loop())
        budget = time_budget(policy.dns.timeout, policy.server.check_timeout)
        helo_macro = helo_domain(helo) or (helo or "").strip()

        receiver = policy.authserv_id

        def run_one(ident: Identity) -> Verdict:
            return self._evaluate(lookup, ip, ident, helo_macro, receiver, budget)

        def key_for(ident: Identity) -> tuple[str, ...]:
            return (ip, ident.sender.lower(), helo_macro.lower(), receiver)

        async def verdict_for(ident: Identity) -> Verdict:
            key = key_for(ident)
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            verdict = await asyncio.to_thread(run_one, ident)
            self.cache.put(key, verdict)
            return verdict

        second = helo_identity(helo) if identity.kind == "mailfrom" and policy.spf.helo else None
        helo_verdict: Verdict | None = None
        if second is None:
            main = await verdict_for(identity)
        else:
            main_known, helo_known = (
                self.cache.get(key_for(identity)),
                self.cache.get(key_for(second)),
            )
            if main_known is not None and helo_known is not None:
                # Both remembered: no Tasks for gather to make, no loop round trip.
                main, helo_verdict = main_known, helo_known
            else:
                main, helo_verdict = await asyncio.gather(
                    verdict_for(identity), verdict_for(second)
                )
        return build_result(identity, main, helo, helo_verdict, policy)


def _no_resolver(identity: Identity, helo: str | None, policy: Policy) -> CheckResult:
    """Without DNS nothing can be evaluated: temperror, never a silent pass."""
    verdict = Verdict("temperror", "no DNS resolver available")
    return build_result(identity, verdict, helo, None, policy)
