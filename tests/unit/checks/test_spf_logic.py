"""The pure parts of the SPF check: words, symbols, identities, decisions, budget.

No DNS here: the check's wiring is exercised with an injected evaluator, the DNS
seam against the real server in tests/integration/test_check_spf.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest

from filter import replies
from filter.checks import Context
from filter.checks.spf import (
    SPF_WORDS,
    Identity,
    SPFCheck,
    Verdict,
    _pyspf_value,
    _ResolverQuery,
    a_label_domain,
    build_result,
    decision_for,
    helo_domain,
    helo_identity,
    helo_symbol,
    normalise_modifier_names,
    result_word,
    select_identity,
    split_sender,
    symbol_name,
    time_budget,
    truncate_name,
)
from filter.model import ClientInfo, Envelope, Stage
from filter.policy.schema import DEFAULT_POLICY, DEFAULT_SCORES, Policy, SPFPolicy
from filter.results import RESULT_WORDS, Action


def policy(**spf: Any) -> Policy:
    return dataclasses.replace(DEFAULT_POLICY, spf=SPFPolicy(**spf))


# -- words and symbols --------------------------------------------------------------------


@pytest.mark.parametrize("word", SPF_WORDS)
def test_every_pyspf_result_maps_to_an_rfc8601_word_with_a_scored_symbol(word: str) -> None:
    assert result_word(word) == word
    assert result_word(word.upper()) == word
    assert word in RESULT_WORDS
    assert symbol_name(word) in DEFAULT_SCORES


def test_unexpected_pyspf_result_is_temperror_never_pass() -> None:
    assert result_word("ambiguous") == "temperror"
    assert result_word("") == "temperror"


def test_symbol_names() -> None:
    assert symbol_name("softfail") == "SPF_SOFTFAIL"
    assert symbol_name("permerror") == "SPF_PERMERROR"
    assert helo_symbol("pass") == "SPF_HELO_PASS"
    assert helo_symbol("fail") == "SPF_HELO_FAIL"
    for word in ("softfail", "neutral", "none", "temperror", "permerror"):
        assert helo_symbol(word) is None


# -- domains and identities -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("ａｂｃ.example", "abc.example"),  # UTS 46 maps full-width letters
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_spf.example.com", "_spf.example.com"),  # ASCII is left to DNS
        ("localhost", None),  # RFC 7208 4.3: not multi-label
        ("a..example", None),
        ("a" * 64 + ".example", None),
        (("a" * 60 + ".") * 5 + "com", None),  # over 253 octets
        ("192.0.2.1", None),  # an IP address, not a domain
        ("[192.0.2.1]", None),
        ("☃.example", None),  # IDNA 2008 refuses symbols
        ("", None),
    ],
)
def test_a_label_domain(domain: str, expected: str | None) -> None:
    assert a_label_domain(domain) == expected


@pytest.mark.parametrize(
    ("helo", "expected"),
    [
        ("mail.example.com", "mail.example.com"),
        ("[192.0.2.1]", None),
        ("[IPv6:2001:db8::1]", None),
        ("OEMCOMPUTER", None),
        ("192.0.2.1", None),
        ("", None),
        (None, None),
    ],
)
def test_helo_domain_skips_literals_and_non_fqdns(helo: str | None, expected: str | None) -> None:
    assert helo_domain(helo) == expected


def test_identity_is_mail_from() -> None:
    ident = select_identity("Alice@Example.COM", "mx.example.net")
    assert ident == Identity("mailfrom", "Alice@Example.COM", "Alice@example.com", "example.com")


def test_null_sender_uses_postmaster_at_helo() -> None:
    ident = select_identity("", "MX.Example.NET")
    assert ident.kind == "helo"
    assert ident.address == "postmaster@MX.Example.NET"
    assert ident.sender == "postmaster@mx.example.net"
    assert ident.domain == "mx.example.net"


@pytest.mark.parametrize("helo", ["[192.0.2.1]", "oemcomputer", "", None])
def test_null_sender_without_usable_helo_has_no_domain(helo: str | None) -> None:
    ident = select_identity("", helo)
    assert (ident.kind, ident.domain) == ("helo", None)
    assert ident.why_none


def test_sender_edge_cases() -> None:
    # RFC 7208 4.3: an empty local-part is "postmaster".
    assert select_identity("@example.net", None).sender == "postmaster@example.net"
    assert select_identity("nodomain", None).domain is None
    assert select_identity("u@[192.0.2.1]", None).domain is None
    idn = select_identity("jürgen@München.example", None)
    assert (idn.sender, idn.domain) == ("jürgen@xn--mnchen-3ya.example", "xn--mnchen-3ya.example")
    assert idn.address == "jürgen@München.example"  # reported as sent


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("u@example.com", ("u", "example.com")),
        ('"x@y"@victim.example', ('"x@y"', "victim.example")),
        ('"a@b@c"@victim.example', ('"a@b@c"', "victim.example")),
        ("@example.net", ("postmaster", "example.net")),
        ("example.net", ("postmaster", "example.net")),
    ],
)
def test_split_sender_takes_the_domain_after_the_last_at(
    sender: str, expected: tuple[str, str]
) -> None:
    assert split_sender(sender) == expected


def test_quoted_local_part_with_at_keeps_the_domain() -> None:
    ident = select_identity('"x@y"@Victim.Example', None)
    assert (ident.sender, ident.domain) == ('"x@y"@victim.example', "victim.example")


def test_pyspf_query_gets_the_domain_after_the_last_at() -> None:
    """pyspf split at the first "@": <domain> was 'y"@victim.example'. No DNS is asked
    while a query is built, so this needs no server."""
    q = _ResolverQuery(None, 0.0, i="192.0.2.1", s='"x@y"@victim.example', h="mx.example")
    assert (q.l, q.o, q.d, q.s) == ('"x@y"', "victim.example", "victim.example", q.s)
    assert q.s == '"x@y"@victim.example'
    assert q.expand("%{l}.%{o}", stripdot=False) == '"x@y".victim.example'
    plain = _ResolverQuery(None, 0.0, i="192.0.2.1", s="@example.net", h="mx.example")
    assert (plain.l, plain.d) == ("postmaster", "example.net")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("v=spf1 REDIRECT=_spf.example", "v=spf1 redirect=_spf.example"),
        ("V=SPF1 -all Exp=Why.%{D}.Example", "v=SPF1 -all exp=Why.%{D}.Example"),
        ("v=spf1  Foo.Bar_9-x=Baz  -ALL", "v=spf1  foo.bar_9-x=Baz  -ALL"),
        # Mechanisms are no modifiers, even with "=" in their argument.
        ("v=spf1 exists:%{L}.Foo=1.example include:A=B.example", None),
        ("v=spf1 +Redirect=x.example -9x=y", None),
    ],
)
def test_normalise_modifier_names_lowercases_names_only(record: str, expected: str | None) -> None:
    assert normalise_modifier_names(record) == (record if expected is None else expected)


def test_helo_identity() -> None:
    ident = helo_identity("mx.example.net")
    assert ident == Identity(
        "helo", "postmaster@mx.example.net", "postmaster@mx.example.net", "mx.example.net"
    )
    assert helo_identity("[192.0.2.1]") is None
    assert helo_identity(None) is None


# -- decisions, budget, report --------------------------------------------------------------


def test_decision_only_for_fail_and_only_when_enabled() -> None:
    on = policy(reject_on_fail=True)
    d = decision_for("fail", on, "why")
    assert d is not None
    assert (d.action, d.reply, d.reason) == (Action.REJECT, replies.REJECT_SPF, "why")
    assert (d.reply.code, d.reply.enhanced) == (550, "5.7.23")
    assert decision_for("fail", DEFAULT_POLICY, "why") is None  # off by default
    for word in SPF_WORDS:
        if word != "fail":
            assert decision_for(word, on, "why") is None, word


@pytest.mark.parametrize(
    ("dns_timeout", "check_timeout"),
    [(3.0, 20.0), (1.0, 20.0), (3.0, 5.0), (60.0, 20.0), (0.1, 0.1), (3.0, 0.1)],
)
def test_time_budget_stays_inside_the_check_timeout(
    dns_timeout: float, check_timeout: float
) -> None:
    budget = time_budget(dns_timeout, check_timeout)
    assert 0 < budget <= 4 * dns_timeout
    assert budget < check_timeout


def test_time_budget_defaults() -> None:
    assert time_budget(3.0, 20.0) == 12.0  # four lookup lifetimes
    assert time_budget(3.0, 5.0) == 2.5  # half the check timeout when that is tighter


def test_build_result_for_mail_from_with_helo_information() -> None:
    ident = select_identity("u@example.com", "mx.example.net")
    r = build_result(
        ident,
        Verdict("fail", "not authorised"),
        "mx.example.net",
        Verdict("pass", "ok"),
        DEFAULT_POLICY,
    )
    assert r.check == "spf"
    assert r.result == "fail"
    assert [(s.name, s.score, s.detail) for s in r.symbols] == [
        ("SPF_FAIL", 2.0, "not authorised"),
        ("SPF_HELO_PASS", 0.0, "ok"),
    ]
    assert r.decision is None
    assert r.data == {
        "identity": "mailfrom",
        "smtp.mailfrom": "u@example.com",
        "smtp.helo": "mx.example.net",
        "domain": "example.com",
        "reason": "not authorised",
        "helo_result": "pass",
        "helo_reason": "ok",
    }


def test_build_result_uses_policy_scores_and_helo_result_of_null_sender() -> None:
    pol = dataclasses.replace(
        policy(reject_on_fail=True), scores={**DEFAULT_SCORES, "SPF_FAIL": 7.5}
    )
    ident = select_identity("", "mx.example.net")
    r = build_result(ident, Verdict("fail", "no"), "mx.example.net", None, pol)
    assert [(s.name, s.score) for s in r.symbols] == [("SPF_FAIL", 7.5)]
    assert (r.data["identity"], r.data["helo_result"]) == ("helo", "fail")
    assert r.data["smtp.mailfrom"] == "postmaster@mx.example.net"
    assert r.decision is not None and r.decision.action is Action.REJECT


def test_pyspf_value_shapes() -> None:
    assert _pyspf_value("TXT", (b"v=spf1 ", b"-all")) == [b"v=spf1 ", b"-all"]
    assert _pyspf_value("A", "192.0.2.1") == "192.0.2.1"
    assert _pyspf_value("MX", (10, "mx.example.com")) == (10, "mx.example.com")
    assert _pyspf_value("PTR", "host.example.com") == "host.example.com"


# -- the check's wiring, with a fake evaluator ------------------------------------------------


class FakeResolver:
    def __init__(self) -> None:
        self.loops: list[asyncio.AbstractEventLoop] = []

    def blocking(self, loop: asyncio.AbstractEventLoop) -> str:
        self.loops.append(loop)
        return "LOOKUP"


class Recorder:
    """An evaluator that answers from a table and records what it was asked."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[int] = set()

    def __call__(
        self, lookup: Any, ip: str, ident: Identity, helo: str, receiver: str, budget: float
    ) -> Verdict:
        self.calls.append((lookup, ip, ident, helo, receiver, budget))
        self.threads.add(threading.get_ident())
        if ident.domain is None:
            return Verdict("none", ident.why_none)
        return Verdict(self.answers[ident.domain], f"answer for {ident.domain}")


