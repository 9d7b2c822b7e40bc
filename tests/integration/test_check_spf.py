"""The SPF check against a real loopback DNS server through the real Resolver.

Each test publishes its own records in the session ``dns_zone`` (restored afterwards)
and builds a fresh Resolver, so no answer is cached across tests. Names live under
``spf.test`` (inside the server's ``test`` zone, so NXDOMAIN/NODATA come with a SOA)
except for the RFC 7208 Appendix A zone, which is example.com / example.org.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import pytest

from filter import replies
from filter.checks import Context
from filter.checks.spf import SPFCheck, _ResolverQuery, evaluate, select_identity
from filter.model import ClientInfo, Envelope
from filter.policy.schema import DEFAULT_POLICY, DNSPolicy, Policy, SPFPolicy
from filter.resolver import Resolver, reverse_name
from filter.results import Action, CheckResult
from filter.units import Address
from tests.rig.dnsserver import ZoneDNSServer, soa

HELO = "client.elsewhere.test"  # no SPF record: the HELO check adds nothing by default


def policy(**spf: Any) -> Policy:
    """The default policy with a short DNS timeout and ``[spf]`` overrides."""
    return dataclasses.replace(DEFAULT_POLICY, spf=SPFPolicy(**spf), dns=DNSPolicy(timeout=1.0))


def resolver_for(server: ZoneDNSServer) -> Resolver:
    return Resolver([Address(server.host, server.port)], timeout=1.0)


def publish(server: ZoneDNSServer, records: Iterable[tuple[str, str, Any]]) -> None:
    """Replace each (name, type) RRset named in ``records`` with the records given."""
    grouped: dict[tuple[str, str], list[Any]] = {}
    for name, rtype, value in records:
        grouped.setdefault((name, rtype), []).append(value)
    for (name, rtype), values in grouped.items():
        server.set_records(name, rtype, values)


async def check(
    server: ZoneDNSServer,
    ip: str,
    mail_from: str,
    helo: str | None = HELO,
    pol: Policy | None = None,
    resolver: Resolver | None = None,
) -> CheckResult:
    ctx = Context(
        client=ClientInfo(ip=ip, port=25000, session_id="S1", helo=helo),
        policy=pol or policy(),
        envelope=Envelope(mail_from=mail_from),
        resolver=resolver or resolver_for(server),
    )
    return await SPFCheck().run(ctx)


def symbols(result: CheckResult) -> dict[str, float]:
    return {s.name: s.score for s in result.symbols}


# -- basic results ----------------------------------------------------------------------


async def test_pass_on_ip4_with_symbol_score_and_report_data(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, [("p.spf.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")])
    r = await check(dns_zone, "192.0.2.7", "alice@p.spf.test")
    assert r.result == "pass"
    assert symbols(r) == {"SPF_PASS": -0.5}
    assert r.symbols[0].detail == "sender SPF authorized"
    assert r.decision is None
    assert r.data == {
        "identity": "mailfrom",
        "smtp.mailfrom": "alice@p.spf.test",
        "smtp.helo": HELO,
        "domain": "p.spf.test",
        "reason": "sender SPF authorized",
        "helo_result": "none",
        "helo_reason": r.data["helo_reason"],
    }


@pytest.mark.parametrize(
    ("record", "word", "score"),
    [
        ("v=spf1 ip4:198.51.100.1 -all", "fail", 2.0),
        ("v=spf1 ip4:198.51.100.1 ~all", "softfail", 1.0),
        ("v=spf1 ip4:198.51.100.1 ?all", "neutral", 0.0),
        ("v=spf1 ip4:198.51.100.1", "neutral", 0.0),  # RFC 7208 4.7: default is neutral
    ],
)
async def test_all_qualifiers(
    dns_zone: ZoneDNSServer, record: str, word: str, score: float
) -> None:
    publish(dns_zone, [("q.spf.test", "TXT", record)])
    r = await check(dns_zone, "192.0.2.7", "bob@q.spf.test")
    assert r.result == word
    assert symbols(r) == {f"SPF_{word.upper()}": score}
    assert r.decision is None  # reject_on_fail is off by default


async def test_none_without_record_and_for_a_nonexistent_domain(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [("norec.spf.test", "TXT", "some other text"), ("norec.spf.test", "A", "192.0.2.1")],
    )
    r = await check(dns_zone, "192.0.2.7", "a@norec.spf.test")
    assert (r.result, symbols(r)) == ("none", {"SPF_NONE": 0.0})
    assert r.symbols[0].detail == "no SPF record for norec.spf.test"
    r = await check(dns_zone, "192.0.2.7", "a@nothing-here.spf.test")
    assert r.result == "none"
    assert r.symbols[0].detail == "no SPF record for nothing-here.spf.test"


async def test_reject_on_fail_decides_only_for_fail(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [
            ("f.spf.test", "TXT", "v=spf1 ip4:198.51.100.1 -all"),
            ("s.spf.test", "TXT", "v=spf1 ip4:198.51.100.1 ~all"),
        ],
    )
    strict = policy(reject_on_fail=True)
    r = await check(dns_zone, "192.0.2.7", "x@f.spf.test", pol=strict)
    assert r.result == "fail"
    assert r.decision is not None
    assert r.decision.action is Action.REJECT
    assert r.decision.reply == replies.REJECT_SPF
    assert str(r.decision.reply).startswith("550 5.7.23")
    assert "x@f.spf.test" in r.decision.reason
    r = await check(dns_zone, "198.51.100.1", "x@f.spf.test", pol=strict)
    assert (r.result, r.decision) == ("pass", None)
    r = await check(dns_zone, "192.0.2.7", "x@s.spf.test", pol=strict)
    assert (r.result, r.decision) == ("softfail", None)


# -- mechanisms and modifiers -------------------------------------------------------------


async def test_include_redirect_mx_a(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [
            ("inc.spf.test", "TXT", "v=spf1 include:provider.spf.test -all"),
            ("provider.spf.test", "TXT", "v=spf1 ip4:203.0.113.0/25 -all"),
            ("red.spf.test", "TXT", "v=spf1 redirect=provider.spf.test"),
            ("mx.spf.test", "TXT", "v=spf1 mx -all"),
            ("mx.spf.test", "MX", "10 out1.spf.test"),
            ("mx.spf.test", "MX", "20 out2.spf.test"),
            ("out1.spf.test", "A", "203.0.113.200"),
            ("out2.spf.test", "AAAA", "2001:db8::25"),
            ("out2.spf.test", "A", "203.0.113.201"),
            ("a.spf.test", "TXT", "v=spf1 a a:alias.spf.test -all"),
            ("a.spf.test", "A", "203.0.113.210"),
            ("alias.spf.test", "CNAME", "out1.spf.test"),
        ],
    )
    assert (await check(dns_zone, "203.0.113.5", "u@inc.spf.test")).result == "pass"
    assert (await check(dns_zone, "203.0.113.200", "u@inc.spf.test")).result == "fail"
    assert (await check(dns_zone, "203.0.113.5", "u@red.spf.test")).result == "pass"
    assert (await check(dns_zone, "203.0.113.200", "u@red.spf.test")).result == "fail"
    assert (await check(dns_zone, "203.0.113.201", "u@mx.spf.test")).result == "pass"
    assert (await check(dns_zone, "2001:db8::25", "u@mx.spf.test")).result == "pass"
    assert (await check(dns_zone, "203.0.113.5", "u@mx.spf.test")).result == "fail"
    assert (await check(dns_zone, "203.0.113.210", "u@a.spf.test")).result == "pass"
    # a:alias follows the CNAME to out1.
    assert (await check(dns_zone, "203.0.113.200", "u@a.spf.test")).result == "pass"
    assert (await check(dns_zone, "203.0.113.201", "u@a.spf.test")).result == "fail"


async def test_ptr_mechanism_validates_the_reverse_name(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [
            ("ptr.spf.test", "TXT", "v=spf1 ptr -all"),
            ("9.113.0.203.in-addr.arpa", "PTR", "mail.ptr.spf.test"),
            ("mail.ptr.spf.test", "A", "203.0.113.9"),
            ("10.113.0.203.in-addr.arpa", "PTR", "liar.ptr.spf.test"),  # A does not match
            ("liar.ptr.spf.test", "A", "203.0.113.99"),
        ],
    )
    assert (await check(dns_zone, "203.0.113.9", "u@ptr.spf.test")).result == "pass"
    assert (await check(dns_zone, "203.0.113.10", "u@ptr.spf.test")).result == "fail"
    assert (await check(dns_zone, "203.0.113.11", "u@ptr.spf.test")).result == "fail"  # no PTR


async def test_ptr_skips_a_name_whose_lookup_fails(dns_zone: ZoneDNSServer) -> None:
    """RFC 7208 5.5: a DNS error on one PTR name skips that name (pyspf said temperror)."""
    publish(
        dns_zone,
        [
            ("ptr2.spf.test", "TXT", "v=spf1 ptr -all"),
            ("12.113.0.203.in-addr.arpa", "PTR", "broken.ptr2.spf.test"),
            ("12.113.0.203.in-addr.arpa", "PTR", "good.ptr2.spf.test"),
            ("good.ptr2.spf.test", "A", "203.0.113.12"),
        ],
    )
    dns_zone.set_name_mode("broken.ptr2.spf.test", "servfail")
    r = await check(dns_zone, "203.0.113.12", "u@ptr2.spf.test")
    assert r.result == "pass"


async def test_ipv6_client_and_ip6_mechanism(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, [("six.spf.test", "TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8:1::/48 -all")])
    assert (await check(dns_zone, "2001:db8:1::77", "u@six.spf.test")).result == "pass"
    assert (await check(dns_zone, "2001:db8:2::77", "u@six.spf.test")).result == "fail"
    # An IPv4-mapped client is IPv4 for SPF.
    assert (await check(dns_zone, "::ffff:192.0.2.9", "u@six.spf.test")).result == "pass"


async def test_exp_explanation_reaches_the_symbol_detail(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [
            ("exp.spf.test", "TXT", "v=spf1 ip4:198.51.100.1 -all exp=why.exp.spf.test"),
            ("why.exp.spf.test", "TXT", "%{i} is not one of %{d}'s designated mail servers."),
        ],
    )
    r = await check(dns_zone, "192.0.2.7", "u@exp.spf.test")
    assert r.result == "fail"
    expected = "192.0.2.7 is not one of exp.spf.test's designated mail servers."
    assert r.symbols[0].detail == expected
    assert r.data["reason"] == expected


async def test_macro_expansion_over_253_characters_loses_labels_from_the_left(
    dns_zone: ZoneDNSServer,
) -> None:
    """RFC 7208 7.3: an expanded name over 253 characters is truncated from the left,
    label by label, until it fits. pyspf removed one label only, so this 323-character
    name (two labels too long) was never queried and the check failed."""
    local = "a" * 61
    publish(
        dns_zone,
        [
            ("long.spf.test", "TXT", "v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.long.spf.test -all"),
            (f"{local}.{local}.{local}.long.spf.test", "A", "127.0.0.2"),
        ],
    )
    r = await check(dns_zone, "192.0.2.7", f"{local}@long.spf.test")
    assert r.result == "pass", r.data["reason"]
    asked = [n for n, rtype, _ in dns_zone.query_log() if n.endswith("long.spf.test")]
    assert asked == ["long.spf.test", f"{local}.{local}.{local}.long.spf.test"]


# -- errors -------------------------------------------------------------------------------


async def test_permerror_cases(dns_zone: ZoneDNSServer) -> None:
    chain = [(f"l{i}.spf.test", "TXT", f"v=spf1 include:l{i + 1}.spf.test -all") for i in range(11)]
    chain.append(("l11.spf.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all"))
    publish(
        dns_zone,
        [
            ("two.spf.test", "TXT", "v=spf1 -all"),
            ("two.spf.test", "TXT", "v=spf1 +all"),
            ("syn.spf.test", "TXT", "v=spf1 ip4:192.0.2.300 -all"),
            ("bad.spf.test", "TXT", "v=spf1 ip4:192.0.2.0/24 moo -all"),
            ("void.spf.test", "TXT", "v=spf1 a:v1.spf.test a:v2.spf.test a:v3.spf.test -all"),
            ("twovoid.spf.test", "TXT", "v=spf1 a:v1.spf.test a:v2.spf.test ip4:192.0.2.0/24 -all"),
            *chain,
        ],
    )
    cases = {
        "two": "Two or more type TXT spf records found",
        "syn": "Invalid IP4 address",
        "bad": "Unknown mechanism",
        "void": "Void lookup limit of 2 exceeded",
        "l0": "Too many DNS lookups",
    }
    for label, why in cases.items():
        r = await check(dns_zone, "192.0.2.7", f"u@{label}.spf.test")
        assert r.result == "permerror", label
        assert symbols(r) == {"SPF_PERMERROR": 0.5}
        assert why in r.symbols[0].detail, (label, r.symbols[0].detail)
    # Exactly at the limits is fine: 2 voids, 10 includes.
    assert (await check(dns_zone, "192.0.2.7", "u@twovoid.spf.test")).result == "pass"
    assert (await check(dns_zone, "192.0.2.7", "u@l1.spf.test")).result == "pass"


async def test_temperror_on_timeout_and_servfail_never_decides(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [
            ("slow.spf.test", "TXT", "v=spf1 -all"),
            ("sf.spf.test", "TXT", "v=spf1 include:inner.sf.spf.test -all"),
        ],
    )
    dns_zone.set_name_mode("slow.spf.test", "timeout")
    dns_zone.set_name_mode("inner.sf.spf.test", "servfail")
    strict = policy(reject_on_fail=True)
    t0 = time.monotonic()
    r = await check(dns_zone, "192.0.2.7", "u@slow.spf.test", pol=strict)
    assert time.monotonic() - t0 < 5
    assert (r.result, r.decision) == ("temperror", None)
    assert symbols(r) == {"SPF_TEMPERROR": 0.0}
    assert "timeout" in r.symbols[0].detail
    r = await check(dns_zone, "192.0.2.7", "u@sf.spf.test", pol=strict)
    assert (r.result, r.decision) == ("temperror", None)
    assert "servfail" in r.symbols[0].detail


async def test_whole_server_down_is_temperror(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_mode("timeout")
    r = await check(dns_zone, "192.0.2.7", "u@anything.spf.test", helo=None)
    assert r.result == "temperror"


async def test_time_budget_ends_a_slow_evaluation(dns_zone: ZoneDNSServer) -> None:
    """The evaluation's DNS budget turns a slow include chain into temperror."""
    chain = [(f"c{i}.spf.test", "TXT", f"v=spf1 include:c{i + 1}.spf.test -all") for i in range(8)]
    publish(dns_zone, [*chain, ("c8.spf.test", "TXT", "v=spf1 +all")])
    dns_zone.set_delay(0.1)
    resolver = resolver_for(dns_zone)
    lookup = resolver.blocking(asyncio.get_running_loop())
    ident = select_identity("u@c0.spf.test", HELO)
    t0 = time.monotonic()
    v = await asyncio.to_thread(evaluate, lookup, "192.0.2.7", ident, HELO, "mx.test", 0.35)
    assert v.word == "temperror"
    assert "budget" in v.explanation
    assert time.monotonic() - t0 < 1.0


