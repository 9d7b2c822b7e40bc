"""DMARC evaluation logic: record syntax, tree walk, alignment, policy choice. Pure (L1).

RFC 9989 (DMARCbis, obsoletes RFC 7489) is the default; RFC 7489 is a compatibility
mode (organizational domain from the Public Suffix List, ``pct`` honoured) for sites
that must reproduce the old results. Nothing here does I/O: the check
(``filter.checks.dmarc``) asks the DNS for the names this module lists and feeds the
answers back, so every rule below is testable without a resolver and the DNS budget
(RFC 9989 §4.10: at most eight queries per walk) is visible in one place.

checkdmarc is deliberately not used on the mail path: its parser may look up ``rua``
destinations and keeps a module-global cache, and since 6.0 it no longer keeps ``pct``.
The grammar is small enough to parse here, with the RFC's leniency rules spelled out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email import policy as email_policy
from email.errors import InvalidHeaderDefect
from functools import lru_cache
from typing import Any, Literal

from filter.domains import to_a_label
from filter.headers import field_value

Mode = Literal["rfc9989", "rfc7489"]
PolicyName = Literal["none", "quarantine", "reject"]

POLICIES: tuple[str, ...] = ("none", "quarantine", "reject")
MAX_WALK_LABELS = 8  # RFC 9989 §4.10: names longer than this jump to seven labels
WALK_JUMP_TO = 7
# RFC 9989 §11.5: a From naming many domains would cost up to eight queries each;
# only this many distinct Author Domains are evaluated.
MAX_AUTHOR_DOMAINS = 10
KNOWN_TAGS = frozenset(
    ("v", "p", "sp", "np", "adkim", "aspf", "t", "psd", "pct", "rua", "ruf", "fo", "rf", "ri")
)
_TAG_NAME = re.compile(r"[A-Za-z]+\Z")
_VALUE = re.compile(r"[\x20-\x3a\x3c-\x7e]+\Z")  # any printing character but ';'
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s,!]+(![0-9]+[kmgt]?)?\Z", re.IGNORECASE)
_LDH = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?\Z")


# -- records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DMARCRecord:
    """One parsed ``v=DMARC1`` record. Absent policy tags are None, not defaults.

    Keeping "absent" apart from "default" matters: ``sp`` falls back to ``p``, ``np``
    to ``sp`` then ``p`` (RFC 9989 §4.7), and an *invalid* ``p``/``sp``/``np`` triggers
    a different rule than an absent one (§4.10.1). ``invalid`` names the tags whose
    values were syntax errors and were therefore discarded (§4.8).
    """

    raw: str
    p: str | None = None
    sp: str | None = None
    np: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    t: bool = False
    psd: str = "u"
    pct: int = 100
    rua: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()

    def policy_tags_valid(self, mode: Mode = "rfc9989") -> bool:
        """False when a present p/sp (and np in RFC 9989) had a value outside the grammar."""
        tags = ("p", "sp", "np") if mode == "rfc9989" else ("p", "sp")
        return not any(t in self.invalid for t in tags)

    @property
    def has_valid_rua(self) -> bool:
        """At least one syntactically valid reporting URI (RFC 9989 §4.10.1)."""
        return any(_URI.match(u) for u in self.rua)


@lru_cache(maxsize=4096)
def parse_record(text: str) -> DMARCRecord | None:
    """The record, or None when ``text`` is not a DMARC record at all.

    Memoised (the record is immutable): the same few records are read message after
    message from the resolver's cache.

    RFC 9989 §4.7: ``v`` MUST be the first tag and exactly ``DMARC1`` (case-sensitive)
    or the record is ignored entirely. §4.8: unknown tags are ignored and syntax errors
    in the rest of the record fall back to defaults; a repeated tag is such an error,
    so its first occurrence wins. Keywords compare case-insensitively (ABNF strings).
    """
    parts = text.strip(" \t").split(";")
    name, eq, value = parts[0].partition("=")
    if not eq or name.strip(" \t").lower() != "v" or value.strip(" \t") != "DMARC1":
        return None
    tags: dict[str, str] = {}
    invalid: list[str] = []
    unknown: list[str] = []
    for part in parts[1:]:
        item = part.strip(" \t")
        if not item:
            continue  # the trailing separator is allowed; empty items are noise
        name, eq, value = item.partition("=")
        name = name.strip(" \t").lower()
        value = value.strip(" \t")
        if not eq or not _TAG_NAME.match(name) or name in tags or name == "v":
            continue
        if name not in KNOWN_TAGS:
            unknown.append(name)
            continue
        if not _VALUE.match(value):
            invalid.append(name)
            continue
        tags[name] = value

    def keyword(tag: str, allowed: tuple[str, ...], default: str) -> str:
        if tag not in tags:
            return default
        v = tags[tag].lower()
        if v in allowed:
            return v
        invalid.append(tag)
        return default

    def request(tag: str) -> str | None:
        v = keyword(tag, POLICIES, "")
        return v or None

    pct = 100
    if "pct" in tags:
        v = tags["pct"]
        if v.isascii() and v.isdigit() and int(v) <= 100:
            pct = int(v)
        else:
            invalid.append("pct")
    rua = tuple(u.strip(" \t") for u in tags.get("rua", "").split(",") if u.strip(" \t"))
    return DMARCRecord(
        raw=text,
        p=request("p"),
        sp=request("sp"),
        np=request("np"),
        adkim=keyword("adkim", ("r", "s"), "r"),
        aspf=keyword("aspf", ("r", "s"), "r"),
        t=keyword("t", ("y", "n"), "n") == "y",
        psd=keyword("psd", ("y", "n", "u"), "u"),
        pct=pct,
        rua=rua,
        invalid=tuple(dict.fromkeys(invalid)),
        unknown=tuple(unknown),
    )


@dataclass(frozen=True)
class Lookup:
    """What one ``_dmarc.<name>`` TXT answer means for DMARC."""

    record: DMARCRecord | None
    candidates: int  # TXT records that looked like DMARC records


def select_record(texts: Iterable[str]) -> Lookup:
    """The one DMARC record among a name's TXT records, if there is exactly one.

    RFC 9989 §4.10 steps 2 and 6: records not starting with ``v=DMARC1`` are discarded,
    and if several DMARC records remain they are *all* discarded, so the name counts
    as having none and the walk goes on.
    """
    found = [r for r in (parse_record(t) for t in texts) if r is not None]
    return Lookup(found[0] if len(found) == 1 else None, len(found))


def usable_record(record: DMARCRecord, mode: Mode = "rfc9989") -> DMARCRecord | None:
    """The record to evaluate, rewritten or refused per RFC 9989 §4.10.1.

    A record without a valid ``p`` (absent, or present but invalid), or with an
    invalid ``sp`` or ``np``, makes the receiver act as if a record with just ``p=none``
    was published when it has a valid ``rua`` (so the owner still gets reports; its
    ``sp`` and ``np`` are dropped: a bare ``v=DMARC1; sp=reject`` must not reject
    anything), and otherwise apply no DMARC at all (None; ``unusable_result`` says
    how to report that). RFC 7489 §6.6.3 step 6 has the same rule for ``p`` and ``sp``.
    """
    if record.policy_tags_valid(mode) and record.p is not None:
        return record
    if record.has_valid_rua:
        return replace(record, p="none", sp=None, np=None)
    return None


def unusable_result(record: DMARCRecord, mode: Mode = "rfc9989") -> str:
    """The result for a record ``usable_record`` refused: permerror or none.

    A present but invalid policy tag is a syntax error in the owner's record
    (permerror). A record that merely lacks ``p`` is well-formed: the RFC's "no DMARC
    processing" then leaves the message as if no policy was published (none).
    """
    return "none" if record.policy_tags_valid(mode) else "permerror"


# -- names and the DNS tree walk ------------------------------------------------------------


@lru_cache(maxsize=8192)
def normalize_domain(text: str) -> str | None:
    """Lower-case A-label form of a domain, or None if it cannot be a domain name.

    RFC 9989 §5.3.1: a U-label Author Domain MUST be converted to an A-label; the same
    form is used for SPF and DKIM identifiers so that alignment compares like with like
    (comparisons are case-insensitive, RFC 4343). Domain literals are not domains.
    """
    name = to_a_label(text)
    if name is None or len(name) > 253:
        return None
    return name if all(_LDH.match(label) for label in name.split(".")) else None


def label_count(domain: str) -> int:
    return domain.count(".") + 1


def walk_targets(domain: str) -> list[str]:
    """The names whose ``_dmarc`` records a DNS Tree Walk from ``domain`` may query.

    RFC 9989 §4.10: the walk starts at ``domain``; a name of eight or more labels is
    then shortened to its last seven, and each further step drops the left-most label
    down to the single-label TLD. So at most eight queries, whatever the input:
    ``a.b.c.d.e.f.g.h.i.j.mail.example.com`` walks 13 labels, then 7, 6, ... 1.
    """
    labels = domain.split(".")
    names = [domain]
    n = len(labels)
    k = WALK_JUMP_TO if n >= MAX_WALK_LABELS else n - 1
    while k >= 1:
        names.append(".".join(labels[-k:]))
        k -= 1
    return names


def walk_stops(record: DMARCRecord | None) -> bool:
    """RFC 9989 §4.10 steps 2/6: a record with ``psd=y`` or ``psd=n`` ends the walk."""
    return record is not None and record.psd in ("y", "n")


def _ancestor_child(start: str, ancestor: str) -> str:
    """The domain one label below ``ancestor`` on the way to ``start``."""
    labels = start.split(".")
    return ".".join(labels[-(label_count(ancestor) + 1) :])


def organizational_domain(start: str, found: Sequence[tuple[str, DMARCRecord]]) -> str:
    """RFC 9989 §4.10.2: the Organizational Domain of ``start`` from its walk's records.

    ``found`` holds the names that had a valid record, in walk order (longest first).
    From longest to shortest: ``psd=n`` makes that name the Organizational Domain;
    ``psd=y`` on a name other than ``start`` makes the name one label below it the
    Organizational Domain; otherwise the record with the fewest labels wins. With no
    record at all, ``start`` is its own Organizational Domain.
    """
    for name, record in found:
        if record.psd == "n":
            return name
        if record.psd == "y" and name != start:
            return _ancestor_child(start, name)
    if found:
        return min(found, key=lambda item: label_count(item[0]))[0]
    return start


def policy_record(
    author: str, walked: Sequence[tuple[str, DMARCRecord | None]]
) -> tuple[str, DMARCRecord] | None:
    """RFC 9989 §4.10.1: which record governs mail from ``author``, and where it is.

    ``walked`` is the tree walk from the Author Domain (its first entry is the Author
    Domain itself). In order of preference the record is the Author Domain's own, then
    its Organizational Domain's, then its Public Suffix Domain's (a ``psd=y`` record).
    Records on names between the author and its Organizational Domain do not apply:
    their ``sp`` is ignored, as §4.7 notes.
    """
    if walked and walked[0][0] == author and walked[0][1] is not None:
        return author, walked[0][1]
    found = [(name, rec) for name, rec in walked if rec is not None]
    org = organizational_domain(author, found)
    for name, rec in found:
        if name == org:
            return name, rec
    for name, rec in found:
        if rec.psd == "y":
            return name, rec
    return None


# -- RFC 7489 compatibility ------------------------------------------------------------------


@lru_cache(maxsize=1)
def _psl() -> Any:
    """The Public Suffix List, parsed once per process (about 40 ms)."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def psl_organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the registered domain per the PSL (unknown TLDs are suffixes).

    A name that is itself a public suffix is its own Organizational Domain.
    """
    private = _psl().privatesuffix(domain)
    return str(private) if private else domain


def pct_selected(pct: int, draw: float) -> bool:
    """RFC 7489 §6.6.4 sampling: ``draw`` uniform in [0, 1) selects pct % of messages."""
    if pct >= 100:
        return True
    if pct <= 0:
        return False
    return draw * 100 < pct


# -- alignment ------------------------------------------------------------------------------


def quick_alignment(author: str, identifier: str, strict: bool) -> bool | None:
    """Alignment decided without DNS, or None when Organizational Domains are needed.

    Identical names align in both modes and strict mode is a plain comparison
    (RFC 9989 §4.10.2 notes: no tree walk is needed then). A name without any common
    trailing label cannot share an Organizational Domain, which is always an ancestor
    (or the name itself), so it saves two walks on the commonest unaligned case.
    """
    if author == identifier:
        return True
    if strict:
        return False
    if author.rsplit(".", 1)[-1] != identifier.rsplit(".", 1)[-1]:
        return False
    return None


def relaxed_aligned(author_org: str, identifier_org: str) -> bool:
    """RFC 9989 §3.2.10.1: same Organizational Domain."""
    return author_org == identifier_org


# -- policy choice --------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyChoice:
    """The Domain Owner Assessment Policy for this message and what is asked of us."""

    policy: str  # from p, sp or np: none | quarantine | reject
    source: str  # "p" | "sp" | "np"
    requested: str  # after t=y (RFC 9989) or pct sampling (RFC 7489)
    testing: bool = False  # t=y lowered it
    sampled_out: bool = False  # pct left this message out


def needs_existence_check(
    record: DMARCRecord, record_domain: str, author: str, mode: Mode = "rfc9989"
) -> bool:
    """Whether the Author Domain's existence can change the policy.

    Only ``np`` depends on it, only for a subdomain of the policy domain, and only when
    ``np`` differs from the ``sp``/``p`` it would replace: otherwise the existence
    query would be spent for nothing. Asked for a pass too: its ``policy.dmarc``
    names the policy that applies.
    """
    if mode != "rfc9989" or author == record_domain or record.np is None:
        return False
    return record.np != (record.sp or record.p or "none")


def downgrade(policy: str) -> str:
    """The next less strict policy: reject -> quarantine -> none."""
    return {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")


def choose_policy(
    record: DMARCRecord,
    record_domain: str,
    author: str,
    *,
    author_exists: bool | None = None,
    mode: Mode = "rfc9989",
    pct_draw: float = 0.0,
) -> PolicyChoice:
    """Pick p/sp/np, then apply testing mode (RFC 9989) or sampling (RFC 7489).

    RFC 9989 §4.10.1: the Author Domain's own record gives ``p``; a record of its
    Organizational or Public Suffix Domain gives ``sp`` if the author exists, ``np``
    if it does not (NXDOMAIN, §3.2.13), falling back to ``sp`` then ``p``. Unknown
    existence (None) counts as existing: never a harsher policy on a guess.
    §4.7 ``t=y``: the policy is applied one level lower (reject -> quarantine,
    quarantine -> none). RFC 7489 §6.6.4: a message left out by ``pct`` gets the
    next less strict policy as well.
    """
    p = record.p or "none"
    if author == record_domain:
        policy, source = p, "p"
    elif mode == "rfc9989" and author_exists is False and record.np is not None:
        policy, source = record.np, "np"
    elif record.sp is not None:
        policy, source = record.sp, "sp"
    else:
        policy, source = p, "p"
    if mode == "rfc9989":
        if record.t and policy != "none":
            return PolicyChoice(policy, source, downgrade(policy), testing=True)
        return PolicyChoice(policy, source, policy)
    if policy != "none" and not pct_selected(record.pct, pct_draw):
        return PolicyChoice(policy, source, downgrade(policy), sampled_out=True)
    return PolicyChoice(policy, source, policy)


# -- the outcome ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the check reports and demands for one evaluated message."""

    symbol: str
    action: str  # "" | "reject" | "quarantine" | "tempfail"
    disposition: str  # none | quarantine | reject: what mailgate applies
    override: str  # RFC 7489 App. C PolicyOverrideType, or ""


