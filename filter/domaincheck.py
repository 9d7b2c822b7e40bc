"""``mailgate domain DOMAIN``: audit a domain's SPF, DMARC and MX for its admins (L2).

Why in mailgate: the admin who runs the filter is usually the one asked "why does
our mail land in spam elsewhere?", and the answer is mostly in these three records.
checkdmarc does the lookups and the parsing (LIBRARY-NOTES §5); this module points
it at ``dns.nameservers`` (so the audit sees what mailgate sees, and tests see the
loopback test server only), collects what it found into one plain dict, and turns
the common problems into advice an admin can act on.

DMARC is shown the RFC 9989 way, as checkdmarc 6 reads it: the policy record is
found by the DNS tree walk (not a public suffix list), ``pct`` no longer exists
(``t=y`` marks a testing policy), and ``np`` covers non-existent subdomains. Where
checkdmarc stops (several DMARC records at one name), the walk is redone with
``filter.dmarc``'s rules, as receivers and mailgate's own check do.

checkdmarc is synchronous and keeps a module-global DNS cache; the cache is cleared
at the start of each audit so a fix published a minute ago is seen.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import filter.dnsfeatures  # noqa: F401  # before dns.query loads: no DoH (see there)

# isort: split
import checkdmarc.dmarc
import checkdmarc.smtp
import checkdmarc.spf
import checkdmarc.utils
import dns.exception
import dns.nameserver
import dns.resolver

from filter import dmarc as dmarc_rules
from filter.domains import to_a_label
from filter.units import Address

__all__ = ["MAX_SPF_LOOKUPS", "MAX_SPF_VOID_LOOKUPS", "audit", "domain_name"]

MAX_SPF_LOOKUPS = 10  # RFC 7208 section 4.6.4
MAX_SPF_VOID_LOOKUPS = 2  # RFC 7208 section 4.6.4

_MAX_NAME = 253  # octets of a name in text form, without the trailing dot (RFC 1035 2.3.4)
_MAX_LABEL = 63
_EMPTY_LABEL = "an empty label (two dots in a row, or a leading dot)"
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")

_DMARC_TAGS = ("p", "sp", "np", "adkim", "aspf", "t", "psd", "fo", "rua", "ruf")


def _nameservers(servers: Sequence[Address]) -> list[dns.nameserver.Nameserver] | None:
    """checkdmarc's form of ``dns.nameservers``: it takes no "ip:port" strings."""
    if not servers:
        return None  # /etc/resolv.conf, as everywhere else in mailgate
    return [dns.nameserver.Do53Nameserver(a.host, port=a.port) for a in servers]


def _problem(
    out: list[dict[str, str]], severity: str, area: str, problem: str, advice: str
) -> None:
    out.append({"severity": severity, "area": area, "problem": problem, "advice": advice})


def audit(domain: str, nameservers: Sequence[Address] = (), timeout: float = 3.0) -> dict[str, Any]:
    """Look up and judge ``domain``'s SPF, DMARC and MX records.

    Returns ``{"domain", "spf", "dmarc", "mx", "problems", "errors", "warnings"}``;
    ``problems`` is a list of ``{"severity": "error"|"warning", "area", "problem",
    "advice"}`` and ``errors``/``warnings`` count them. Raises ValueError when
    ``domain`` is not a domain name.
    """
    name = domain_name(domain)
    ns = _nameservers(nameservers)
    checkdmarc.utils.DNS_CACHE.clear()
    kw: dict[str, Any] = {"nameservers": ns, "timeout": timeout}
    spf = dict(checkdmarc.spf.check_spf(name, **kw))
    dmarc, duplicates = _dmarc_lookup(name, kw)
    mx = dict(checkdmarc.smtp.check_mx(name, **kw))
    problems: list[dict[str, str]] = []
    spf_view = _spf(name, spf, problems)
    dmarc_view = _dmarc(name, dmarc, problems, duplicates)
    mx_view = _mx(name, mx, problems)
    return {
        "domain": name,
        "nameservers": [str(a) for a in nameservers],
        "spf": spf_view,
        "dmarc": dmarc_view,
        "mx": mx_view,
        "problems": problems,
        "errors": sum(1 for p in problems if p["severity"] == "error"),
        "warnings": sum(1 for p in problems if p["severity"] == "warning"),
    }