async def test_time_budget_also_ends_the_query_in_flight(dns_zone: ZoneDNSServer) -> None:
    """One slow answer cannot carry the evaluation a whole DNS timeout past its budget:
    a tight check_timeout then gets SPF's own temperror, identity and all."""
    publish(dns_zone, [("late.spf.test", "TXT", "v=spf1 +all")])
    dns_zone.set_delay(2.0)
    resolver = Resolver([Address(dns_zone.host, dns_zone.port)], timeout=3.0)
    lookup = resolver.blocking(asyncio.get_running_loop())
    ident = select_identity("u@late.spf.test", HELO)
    t0 = time.monotonic()
    v = await asyncio.to_thread(evaluate, lookup, "192.0.2.7", ident, HELO, "mx.test", 0.4)
    elapsed = time.monotonic() - t0
    assert v.word == "temperror" and "budget" in v.explanation
    assert elapsed < 1.2, elapsed  # the budget, not the 2 s answer or the 3 s timeout


# -- identities ---------------------------------------------------------------------------


async def test_null_sender_checks_postmaster_at_helo(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, [("relay.spf.test", "TXT", "v=spf1 ip4:192.0.2.50 -all")])
    r = await check(dns_zone, "192.0.2.50", "", helo="relay.spf.test")
    assert r.result == "pass"
    assert r.data["identity"] == "helo"
    assert r.data["smtp.mailfrom"] == "postmaster@relay.spf.test"
    assert r.data["smtp.helo"] == "relay.spf.test"
    assert r.data["helo_result"] == "pass"
    assert symbols(r) == {"SPF_PASS": -0.5}  # not counted twice as SPF_HELO_PASS
    r = await check(
        dns_zone, "192.0.2.51", "", helo="relay.spf.test", pol=policy(reject_on_fail=True)
    )
    assert r.result == "fail"
    assert r.decision is not None  # the null sender's identity is the HELO one