async def run_check(
    evaluator: Recorder,
    mail_from: str,
    helo: str | None,
    pol: Policy = DEFAULT_POLICY,
    ip: str = "192.0.2.1",
) -> Any:
    ctx = Context(
        client=ClientInfo(ip=ip, port=1, session_id="S", helo=helo),
        policy=pol,
        envelope=Envelope(mail_from=mail_from),
        resolver=FakeResolver(),  # type: ignore[arg-type]
    )
    return await SPFCheck(evaluator).run(ctx)


def test_check_declares_its_stage() -> None:
    c = SPFCheck()
    assert (c.name, c.stage, c.needs) == ("spf", Stage.MAIL, ())


async def test_run_checks_mail_from_and_helo_in_worker_threads() -> None:
    rec = Recorder({"example.com": "pass", "mx.example.net": "fail"})
    r = await run_check(rec, "u@example.com", "mx.example.net", ip="::ffff:192.0.2.9")
    assert r.result == "pass"
    assert [s.name for s in r.symbols] == ["SPF_PASS", "SPF_HELO_FAIL"]
    assert threading.get_ident() not in rec.threads
    kinds = sorted(call[2].kind for call in rec.calls)
    assert kinds == ["helo", "mailfrom"]
    lookup, ip, _ident, helo, receiver, budget = rec.calls[0]
    assert (lookup, ip, helo) == ("LOOKUP", "192.0.2.9", "mx.example.net")
    assert receiver == DEFAULT_POLICY.authserv_id
    assert budget == time_budget(DEFAULT_POLICY.dns.timeout, DEFAULT_POLICY.server.check_timeout)