def plan(
    result: str,
    requested: str,
    *,
    honor_reject: bool,
    honor_quarantine: bool,
    tempfail_on_temperror: bool,
    trusted_arc: bool,
    sampled_out: bool = False,
) -> Outcome:
    """Map a DMARC result and requested policy to a symbol and a hard action.

    A trusted ARC sealer's valid chain vouches that the message passed at the
    forwarder, so a reject/quarantine is not applied and the deviation is reported as
    ``trusted_forwarder``. A policy the site chose not to honour is ``local_policy``;
    a 7489 ``pct`` miss is ``sampled_out``. ``p=none`` never changes handling
    (RFC 9989 §5.4), and DNS trouble never becomes a false reject (§5.3.6).
    """
    if result == "pass":
        return Outcome("DMARC_PASS", "", "none", "")
    if result == "none":
        return Outcome("DMARC_NONE", "", "none", "")
    if result == "permerror":
        return Outcome("DMARC_PERMERROR", "", "none", "")
    if result == "temperror":
        return Outcome("DMARC_TEMPERROR", "tempfail" if tempfail_on_temperror else "", "none", "")
    # fail
    if requested in ("reject", "quarantine") and trusted_arc:
        return Outcome("ARC_TRUSTED_OVERRIDE", "", "none", "trusted_forwarder")
    if requested == "reject":
        if honor_reject:
            return Outcome("DMARC_REJECT", "reject", "reject", "")
        return Outcome("DMARC_REJECT", "", "none", "local_policy")
    if requested == "quarantine":
        if honor_quarantine:
            return Outcome("DMARC_QUARANTINE", "quarantine", "quarantine", "")
        return Outcome("DMARC_QUARANTINE", "", "none", "local_policy")
    return Outcome("DMARC_POLICY_NONE", "", "none", "sampled_out" if sampled_out else "")