async def test_null_sender_with_literal_helo_is_none_without_dns(dns_zone: ZoneDNSServer) -> None:
    r = await check(dns_zone, "192.0.2.50", "", helo="[192.0.2.50]")
    assert r.result == "none"
    assert r.data["identity"] == "helo"
    assert dns_zone.count() == 0


async def test_helo_identity_adds_symbols_but_mail_from_decides(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [
            ("md.spf.test", "TXT", "v=spf1 ip4:192.0.2.60 -all"),
            ("good-helo.spf.test", "TXT", "v=spf1 ip4:192.0.2.60 ip4:192.0.2.61 -all"),
            ("bad-helo.spf.test", "TXT", "v=spf1 -all"),
        ],
    )
    r = await check(dns_zone, "192.0.2.60", "u@md.spf.test", helo="good-helo.spf.test")
    assert r.result == "pass"
    assert symbols(r) == {"SPF_PASS": -0.5, "SPF_HELO_PASS": 0.0}
    assert (r.data["identity"], r.data["helo_result"]) == ("mailfrom", "pass")
    r = await check(dns_zone, "192.0.2.61", "u@md.spf.test", helo="good-helo.spf.test")
    assert r.result == "fail"
    assert symbols(r) == {"SPF_FAIL": 2.0, "SPF_HELO_PASS": 0.0}
    r = await check(
        dns_zone,
        "192.0.2.60",
        "u@md.spf.test",
        helo="bad-helo.spf.test",
        pol=policy(reject_on_fail=True),
    )
    assert r.result == "pass"
    assert symbols(r) == {"SPF_PASS": -0.5, "SPF_HELO_FAIL": 1.0}
    assert r.data["helo_result"] == "fail"
    assert r.decision is None  # a HELO fail alone never rejects here


