"""The pure HELO rules: one table of HELO names and the symbols they raise.

No DNS here: ``assess`` only says which name to look up; the lookup itself and
HELO_NXDOMAIN run against the real server in tests/integration/test_check_rdns.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from filter.checks import Context
from filter.checks.helo import HeloCheck, Own, assess, build_result, own_identity
from filter.model import ClientInfo, Stage
from filter.policy.schema import DEFAULT_POLICY, DEFAULT_SCORES, HeloPolicy, ServerPolicy
from filter.results import RESULT_WORDS
from filter.units import parse_address

CLIENT = "192.0.2.10"
CLIENT6 = "2001:db8::25"
OWN = Own(
    frozenset({"mx.example.org"}),
    frozenset({ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("2001:db8:1::1")}),
)


# (HELO, client IP, symbols raised, name looked up in DNS)
RULES: list[tuple[str, str, list[str], str | None]] = [
    # well-formed names: no symbol, one lookup of the lower-case name
    ("mail.example.test", CLIENT, [], "mail.example.test"),
    ("Mail.Example.TEST.", CLIENT, [], "mail.example.test"),
    ("  mail.example.test ", CLIENT, [], "mail.example.test"),
    ("xn--bcher-kva.example", CLIENT, [], "xn--bcher-kva.example"),
    ("bücher.example", CLIENT, [], "bücher.example"),
    # address literals
    ("[192.0.2.10]", CLIENT, [], None),
    ("[IPv6:2001:db8::25]", CLIENT6, [], None),
    ("[ipv6:2001:DB8:0::25]", CLIENT6, [], None),
    ("[2001:db8::25]", CLIENT6, [], None),  # tag missing: sloppy, read as meant
    ("[IPv6:::ffff:192.0.2.10]", CLIENT, [], None),  # mapped form of the client
    ("[192.0.2.10]", "::ffff:192.0.2.10", [], None),  # client seen through a v6 socket
    ("[192.0.2.99]", CLIENT, ["HELO_LITERAL_MISMATCH"], None),
    ("[IPv6:2001:db8::99]", CLIENT6, ["HELO_LITERAL_MISMATCH"], None),
    ("[IPv6:2001:db8::25]", CLIENT, ["HELO_LITERAL_MISMATCH"], None),
    ("[198.51.100.1]", CLIENT, ["HELO_OURS"], None),
    ("[IPv6:2001:db8:1::1]", CLIENT6, ["HELO_OURS"], None),
    ("[IPv6:::ffff:198.51.100.1]", CLIENT, ["HELO_OURS"], None),  # our IPv4, mapped
    ("[::ffff:198.51.100.1]", CLIENT, ["HELO_OURS"], None),
    ("[IPv6:fe80::1%eth0]", CLIENT, ["HELO_INVALID"], None),  # no zone ids in literals
    ("[192.0.2.010]", CLIENT, ["HELO_INVALID"], None),  # leading zero: ambiguous, refused
    ("[IPv6:192.0.2.10]", CLIENT, ["HELO_INVALID"], None),
    ("[foo]", CLIENT, ["HELO_INVALID"], None),
    ("[]", CLIENT, ["HELO_INVALID"], None),
    # bare addresses
    ("192.0.2.10", CLIENT, ["HELO_BARE_IP"], None),
    ("192.0.2.10.", CLIENT, ["HELO_BARE_IP"], None),
    ("2001:db8::25", CLIENT6, ["HELO_BARE_IP"], None),
    ("203.0.113.5", CLIENT, ["HELO_BARE_IP"], None),
    ("198.51.100.1", CLIENT, ["HELO_BARE_IP", "HELO_OURS"], None),
    ("::ffff:198.51.100.1", CLIENT, ["HELO_BARE_IP", "HELO_OURS"], None),
    ("fe80::1%eth0", CLIENT, ["HELO_INVALID"], None),  # raised ValueError: a crash
    # our own name, in any spelling
    ("mx.example.org", CLIENT, ["HELO_OURS"], None),
    ("MX.EXAMPLE.ORG.", CLIENT, ["HELO_OURS"], None),
    # not fully qualified
    ("DESKTOP-4F2K", CLIENT, ["HELO_NOT_FQDN"], None),
    ("localhost", CLIENT, ["HELO_NOT_FQDN"], None),
    ("localhost.localdomain", CLIENT, ["HELO_NOT_FQDN"], None),
    ("printer.local", CLIENT, ["HELO_NOT_FQDN"], None),
    ("box.internal", CLIENT, ["HELO_NOT_FQDN"], None),
    ("host.invalid", CLIENT, ["HELO_NOT_FQDN"], None),
    ("192.0.2", CLIENT, ["HELO_NOT_FQDN"], None),  # numeric top label, not an address
    # bad syntax
    ("foo_bar.example.test", CLIENT, ["HELO_INVALID"], None),
    ("-mail.example.test", CLIENT, ["HELO_INVALID"], None),
    ("mail..example.test", CLIENT, ["HELO_INVALID"], None),
    ("mail.example.test/x", CLIENT, ["HELO_INVALID"], None),
    ("a" * 63 + ".example.test", CLIENT, [], "a" * 63 + ".example.test"),
    ("a" * 64 + ".example.test", CLIENT, ["HELO_INVALID"], None),  # label over 63 octets
    ("x." * 130 + "test", CLIENT, ["HELO_INVALID"], None),  # over 255 octets
    # nothing to judge
    ("", CLIENT, [], None),
    ("   ", CLIENT, [], None),
]


@pytest.mark.parametrize(("helo", "ip", "symbols", "lookup"), RULES)
def test_rules(helo: str, ip: str, symbols: list[str], lookup: str | None) -> None:
    found = assess(helo, ip, OWN)
    assert [name for name, _ in found.findings] == symbols
    assert found.lookup == lookup
    assert all(detail for _, detail in found.findings)


def test_every_symbol_has_a_default_score_and_ours_is_the_strongest() -> None:
    names = {s for _, _, syms, _ in RULES for s in syms} | {"HELO_NXDOMAIN", "HELO_TEMPERROR"}
    assert names <= set(DEFAULT_SCORES)
    assert max(names, key=lambda n: DEFAULT_SCORES[n]) == "HELO_OURS"
    assert DEFAULT_SCORES["HELO_TEMPERROR"] == 0.0


def test_a_bad_client_address_is_a_mismatch_not_a_crash() -> None:
    assert [n for n, _ in assess("[192.0.2.1]", "not-an-ip", OWN).findings] == [
        "HELO_LITERAL_MISMATCH"
    ]


# -- our own identity -----------------------------------------------------------------------


def test_own_identity_from_hostname_and_listeners() -> None:
    own = own_identity("MX.Example.ORG.", ["0.0.0.0", "::", "198.51.100.1", "2001:db8:1::1"])
    assert own.names == {"mx.example.org"}
    assert own.addresses == {
        ipaddress.ip_address("198.51.100.1"),
        ipaddress.ip_address("2001:db8:1::1"),
    }


def test_own_identity_ignores_single_label_names_and_host_names_in_listen() -> None:
    own = own_identity("buildbox", ["localhost", "::ffff:198.51.100.1"])
    assert own.names == frozenset()
    assert own.addresses == {ipaddress.ip_address("198.51.100.1")}


# -- the report -----------------------------------------------------------------------------


def test_build_result_words_and_scores() -> None:
    clean = build_result("mail.example.test", [], "ok", DEFAULT_POLICY)
    assert (clean.result, clean.symbols, clean.decision) == ("pass", (), None)
    assert clean.data["lookup"] == "ok"
    bad = build_result(
        "1.2.3.4", [("HELO_BARE_IP", "b"), ("HELO_OURS", "o")], "skipped", DEFAULT_POLICY
    )
    assert bad.result == "fail"
    assert [(s.name, s.score) for s in bad.symbols] == [("HELO_BARE_IP", 1.5), ("HELO_OURS", 4.0)]
    assert bad.data["reason"] == "b; o"
    assert bad.decision is None
    assert {clean.result, bad.result} <= set(RESULT_WORDS)


def _ctx(name: str | None, **policy_changes: object) -> Context:
    server = ServerPolicy(hostname="mx.example.org", listen=(parse_address("198.51.100.1:25"),))
    policy = dataclasses.replace(DEFAULT_POLICY, server=server, **policy_changes)  # type: ignore[arg-type]
    return Context(client=ClientInfo(CLIENT, 4000, "S1", helo=name), policy=policy)


async def test_check_without_resolver_applies_the_syntax_rules_only() -> None:
    check = HeloCheck()
    assert (check.name, check.stage, check.needs) == ("helo", Stage.HELO, ())
    r = await check.run(_ctx("mx.example.org"))
    assert (r.result, [s.name for s in r.symbols]) == ("fail", ["HELO_OURS"])
    r = await check.run(_ctx("[198.51.100.1]"))
    assert [s.name for s in r.symbols] == ["HELO_OURS"]
    r = await check.run(_ctx("mail.example.test"))
    assert (r.result, r.symbols, r.data["lookup"]) == ("pass", (), "skipped")


async def test_check_none_without_helo_or_when_disabled() -> None:
    assert (await HeloCheck().run(_ctx(None))).result == "none"
    off = await HeloCheck().run(_ctx("192.0.2.1", helo=HeloPolicy(enabled=False)))
    assert (off.result, off.symbols) == ("none", ())