# -- the Author Domain -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorDomain:
    """The RFC5322.From domain, or why there is none to evaluate."""

    domain: str = ""
    error: str = ""
    domains: tuple[str, ...] = field(default=())


_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
_DOMAIN_TEXT = r"[A-Za-z0-9.-]+"
_SIMPLE_FROM = re.compile(
    rf"^\s*(?:{_ATOMS}@({_DOMAIN_TEXT})|[^\"<>(),;:@\\]*<{_ATOMS}@({_DOMAIN_TEXT})>)\s*$"
)


def author_domain(headers: Iterable[tuple[bytes, bytes]]) -> AuthorDomain:
    """Extract the one Author Domain (RFC 9989 §5.3.1).

    Exactly one From field is required: zero or several make the message invalid
    under RFC 5322 §3.6 and RFC 9989 §4.4 says alignment cannot occur then. Several
    addresses are fine when they share one domain (one Author Domain); several
    domains stop DMARC. §5.3.1 allows evaluating each domain anyway and §11.5 warns
    that such messages are an evasion attempt; the error comes with the domains
    listed, and the check holds the message to the strictest of their policies (at
    most ``MAX_AUTHOR_DOMAINS`` of them), never to a pass.

    A malformed value (the parser had to skip part of it) is no Author Domain either
    (§4.4): it is reported like several domains, with every domain found in it.
    """
    fields = [raw for name, raw in headers if name == b"from"]
    if not fields:
        return AuthorDomain(error="no From header field")
    if len(fields) > 1:
        # Invalid (RFC 5322 3.6), but each field's domains are named, so that the
        # check can hold the message to the strictest of their policies.
        found: list[str] = []
        for raw_field in fields:
            one = author_domain([(b"from", raw_field)])
            found += [d for d in one.domains if d not in found]
        return AuthorDomain(error=f"{len(fields)} From header fields", domains=tuple(found))
    value = field_value(fields[0])
    simple = _SIMPLE_FROM.match(value)
    if simple is not None:
        # Fast path for "local@domain" and "Display Name <local@domain>": the stdlib's
        # header registry costs ~0.1 ms per message; anything with quotes, comments,
        # groups or several addresses still goes through it below.
        raw_domains = [simple.group(1) or simple.group(2)]
    else:
        try:
            parsed = email_policy.default.header_factory("From", value)
            raw_domains = [a.domain for a in parsed.addresses]
            defects = parsed.defects
        except Exception:  # the stdlib parser's failure modes are many; all mean "unusable"
            return _malformed_from("unparseable From header field", [], value)
        if any(isinstance(d, InvalidHeaderDefect) for d in defects):
            return _malformed_from("malformed From header field", raw_domains, value)
    if not raw_domains:
        return AuthorDomain(error="no address in the From header field")
    domains: list[str] = []
    for raw in raw_domains:
        dom = normalize_domain(raw) if raw else None
        if dom is None:
            return AuthorDomain(error=f"no valid domain in From address {raw!r}")
        if dom not in domains:
            domains.append(dom)
    if len(domains) > 1:
        return AuthorDomain(
            error=f"From header field has {len(domains)} domains", domains=tuple(domains)
        )
    return AuthorDomain(domain=domains[0], domains=tuple(domains))