async def test_helo_check_off_or_skipped_sends_no_query(dns_zone: ZoneDNSServer) -> None:
    publish(dns_zone, [("md2.spf.test", "TXT", "v=spf1 ip4:192.0.2.60 -all")])
    r = await check(
        dns_zone, "192.0.2.60", "u@md2.spf.test", helo="h.spf.test", pol=policy(helo=False)
    )
    assert (r.result, r.data["helo_result"]) == ("pass", "")
    assert dns_zone.count("h.spf.test") == 0
    for helo in ("[192.0.2.60]", "[IPv6:2001:db8::1]", "singlelabel", "192.0.2.60"):
        r = await check(dns_zone, "192.0.2.60", "u@md2.spf.test", helo=helo)
        assert (r.result, r.data["helo_result"]) == ("pass", ""), helo
    assert {q[0] for q in dns_zone.query_log()} == {"md2.spf.test"}


async def test_internationalised_sender_domain_uses_a_labels(dns_zone: ZoneDNSServer) -> None:
    publish(
        dns_zone,
        [
            ("xn--bcher-kva.spf.test", "TXT", "v=spf1 ip4:192.0.2.70 -all"),
            ("xn--mnchen-3ya.spf.test", "TXT", "v=spf1 ip4:192.0.2.70 -all"),
        ],
    )
    r = await check(dns_zone, "192.0.2.70", "jürgen@Bücher.spf.test", helo="München.spf.test")
    assert r.result == "pass"
    assert r.data["domain"] == "xn--bcher-kva.spf.test"
    assert r.data["smtp.mailfrom"] == "jürgen@Bücher.spf.test"
    assert r.data["helo_result"] == "pass"
    assert ("xn--bcher-kva.spf.test", "TXT", "udp") in dns_zone.query_log()
    # A domain IDNA refuses is malformed: RFC 7208 4.3 says none, and nothing is asked.
    dns_zone.reset_counters()
    r = await check(dns_zone, "192.0.2.70", "u@☃.spf.test", helo=None)
    assert (r.result, r.data["domain"]) == ("none", "")
    assert dns_zone.count() == 0