def domain_name(domain: str) -> str:
    """The A-label form of the name an admin typed; ValueError says what is wrong.

    Checked before any lookup: checkdmarc would report a malformed name as the
    domain's DNS problem (exit 1), when the mistake is on the command line (exit 2).
    Mail domains are host names (RFC 5321 4.1.2): letters, digits, inner hyphens.
    """
    why = _malformed(domain.strip())
    name = to_a_label(domain)
    if why is None and name is None:
        why = "IDNA refuses it"
    if why is not None or name is None:
        raise ValueError(f"{domain!r} is not a domain name: {why}")
    return name


def _malformed(text: str) -> str | None:
    """Why ``text`` cannot be a mail domain, or None if it can (IDNA aside)."""
    if not text:
        return "it is empty"
    if "@" in text:
        return "it is an e-mail address; give the part after the @"
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(text.strip("[]"))
        return "it is an IP address"
    if ".." in text or text.startswith("."):
        return _EMPTY_LABEL  # before to_a_label, which strips any number of final dots
    name = to_a_label(text)
    if name is None:
        return None  # IDNA's verdict, worded by the caller
    labels = name.split(".")
    if len(labels) < 2:
        return "a single label (a domain that sends mail has at least two)"
    if len(name) > _MAX_NAME:
        return f"longer than {_MAX_NAME} characters"
    for label in labels:
        if not label:
            return _EMPTY_LABEL
        if len(label) > _MAX_LABEL:
            return f"label {label[:16]}… is longer than {_MAX_LABEL} characters"
        if not _LDH_LABEL.match(label):
            return f"label {label!r} has characters other than letters, digits and inner hyphens"
    if labels[-1].isdigit():
        return "the top-level label is numeric"
    return None


def _spf(domain: str, res: dict[str, Any], problems: list[dict[str, str]]) -> dict[str, Any]:
    parsed = res.get("parsed") or {}
    view: dict[str, Any] = {
        "record": res.get("record"),
        "valid": bool(res.get("valid")),
        "dns_lookups": res.get("dns_lookups"),
        "void_dns_lookups": res.get("void_dns_lookups"),
        "all": parsed.get("all") if isinstance(parsed, dict) else None,
        "redirect": parsed.get("redirect") if isinstance(parsed, dict) else None,
        "error": res.get("error"),
        "warnings": list(res.get("warnings") or []),
    }
    error = str(res.get("error") or "")
    if view["record"] is None:
        if "does not exist" in error and "domain" in error.lower():
            _problem(
                problems,
                "error",
                "domain",
                f"{domain} does not exist in DNS",
                "check the spelling; a domain that sends mail needs to exist",
            )
            return view
        if _lookup_failed(error):
            _problem(problems, "error", "spf", f"SPF lookup failed: {error}", _ANSWER_ADVICE)
            return view
        _problem(
            problems,
            "error",
            "spf",
            f"no SPF record ({error})" if error else "no SPF record",
            f'publish a TXT record at {domain}: "v=spf1 mx -all" (list every host that '
            'sends as the domain); a domain that sends no mail publishes "v=spf1 -all"',
        )
        return view
    lookups = view["dns_lookups"]
    if isinstance(lookups, int) and lookups > MAX_SPF_LOOKUPS:
        _problem(
            problems,
            "error",
            "spf",
            f"too many DNS lookups: {lookups} > {MAX_SPF_LOOKUPS} (RFC 7208 4.6.4); "
            "receivers answer permerror, which counts as no SPF",
            "replace include:/a/mx mechanisms of fixed hosts by ip4:/ip6: ranges, and drop "
            "includes of services the domain no longer uses",
        )
    voids = view["void_dns_lookups"]
    if isinstance(voids, int) and voids > MAX_SPF_VOID_LOOKUPS:
        _problem(
            problems,
            "error",
            "spf",
            f"too many void lookups: {voids} > {MAX_SPF_VOID_LOOKUPS} (RFC 7208 4.6.4)",
            "remove mechanisms that name hosts without records",
        )
    too_many = isinstance(lookups, int) and lookups > MAX_SPF_LOOKUPS
    if error and not view["valid"] and not too_many:
        _problem(
            problems,
            "error",
            "spf",
            f"SPF record is invalid: {error}",
            "fix the record's syntax; receivers treat an invalid record as permerror",
        )
    qualifier = view["all"]
    if qualifier == "pass":
        _problem(
            problems,
            "error",
            "spf",
            "the record ends in +all: every host on the Internet may send as the domain",
            "end the record with -all (or ~all while moving senders over)",
        )
    elif qualifier == "neutral" and view["redirect"] is None:
        _problem(
            problems,
            "warning",
            "spf",
            "the record ends in ?all (or has no all): it says nothing about other hosts",
            "end the record with ~all, then -all once every sender is listed",
        )
    return view