_AT_DOMAIN = re.compile(r"@\s*([^\s@<>()\[\],;:\"\\]+)")


def _malformed_from(error: str, parsed: Iterable[str], value: str) -> AuthorDomain:
    """A From value the parser could not read cleanly: no Author Domain (RFC 9989 §4.4).

    The stdlib parser recovers what it can and returns the first address even from
    ``a@example.org <ceo@example.test>``; trusting that would let the unread part
    carry the real author past DMARC. Every domain that can be found is listed
    instead (the parsed addresses' and each ``@domain`` in the raw text), so the check
    holds the message to the strictest of their policies and never reports a pass.
    ``ObsoleteHeaderDefect`` (``J. Doe (x) <j@example.org>``) is not malformed.
    """
    lowered = value.lower()
    spots = [(m.start(1), m.group(1)) for m in _AT_DOMAIN.finditer(value)]
    spots += [(_position(lowered, raw), raw) for raw in parsed if raw]
    found: list[str] = []
    for _, raw in sorted(spots, key=lambda spot: spot[0]):
        dom = normalize_domain(raw)
        if dom is not None and dom not in found:
            found.append(dom)
    return AuthorDomain(error=error, domains=tuple(found))


def _position(lowered: str, domain: str) -> int:
    """Where ``domain`` first appears in the (lower-cased) value; unseen ones go last."""
    at = lowered.find(domain.lower())
    return at if at >= 0 else len(lowered)