# -- RFC 7208 Appendix A ------------------------------------------------------------------


def appendix_a_zone(server: ZoneDNSServer, example_com_spf: str) -> None:
    """The DNS data of RFC 7208 Appendix A, with example.com's SPF record set as given."""
    for zone in ("example.com", "example.net", "0.0.10.in-addr.arpa", "2.0.192.in-addr.arpa"):
        server.set_records(zone, "SOA", [soa(zone)[2]])
    publish(
        server,
        [
            ("example.com", "MX", "10 mail-a.example.com"),
            ("example.com", "MX", "20 mail-b.example.com"),
            ("example.com", "A", "192.0.2.10"),
            ("example.com", "A", "192.0.2.11"),
            ("amy.example.com", "A", "192.0.2.65"),
            ("bob.example.com", "A", "192.0.2.66"),
            ("mail-a.example.com", "A", "192.0.2.129"),
            ("mail-b.example.com", "A", "192.0.2.130"),
            ("www.example.com", "CNAME", "example.com"),
            ("example.org", "MX", "10 mail-c.example.org"),
            ("mail-c.example.org", "A", "192.0.2.140"),
            ("65.2.0.192.in-addr.arpa", "PTR", "amy.example.com"),
            ("4.0.0.10.in-addr.arpa", "PTR", "bob.example.com"),
            # A.1's "reverse DNS is valid, but not in example.com" for 192.0.2.140:
            ("140.2.0.192.in-addr.arpa", "PTR", "mail-c.example.org"),
            ("example.com", "TXT", example_com_spf),
        ],
    )


# (record, client ip, RFC result) from A.1: "which values of <ip> would cause
# check_host() to return pass"; everything else gets the record's -all.
APPENDIX_A1 = [
    ("v=spf1 +all", "198.51.100.1", "pass"),
    ("v=spf1 a -all", "192.0.2.10", "pass"),
    ("v=spf1 a -all", "192.0.2.11", "pass"),
    ("v=spf1 a -all", "192.0.2.129", "fail"),
    ("v=spf1 a:example.org -all", "192.0.2.10", "fail"),
    ("v=spf1 a:example.org -all", "192.0.2.140", "fail"),
    ("v=spf1 mx -all", "192.0.2.129", "pass"),
    ("v=spf1 mx -all", "192.0.2.130", "pass"),
    ("v=spf1 mx -all", "192.0.2.10", "fail"),
    ("v=spf1 mx:example.org -all", "192.0.2.140", "pass"),
    ("v=spf1 mx:example.org -all", "192.0.2.129", "fail"),
    ("v=spf1 mx mx:example.org -all", "192.0.2.129", "pass"),
    ("v=spf1 mx mx:example.org -all", "192.0.2.130", "pass"),
    ("v=spf1 mx mx:example.org -all", "192.0.2.140", "pass"),
    ("v=spf1 mx mx:example.org -all", "192.0.2.10", "fail"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.131", "pass"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.143", "pass"),
    ("v=spf1 mx/30 mx:example.org/30 -all", "192.0.2.132", "fail"),
    ("v=spf1 ptr -all", "192.0.2.65", "pass"),
    ("v=spf1 ptr -all", "192.0.2.140", "fail"),
    ("v=spf1 ptr -all", "10.0.0.4", "fail"),
    ("v=spf1 ip4:192.0.2.128/28 -all", "192.0.2.65", "fail"),
    ("v=spf1 ip4:192.0.2.128/28 -all", "192.0.2.129", "pass"),
    # Not in A.1, but its zone: www is a CNAME to example.com.
    ("v=spf1 a:www.example.com -all", "192.0.2.11", "pass"),
]


@pytest.mark.parametrize(("record", "ip", "expected"), APPENDIX_A1)
async def test_rfc7208_appendix_a1(
    dns_zone: ZoneDNSServer, record: str, ip: str, expected: str
) -> None:
    appendix_a_zone(dns_zone, record)
    assert (await check(dns_zone, ip, "joe@example.com")).result == expected