async def test_run_skips_helo_when_off_literal_or_null_sender() -> None:
    rec = Recorder({"example.com": "softfail", "mx.example.net": "pass"})
    r = await run_check(rec, "u@example.com", "mx.example.net", policy(helo=False))
    assert (r.result, r.data["helo_result"], len(rec.calls)) == ("softfail", "", 1)
    rec.calls.clear()
    r = await run_check(rec, "u@example.com", "[192.0.2.1]")
    assert (r.result, r.data["helo_result"], len(rec.calls)) == ("softfail", "", 1)
    assert r.data["smtp.helo"] == "[192.0.2.1]"
    rec.calls.clear()
    r = await run_check(rec, "", "mx.example.net")
    assert (r.result, r.data["identity"], len(rec.calls)) == ("pass", "helo", 1)


async def test_run_without_resolver_is_temperror() -> None:
    ctx = Context(
        client=ClientInfo(ip="192.0.2.1", port=1, session_id="S", helo="mx.example.net"),
        policy=DEFAULT_POLICY,
        envelope=Envelope(mail_from="u@example.com"),
    )
    r = await SPFCheck(Recorder({})).run(ctx)
    assert (r.result, r.decision) == ("temperror", None)
    assert [s.name for s in r.symbols] == ["SPF_TEMPERROR"]


async def test_run_disabled_by_policy_asks_nothing() -> None:
    rec = Recorder({})
    r = await run_check(rec, "u@example.com", "mx.example.net", policy(enabled=False))
    assert (r.result, r.symbols, rec.calls) == ("none", (), [])


def test_truncate_name_removes_whole_labels_from_the_left_until_253_fit() -> None:
    """RFC 7208 7.3, with the boundary: 253 characters stay, 254 lose a label."""
    label = "b" * 63
    fits = ".".join([label] * 3 + ["c" * 61])
    assert len(fits) == 253 and truncate_name(fits) == fits
    assert truncate_name("x." + fits) == fits
    assert truncate_name(".".join([label] * 5 + ["test"])) == ".".join([label] * 3 + ["test"])
    assert truncate_name("z" * 300) == "z" * 300  # one label: nothing to remove