# -- reading other checks' results ------------------------------------------------------------


@dataclass(frozen=True)
class Identifiers:
    """Authenticated Identifiers (and those that got a temporary error) for alignment."""

    spf_pass: str = ""
    spf_temperror: str = ""
    dkim_pass: tuple[str, ...] = ()
    dkim_temperror: tuple[str, ...] = ()


def identifiers(
    spf_result: str, spf_data: Mapping[str, object], dkim_data: Mapping[str, object]
) -> Identifiers:
    """SPF's MAIL FROM domain and every DKIM ``d=``, normalized, by outcome.

    RFC 9989 §3.2.4/§4.4.2: only the MAIL FROM identity counts for SPF. For the null
    sender that identity is ``postmaster@<HELO>`` (RFC 7208 §2.4), which the SPF check
    reports as its main result with ``identity`` "helo" and ``smtp.mailfrom``
    "postmaster@..."; that counts, a separate HELO check never does. §4.4.1: every
    passing DKIM signature is a candidate, except one whose key is in testing mode
    (RFC 6376 §3.6.1: treat it like unsigned mail).
    """
    spf_pass = spf_temp = ""
    identity = spf_data.get("identity")
    null_sender = identity == "helo" and str(spf_data.get("smtp.mailfrom") or "").startswith(
        "postmaster@"
    )
    if identity == "mailfrom" or null_sender:
        dom = normalize_domain(str(spf_data.get("domain") or ""))
        if dom and spf_result == "pass":
            spf_pass = dom
        elif dom and spf_result == "temperror":
            spf_temp = dom
    passed: list[str] = []
    temp: list[str] = []
    sigs = dkim_data.get("signatures")
    for sig in sigs if isinstance(sigs, list | tuple) else ():
        if not isinstance(sig, Mapping) or sig.get("testing") is True:
            continue
        dom = normalize_domain(str(sig.get("d") or ""))
        if not dom:
            continue
        if sig.get("result") == "pass" and dom not in passed:
            passed.append(dom)
        elif sig.get("result") == "temperror" and dom not in temp:
            temp.append(dom)
    return Identifiers(spf_pass, spf_temp, tuple(passed), tuple(temp))