async def test_rfc7208_appendix_a2_multiple_domains(dns_zone: ZoneDNSServer) -> None:
    """example.org includes example.com and example.net; la/ny/sf redirect to it."""
    appendix_a_zone(dns_zone, "v=spf1 mx -all")
    publish(
        dns_zone,
        [
            ("example.org", "TXT", "v=spf1 include:example.com include:example.net -all"),
            ("example.net", "TXT", "v=spf1 ip4:198.51.100.0/28 -all"),
            *[
                (f"{c}.example.org", "TXT", "v=spf1 redirect=example.org")
                for c in ("la", "ny", "sf")
            ],
        ],
    )
    for city in ("la", "ny", "sf"):
        assert (await check(dns_zone, "192.0.2.129", f"u@{city}.example.org")).result == "pass"
        assert (await check(dns_zone, "198.51.100.3", f"u@{city}.example.org")).result == "pass"
        assert (await check(dns_zone, "192.0.2.65", f"u@{city}.example.org")).result == "fail"


async def test_rfc7208_appendix_a3_dnsbl_style(dns_zone: ZoneDNSServer) -> None:
    appendix_a_zone(
        dns_zone,
        "v=spf1 mx include:mobile-users._spf.%{d} include:remote-users._spf.%{d} -all",
    )
    publish(
        dns_zone,
        [
            ("mobile-users._spf.example.com", "TXT", "v=spf1 exists:%{l1r+}.%{d}"),
            ("remote-users._spf.example.com", "TXT", "v=spf1 exists:%{ir}.%{l1r+}.%{d}"),
            ("mary.mobile-users._spf.example.com", "A", "127.0.0.2"),
            ("fred.mobile-users._spf.example.com", "A", "127.0.0.2"),
            ("15.15.168.192.joel.remote-users._spf.example.com", "A", "127.0.0.2"),
            ("16.15.168.192.joel.remote-users._spf.example.com", "A", "127.0.0.2"),
        ],
    )
    expected = [
        ("198.51.100.9", "mary", "pass"),  # mobile users pass from anywhere
        ("198.51.100.9", "fred", "pass"),
        ("198.51.100.9", "fred+wildcard", "pass"),  # l1r+: "fred"
        ("198.51.100.9", "joel", "fail"),
        ("192.168.15.15", "joel", "pass"),  # remote users from their own servers
        ("192.168.15.16", "joel", "pass"),
        ("192.168.15.17", "joel", "fail"),
        ("198.51.100.9", "other", "fail"),
        ("192.0.2.129", "other", "pass"),  # the mx still counts
    ]
    for ip, local, word in expected:
        assert (await check(dns_zone, ip, f"{local}@example.com")).result == word, (ip, local)


async def test_rfc7208_appendix_a4_multiple_requirements(dns_zone: ZoneDNSServer) -> None:
    """Pass only if the IP is in 192.0.2.0/24 AND its validated PTR is in example.com.

    As printed, ptr._spf's bare ``ptr`` targets <domain> = ptr._spf.example.com, which
    no host name ends in, so every client fails. With the target the example means
    (``ptr:example.com``) the De Morgan construction works as the text describes.
    """
    appendix_a_zone(dns_zone, "v=spf1 -include:ip4._spf.%{d} -include:ptr._spf.%{d} +all")
    publish(dns_zone, [("ip4._spf.example.com", "TXT", "v=spf1 -ip4:192.0.2.0/24 +all")])
    dns_zone.set_records("ptr._spf.example.com", "TXT", ["v=spf1 -ptr +all"])
    for ip in ("192.0.2.65", "192.0.2.66", "10.0.0.4"):
        assert (await check(dns_zone, ip, "joe@example.com")).result == "fail", ip
    dns_zone.set_records("ptr._spf.example.com", "TXT", ["v=spf1 -ptr:example.com +all"])
    expected = {
        "192.0.2.65": "pass",  # in range, PTR amy.example.com validates
        "192.0.2.66": "fail",  # in range, no PTR
        "10.0.0.4": "fail",  # out of range, PTR bob.example.com does not validate
        "192.0.2.140": "fail",  # in range, PTR valid but in example.org
    }
    for ip, word in expected.items():
        assert (await check(dns_zone, ip, "joe@example.com")).result == word, ip


# -- concurrency --------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_twenty_concurrent_checks_do_not_mix_up(dns_zone: ZoneDNSServer) -> None:
    """20 evaluations in worker threads at once, one Resolver: each gets its own answer."""
    words = ["pass", "fail", "softfail", "neutral", "permerror"]
    records = {
        "pass": "v=spf1 include:inc{n}.conc.spf.test -all",
        "fail": "v=spf1 a:host{n}.conc.spf.test -all",
        "softfail": "v=spf1 mx ~all",
        "neutral": "v=spf1 ip4:198.51.100.{n} ?all",
        "permerror": "v=spf1 a:n1{n}.conc.spf.test a:n2{n}.conc.spf.test a:n3{n}.conc.spf.test",
    }
    cases = []
    for n in range(20):
        word = words[n % len(words)]
        domain = f"d{n}.conc.spf.test"
        publish(
            dns_zone,
            [
                (domain, "TXT", records[word].format(n=n)),
                (f"inc{n}.conc.spf.test", "TXT", f"v=spf1 ip4:192.0.2.{n} -all"),
                (f"host{n}.conc.spf.test", "A", f"198.51.100.{n}"),
                (domain, "MX", f"10 host{n}.conc.spf.test"),
            ],
        )
        cases.append((f"192.0.2.{n}", f"u{n}@{domain}", word, domain))
    dns_zone.set_delay(0.02)  # keep the threads overlapping
    resolver = resolver_for(dns_zone)
    results = await asyncio.gather(
        *(check(dns_zone, ip, sender, resolver=resolver) for ip, sender, _, _ in cases)
    )
    for (_ip, sender, word, domain), r in zip(cases, results, strict=True):
        assert (r.result, r.data["domain"], r.data["smtp.mailfrom"]) == (word, domain, sender)