# checkdmarc's MultipleDMARCRecords text: it raises instead of walking on, as receivers do.
_MULTIPLE_RECORDS = "Multiple DMARC policy records"
_UNRELATED_RECORDS = "Unrelated TXT records were discovered"


def _dmarc_lookup(name: str, kw: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """checkdmarc's DMARC result, and the names on the walk holding several records.

    checkdmarc stops at a name with several DMARC records, which would read as "no
    DMARC record" and advice to publish one; receivers discard them all and walk on
    (RFC 9989 §4.10 steps 2 and 6). Then the walk is redone here with mailgate's own
    rules, so the audit shows the record receivers will actually use.
    """
    res = dict(checkdmarc.dmarc.check_dmarc(name, **kw))
    error = str(res.get("error") or "")
    unrelated = _UNRELATED_RECORDS in error
    if res.get("record") is not None or not (_MULTIPLE_RECORDS in error or unrelated):
        return res, []
    # checkdmarc also stops at a DMARC record that shares its name with other TXT
    # records (site verifications, say); receivers skip those (§4.10 step 2) and use it.
    try:
        walked, duplicates = _walk_as_receivers_do(name, kw)
    except dns.exception.DNSException as exc:
        return {"record": None, "location": None, "valid": False, "error": str(exc)}, []
    return (walked | {"unrelated": error}) if unrelated else walked, duplicates


def _walk_as_receivers_do(
    name: str, kw: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The RFC 9989 §4.10 walk from ``name``, in checkdmarc's result shape."""
    walked: list[tuple[str, dmarc_rules.DMARCRecord | None]] = []
    duplicates: list[tuple[str, int]] = []
    for target in dmarc_rules.walk_targets(name):
        lookup = dmarc_rules.select_record(_txt(f"_dmarc.{target}", kw))
        if lookup.candidates > 1:
            duplicates.append((target, lookup.candidates))
        walked.append((target, lookup.record))
        if dmarc_rules.walk_stops(lookup.record):
            break
    found = dmarc_rules.policy_record(name, walked)
    if found is None:
        return {"record": None, "location": None, "valid": False, "error": None}, duplicates
    location, record = found
    res: dict[str, Any] = {"record": record.raw, "location": location, "valid": True}
    try:
        parsed = checkdmarc.dmarc.parse_dmarc_record(record.raw, location, **kw)
    except checkdmarc.dmarc.DMARCError as exc:
        return res | {"valid": False, "error": str(exc)}, duplicates
    return res | {"tags": parsed["tags"], "warnings": parsed["warnings"]}, duplicates


def _txt(name: str, kw: dict[str, Any]) -> list[str]:
    """TXT records at ``name``; none for NXDOMAIN or NODATA, other DNS errors raise."""
    try:
        return list(checkdmarc.utils.query_dns(name, "TXT", **kw))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []


def _duplicate_problems(
    duplicates: Sequence[tuple[str, int]], location: object, problems: list[dict[str, str]]
) -> None:
    """One error per name whose DMARC records receivers discard for being several."""
    used = (
        f"; they use the record at _dmarc.{location} instead"
        if location
        else "; with no other record on the walk, the domain has no DMARC policy"
    )
    for target, count in duplicates:
        _problem(
            problems,
            "error",
            "dmarc",
            f"{count} DMARC records at _dmarc.{target}: receivers ignore all of them{used}",
            f"keep exactly one v=DMARC1 TXT record at _dmarc.{target} and delete the others",
        )


def _dmarc(
    domain: str,
    res: dict[str, Any],
    problems: list[dict[str, str]],
    duplicates: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    tags_raw = res.get("tags") or {}
    tags = {
        k: v.get("value") if isinstance(v, dict) else v
        for k, v in (tags_raw.items() if isinstance(tags_raw, dict) else [])
    }
    view: dict[str, Any] = {
        "record": res.get("record"),
        "location": res.get("location"),
        "valid": bool(res.get("valid")),
        "inherited": bool(res.get("location")) and res.get("location") != domain,
        "tags": {k: tags[k] for k in _DMARC_TAGS if k in tags},
        "error": res.get("error"),
        "warnings": list(res.get("warnings") or []),
        "duplicates": [{"name": n, "records": c} for n, c in duplicates],
    }
    _duplicate_problems(duplicates, view["location"], problems)
    if res.get("unrelated"):
        at = re.search(r"at (_dmarc\.[^\s:]+)", str(res["unrelated"]))
        where = at.group(1).rstrip(".") if at else f"_dmarc.{domain}"
        _problem(
            problems,
            "warning",
            "dmarc",
            f"TXT records other than DMARC at {where}: receivers skip them, but"
            " some DMARC parsers do not",
            f"publish only the DMARC record at {where}; move verification tokens to"
            " their own names",
        )
    if view["record"] is None:
        error = str(res.get("error") or "")
        if duplicates and not error:
            return view  # the duplicates are the problem: publishing more would not help
        if _lookup_failed(error):
            _problem(problems, "error", "dmarc", f"DMARC lookup failed: {error}", _ANSWER_ADVICE)
            return view
        _problem(
            problems,
            "error",
            "dmarc",
            f"no DMARC record ({res.get('error') or 'not found'})",
            f'publish a TXT record at _dmarc.{domain}: "v=DMARC1; p=none; '
            f'rua=mailto:dmarc-reports@{domain}" to collect reports, then move to '
            "p=quarantine and p=reject once the reports show every sender aligned",
        )
        return view
    if not view["valid"]:
        _problem(
            problems,
            "error",
            "dmarc",
            f"DMARC record is invalid: {res.get('error')}",
            "fix the record; receivers ignore an invalid DMARC record",
        )
        return view
    policy = tags.get("p")
    if policy == "none":
        _problem(
            problems,
            "warning",
            "dmarc",
            "p=none: monitoring only, receivers take no action on failing mail",
            "once aggregate reports show your senders pass, move to p=quarantine, then p=reject",
        )
    if tags.get("t") == "y":
        _problem(
            problems,
            "warning",
            "dmarc",
            "t=y: the policy is in testing mode (RFC 9989), receivers are asked not to "
            "apply it in full",
            "remove t=y when the testing period is over",
        )
    if _has_tag(str(view["record"]), "pct"):
        _problem(
            problems,
            "warning",
            "dmarc",
            "pct= is no longer part of DMARC (RFC 9989); receivers ignore it",
            "remove pct=; use t=y for a gradual start instead",
        )
    if not tags.get("rua"):
        _problem(
            problems,
            "warning",
            "dmarc",
            "no rua: the domain gets no aggregate reports",
            f"add rua=mailto:dmarc-reports@{domain} to learn who sends as the domain",
        )
    return view


# dnspython's words for "no answer" (LifetimeTimeout, NoNameservers: a timeout, SERVFAIL
# or REFUSED from every server). checkdmarc passes only the text of the error on, and
# reports these as "record not found": an audit must not advise publishing a record
# that may well exist.
_LOOKUP_FAILURES = ("The resolution lifetime expired", "All nameservers failed to answer")
_ANSWER_ADVICE = (
    "check that the domain's name servers answer (and that mailgate's dns.nameservers "
    "reach them), then run the audit again"
)


def _lookup_failed(error: str) -> bool:
    """True when checkdmarc's error is a failed lookup rather than an answer."""
    return any(words in error for words in _LOOKUP_FAILURES)


def _has_tag(record: str, tag: str) -> bool:
    return any(part.split("=", 1)[0].strip().lower() == tag for part in record.split(";"))


def _mx(domain: str, res: dict[str, Any], problems: list[dict[str, str]]) -> dict[str, Any]:
    hosts = [
        {
            "preference": h.get("preference"),
            "hostname": h.get("hostname"),
            "addresses": list(h.get("addresses") or []),
        }
        for h in (res.get("hosts") or [])
        if isinstance(h, dict)
    ]
    warnings = [str(w) for w in (res.get("warnings") or [])]
    view: dict[str, Any] = {"hosts": hosts, "error": res.get("error"), "warnings": warnings}
    null_mx = any("null MX" in w for w in warnings)
    view["null_mx"] = null_mx
    if res.get("error"):
        _problem(
            problems,
            "error",
            "mx",
            f"MX lookup failed: {res.get('error')}",
            _ANSWER_ADVICE,
        )
    elif null_mx:
        pass  # a deliberate "no mail here" (RFC 7505): not a problem to fix
    elif not hosts:
        _problem(
            problems,
            "error",
            "mx",
            "no MX record: senders fall back to the domain's A/AAAA record, if any",
            f"publish an MX record for {domain} naming the host that receives its mail "
            '(or a null MX, "0 .", if the domain receives none)',
        )
    for h in hosts:
        if not h["addresses"]:
            _problem(
                problems,
                "error",
                "mx",
                f"MX host {h['hostname']} has no A/AAAA record",
                "give the host an address, or point the MX at a host that has one",
            )
    return view