async def test_query_subclass_keeps_per_query_state(dns_zone: ZoneDNSServer) -> None:
    """Two query objects never share answers or void counts (no module state)."""
    publish(dns_zone, [("iso.spf.test", "TXT", "v=spf1 -all")])
    lookup = resolver_for(dns_zone).blocking(asyncio.get_running_loop())
    deadline = time.monotonic() + 5
    q1 = _ResolverQuery(lookup, deadline, i="192.0.2.1", s="a@iso.spf.test", h=HELO)
    q2 = _ResolverQuery(lookup, deadline, i="192.0.2.1", s="a@iso.spf.test", h=HELO)
    answers = await asyncio.to_thread(q1.dns, "iso.spf.test", "TXT")
    assert answers == [[b"v=spf1 -all"]]
    await asyncio.to_thread(q1.dns, "void.iso.spf.test", "A")
    assert (q1.void_lookups, q2.void_lookups) == (1, 0)
    assert q2._answers == {}


# -- RFC 7208 audit edges -----------------------------------------------------------------


@pytest.mark.parametrize("mail_from", ['"x@y"@victim.example', '"a@b.spf.test"@Victim.Example'])
async def test_quoted_local_part_with_at_checks_the_domain_after_the_last_at(
    dns_zone: ZoneDNSServer, mail_from: str
) -> None:
    """RFC 5321 Mailbox: the domain follows the last "@". pyspf split at the first one,
    so a quoted local part holding "@" had another name checked (none, not -all's fail)."""
    dns_zone.set_records("victim.example", "SOA", [soa("victim.example")[2]])
    publish(dns_zone, [("victim.example", "TXT", "v=spf1 -all")])
    r = await check(dns_zone, "192.0.2.7", mail_from, helo=None)
    assert (r.result, r.data["domain"]) == ("fail", "victim.example")
    assert r.data["smtp.mailfrom"] == mail_from
    assert [n for n, _, _ in dns_zone.query_log()] == ["victim.example"]


async def test_quoted_local_part_keeps_the_sender_macros(dns_zone: ZoneDNSServer) -> None:
    """RFC 7208 7.3 macros of such a sender: %{l} is the whole local part (quotes and "@"
    included), %{s} the whole sender, %{o} and %{d} the domain after the last "@"."""
    publish(
        dns_zone,
        [
            ("mac.spf.test", "TXT", "v=spf1 exists:%{o}.ok.spf.test -all exp=why.mac.spf.test"),
            ("mac2.spf.test", "TXT", "v=spf1 ip4:192.0.2.8 -all exp=why.mac.spf.test"),
            ("mac.spf.test.ok.spf.test", "A", "127.0.0.2"),
            ("why.mac.spf.test", "TXT", "l=%{l} s=%{s} o=%{o} d=%{d}"),
        ],
    )
    r = await check(dns_zone, "192.0.2.7", '"x@y"@mac.spf.test', helo=None)
    assert r.result == "pass", r.data["reason"]
    r = await check(dns_zone, "192.0.2.7", '"x@y"@mac2.spf.test', helo=None)
    assert r.result == "fail"
    assert r.data["reason"] == 'l="x@y" s="x@y"@mac2.spf.test o=mac2.spf.test d=mac2.spf.test'


async def test_void_lookups_count_terms_not_mx_host_address_lookups(
    dns_zone: ZoneDNSServer,
) -> None:
    """RFC 7208 4.6.4 counts terms whose lookup is void. An IPv6 client's AAAA lookups
    of A-only MX hosts belong to one mx term whose MX lookup answered: no void at all
    (pyspf counted each empty AAAA answer and gave permerror)."""
    publish(
        dns_zone,
        [
            ("v6mx.spf.test", "TXT", "v=spf1 mx ip6:2001:db8:5::/48 -all"),
            ("v6mx2.spf.test", "TXT", "v=spf1 a:nx1.spf.test a:nx2.spf.test mx:v6mx.spf.test -all"),
            *[("v6mx.spf.test", "MX", f"{10 * n} h{n}.v6mx.spf.test") for n in (1, 2, 3)],
            *[(f"h{n}.v6mx.spf.test", "A", f"192.0.2.{n}") for n in (1, 2, 3)],
            ("mxvoid.spf.test", "TXT", "v=spf1 mx:nx1.spf.test mx:nx2.spf.test mx:nx3.spf.test"),
        ],
    )
    assert (await check(dns_zone, "2001:db8:5::1", "u@v6mx.spf.test")).result == "pass"
    assert (await check(dns_zone, "2001:db8:6::1", "u@v6mx.spf.test")).result == "fail"
    # Two void a: terms plus the mx term: still exactly at the limit.
    assert (await check(dns_zone, "2001:db8:6::1", "u@v6mx2.spf.test")).result == "fail"
    assert (await check(dns_zone, "192.0.2.2", "u@v6mx2.spf.test")).result == "pass"
    # Three mx terms whose MX lookups are void are three void lookups.
    r = await check(dns_zone, "192.0.2.7", "u@mxvoid.spf.test")
    assert r.result == "permerror"
    assert "Void lookup limit of 2 exceeded" in r.symbols[0].detail


async def test_void_lookups_do_not_count_ptr_name_address_lookups(
    dns_zone: ZoneDNSServer,
) -> None:
    """The ptr term's own PTR lookup answered; its names' empty AAAA answers are no voids."""
    client = "2001:db8:7::1"
    reverse = reverse_name(client)
    publish(
        dns_zone,
        [
            ("v6ptr.spf.test", "TXT", "v=spf1 ptr ip6:2001:db8:7::/48 -all"),
            *[(reverse, "PTR", f"n{n}.v6ptr.spf.test") for n in (1, 2, 3)],
            *[(f"n{n}.v6ptr.spf.test", "A", f"192.0.2.{n}") for n in (1, 2, 3)],
        ],
    )
    assert (await check(dns_zone, client, "u@v6ptr.spf.test")).result == "pass"


async def test_p_macro_lookups_are_not_void_lookups(dns_zone: ZoneDNSServer) -> None:
    """%{p}'s PTR and address lookups serve a macro inside a term; only the term's own
    lookup can be void (pyspf counted both unvalidated names here: three voids)."""
    publish(
        dns_zone,
        [
            ("pmac.spf.test", "TXT", "v=spf1 a:nx1.spf.test exists:%{p}.pmac.spf.test -all"),
            ("21.113.0.203.in-addr.arpa", "PTR", "gone1.pmac.spf.test"),
            ("21.113.0.203.in-addr.arpa", "PTR", "gone2.pmac.spf.test"),
            ("unknown.pmac.spf.test", "A", "127.0.0.2"),
        ],
    )
    r = await check(dns_zone, "203.0.113.21", "u@pmac.spf.test")
    assert r.result == "pass", r.data["reason"]


async def test_modifier_names_are_case_insensitive(dns_zone: ZoneDNSServer) -> None:
    """RFC 7208 4.6.1/12: "REDIRECT=" and "Exp=" are redirect= and exp= (pyspf ignored
    them as unknown modifiers, so the record fell through to neutral)."""
    publish(
        dns_zone,
        [
            ("target.mod.spf.test", "TXT", "v=spf1 ip4:203.0.113.0/25 -all"),
            ("up.mod.spf.test", "TXT", "v=spf1 REDIRECT=target.mod.spf.test"),
            ("mixed.mod.spf.test", "TXT", "V=SPF1 Redirect=target.mod.spf.test"),
            ("inc.mod.spf.test", "TXT", "v=spf1 include:up.mod.spf.test -all"),
            ("twice.mod.spf.test", "TXT", "v=spf1 Redirect=a.spf.test redirect=b.spf.test"),
            ("exp.mod.spf.test", "TXT", "v=spf1 -all Exp=why.mod.spf.test"),
            ("why.mod.spf.test", "TXT", "%{d} never sends from %{i}"),
        ],
    )
    for domain in ("up", "mixed", "inc"):
        sender = f"u@{domain}.mod.spf.test"
        assert (await check(dns_zone, "203.0.113.5", sender)).result == "pass", domain
        assert (await check(dns_zone, "192.0.2.7", sender)).result == "fail", domain
    r = await check(dns_zone, "192.0.2.7", "u@twice.mod.spf.test")
    assert r.result == "permerror"
    assert "redirect= MUST appear at most once" in r.symbols[0].detail
    r = await check(dns_zone, "192.0.2.7", "u@exp.mod.spf.test")
    assert (r.result, r.data["reason"]) == ("fail", "exp.mod.spf.test never sends from 192.0.2.7")


async def test_exp_explains_only_a_fail(dns_zone: ZoneDNSServer) -> None:
    """RFC 7208 6.2: exp= is the explanation of a fail; pyspf also used it for softfail."""
    publish(
        dns_zone,
        [
            ("soft.exp.spf.test", "TXT", "v=spf1 ip4:198.51.100.1 ~all exp=why.exp.spf.test"),
            ("neut.exp.spf.test", "TXT", "v=spf1 ip4:198.51.100.1 ?all exp=why.exp.spf.test"),
            ("hard.exp.spf.test", "TXT", "v=spf1 ip4:198.51.100.1 -all exp=why.exp.spf.test"),
            ("why.exp.spf.test", "TXT", "go away %{i}"),
        ],
    )
    r = await check(dns_zone, "192.0.2.7", "u@soft.exp.spf.test")
    assert r.result == "softfail"
    assert r.data["reason"] == r.symbols[0].detail == "domain owner discourages use of this host"
    r = await check(dns_zone, "192.0.2.7", "u@neut.exp.spf.test")
    assert (r.result, r.data["reason"]) == ("neutral", "access neither permitted nor denied")
    r = await check(dns_zone, "192.0.2.7", "u@hard.exp.spf.test")
    assert (r.result, r.data["reason"]) == ("fail", "go away 192.0.2.7")
