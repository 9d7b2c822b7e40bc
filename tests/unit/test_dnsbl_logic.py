"""DNSBL logic without DNS: RFC 5782 names, answer classes, codes, symbols, the sum, schema."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from filter.dnsbl import (
    BLOCKED,
    LISTED,
    Hit,
    a_label,
    classify,
    derived_tag,
    domain_query_name,
    interpret,
    ip_query_name,
    ipv6_probe_names,
    is_listing_code,
    mask_zone,
    probe_names,
    probe_verdict,
    reversed_ip,
    symbol_for,
    tally,
)
from filter.netaddr import normalize_ip
from filter.policy.render import render_toml
from filter.policy.schema import DNSBLCode, DNSBLZone, policy_from_dict

ZEN_CODES = (
    DNSBLCode("127.0.0.2", "SBL", 10.0),
    DNSBLCode("127.0.0.3", "CSS", 6.0),
    DNSBLCode("127.0.0.4", "XBL"),
    DNSBLCode("127.0.0.10", "PBL", 3.0),
    DNSBLCode("127.0.0.11", "PBL", 3.0),
)
ZEN = DNSBLZone("zen.spamhaus.org", 10.0, True, codes=ZEN_CODES)


# --- RFC 5782 query names -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "name"),
    [
        # RFC 5782 2.1: octets reversed
        ("192.0.2.99", "99.2.0.192.bl.example"),
        ("127.0.0.2", "2.0.0.127.bl.example"),
        # RFC 5782 2.4: the example address of the RFC, nibbles reversed, zeros kept
        (
            "2001:db8:1:2:3:4:567:89ab",
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example",
        ),
        (
            "::1",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.example",
        ),
        # a dual-stack socket's view of an IPv4 client is looked up as IPv4
        ("::ffff:192.0.2.99", "99.2.0.192.bl.example"),
    ],
)
def test_ip_query_names(ip: str, name: str) -> None:
    assert ip_query_name(ip, "bl.example") == name


def test_ip_query_name_normalises_zone_and_caller_normalised_address() -> None:
    assert ip_query_name(normalize_ip("::FFFF:10.1.2.3"), "BL.Example.") == "3.2.1.10.bl.example"
    assert len(reversed_ip("2001:db8::1").split(".")) == 32
    with pytest.raises(ValueError):
        reversed_ip("not-an-ip")


@pytest.mark.parametrize(
    ("domain", "name"),
    [
        ("Mail.Example.ORG", "mail.example.org.dbl.example"),
        ("example.org.", "example.org.dbl.example"),
        ("bücher.example", "xn--bcher-kva.example.dbl.example"),
        ("[192.0.2.1]", None),  # address literal
        ("192.0.2.1", None),  # bare IP as HELO: numeric top label
        ("localhost", None),  # single label
        ("", None),
        ("a..example", None),
        ("x" * 64 + ".example", None),
    ],
)
def test_domain_query_names(domain: str, name: str | None) -> None:
    assert domain_query_name(domain, "dbl.example") == name


def test_domain_query_name_too_long_is_none() -> None:
    long_domain = ".".join(["a" * 60] * 4)  # 243 octets
    assert a_label(long_domain) == long_domain
    assert domain_query_name(long_domain, "dbl.example") is None


def test_probe_names_are_rfc5782_test_points() -> None:
    assert probe_names("Zen.Spamhaus.org.", "ip") == (
        "2.0.0.127.zen.spamhaus.org",
        "1.0.0.127.zen.spamhaus.org",
    )
    assert probe_names("dbl.example", "domain") == ("test.dbl.example", "invalid.dbl.example")
    # IPv6 lists: ::FFFF:7F00:2 / ::FFFF:7F00:1 as nibbles, although a client with
    # such an IPv4-mapped address is looked up as IPv4
    nibbles = ".0" * 20 + ".bl.example"
    assert ipv6_probe_names("BL.Example.") == (
        "2.0.0.0.0.0.f.7.f.f.f.f" + nibbles,
        "1.0.0.0.0.0.f.7.f.f.f.f" + nibbles,
    )
    assert ip_query_name("::FFFF:7F00:2", "bl.example") == "2.0.0.127.bl.example"


# --- answer classification ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.2", LISTED),
        ("127.0.0.4", LISTED),
        ("127.0.1.2", LISTED),  # DBL-style codes
        ("127.1.2.3", LISTED),
        ("127.0.0.1", BLOCKED),  # RFC 5782: never listed; URIBL answers it when refusing
        ("127.255.255.252", BLOCKED),  # Spamhaus: bad DQS key
        ("127.255.255.254", BLOCKED),  # Spamhaus: public resolver
        ("127.255.255.255", BLOCKED),  # Spamhaus: too many queries
        ("10.0.0.1", BLOCKED),  # NXDOMAIN rewritten by the resolver
        ("192.0.2.1", BLOCKED),
        ("::1", BLOCKED),
        ("garbage", BLOCKED),
    ],
)
def test_classify(address: str, kind: str) -> None:
    assert classify(address) == kind


def test_blocked_codes_of_a_zone_are_not_listings() -> None:
    assert classify("127.0.0.255") == LISTED
    assert classify("127.0.0.255", ("127.0.0.255",)) == BLOCKED


def test_is_listing_code() -> None:
    assert is_listing_code("127.0.0.2")
    assert not is_listing_code("127.0.0.1")
    assert not is_listing_code("127.255.255.254")
    assert not is_listing_code("10.0.0.2")
    assert not is_listing_code("127.0.0.x")


def test_nxdomain_is_no_listing() -> None:
    assert interpret(ZEN, ()).hits == ()
    assert interpret(ZEN, ()).blocked == ()


# --- code maps ------------------------------------------------------------------------


def test_code_map_labels_and_scores() -> None:
    hits = interpret(ZEN, ["127.0.0.2"]).hits
    assert [(h.symbol, h.score, h.label, h.code) for h in hits] == [
        ("DNSBL_ZEN_SBL", 10.0, "SBL", "127.0.0.2")
    ]
    # a code without its own score takes the zone's
    assert interpret(ZEN, ["127.0.0.4"]).hits[0].score == 10.0
    # an unknown code is a plain listing at the zone's score
    (plain,) = interpret(ZEN, ["127.0.0.9"]).hits
    assert (plain.symbol, plain.score, plain.label) == ("DNSBL_ZEN", 10.0, "")


def test_several_codes_score_each_label_once() -> None:
    hits = interpret(ZEN, ["127.0.0.11", "127.0.0.2", "127.0.0.10"]).hits
    assert sorted((h.symbol, h.score) for h in hits) == [
        ("DNSBL_ZEN_PBL", 3.0),
        ("DNSBL_ZEN_SBL", 10.0),
    ]


def test_an_error_code_voids_the_whole_answer() -> None:
    answer = interpret(ZEN, ["127.0.0.2", "127.255.255.254"])
    assert answer.hits == ()
    assert answer.blocked == ("127.255.255.254",)


def test_scores_table_overrides_a_symbol() -> None:
    overrides = {"DNSBL_ZEN_SBL": 12.5}
    hits = interpret(ZEN, ["127.0.0.2"], lambda s, d: overrides.get(s, d)).hits
    assert hits[0].score == 12.5


# --- names, symbols, masking ----------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "tag"),
    [
        ("zen.spamhaus.org", "ZEN"),
        ("abcdefghijklmnopqrstuvwxyz.zen.dq.spamhaus.net", "ZEN"),  # DQS key skipped
        ("bl.spamcop.net", "BL"),
        ("b.barracudacentral.org", "B"),
        ("ix.dnsbl.manitu.net", "IX"),
        ("rbl-plus.mail-abuse.example", "RBL_PLUS"),
        ("0spam.example", "Z0SPAM"),
    ],
)
def test_derived_tag(zone: str, tag: str) -> None:
    assert derived_tag(zone) == tag


def test_symbols() -> None:
    assert symbol_for("ZEN", "SBL", allow=False) == "DNSBL_ZEN_SBL"
    assert symbol_for("SPAMCOP", "", allow=False) == "DNSBL_SPAMCOP"
    assert symbol_for("DNSWL", "", allow=True) == "DNSWL_DNSWL"
    zone = DNSBLZone("list.dnswl.org", -2.0, name="DNSWL", allow=True)
    assert interpret(zone, ["127.0.10.2"]).hits[0].symbol == "DNSWL_DNSWL"


def test_mask_zone_hides_an_access_key() -> None:
    key = "abcdefghijklmnopqrstuvw123"
    assert mask_zone(f"{key}.zen.dq.spamhaus.net") == "***.zen.dq.spamhaus.net"
    assert mask_zone("zen.spamhaus.org.") == "zen.spamhaus.org"
    hit = interpret(DNSBLZone(f"{key}.zen.dq.spamhaus.net", 5.0), ["127.0.0.2"]).hits[0]
    assert key not in repr(hit.as_data())
    assert key not in tally([hit], 0.0).reject_reason + tally([hit], 1.0).reject_reason


# --- the sum --------------------------------------------------------------------------


def _hit(score: float, reject: bool = False, allow: bool = False, zone: str = "a.example") -> Hit:
    return Hit(zone, "127.0.0.2", "", "DNSBL_A", score, allow, reject)


def test_reject_zone_alone_rejects() -> None:
    t = tally([_hit(1.0, reject=True)], threshold=0.0)
    assert t.reject_reason == "client listed in a.example (127.0.0.2)"
    assert t.listed and not t.allowlisted


def test_threshold_combines_zones() -> None:
    hits = [_hit(3.0, zone="a.example"), _hit(2.5, zone="b.example")]
    assert tally(hits, threshold=0.0).reject_reason == ""  # off
    assert tally(hits, threshold=6.0).reject_reason == ""
    t = tally(hits, threshold=5.5)
    assert t.total == 5.5
    assert t.reject_reason == "DNSBL score 5.5 >= threshold 5.5 (a.example, b.example)"
    # the connect-time sum counts towards the MAIL-time domain hits
    assert tally([_hit(2.5)], threshold=5.5, prior=3.0).reject_reason


def test_allowlist_lowers_the_sum_but_never_rejects() -> None:
    wl = _hit(-4.0, allow=True, zone="wl.example")
    t = tally([_hit(3.0), _hit(3.0, zone="b.example"), wl], threshold=5.0)
    # the sum stays above 0: lowered below the threshold, but not allowlisted
    assert (t.total, t.reject_reason, t.allowlisted) == (2.0, "", False)
    assert tally([wl], threshold=0.5).reject_reason == ""
    # a zone's own reject flag is not cancelled by an allowlist hit
    assert tally([_hit(1.0, reject=True), wl], threshold=0.0).reject_reason
    # an allowlist hit scored 0 (an untrusted code) spares nothing
    assert not tally([_hit(0.0, allow=True, zone="wl.example")], threshold=0.0).allowlisted


def test_the_sum_is_rounded_like_the_verdicts() -> None:
    """0.7 + 0.1 is 0.7999999999999999 in floats: a threshold of 0.8 must still be met."""
    hits = [_hit(0.7, zone="a.example"), _hit(0.1, zone="b.example")]
    t = tally(hits, threshold=0.8)
    assert t.total == 0.8
    assert t.reject_reason == "DNSBL score 0.8 >= threshold 0.8 (a.example, b.example)"


def test_allowlisted_needs_the_combined_sum_below_zero() -> None:
    wl = _hit(-2.0, allow=True, zone="wl.example")
    assert tally([wl], threshold=0.0).allowlisted
    assert not tally([wl, _hit(10.0)], threshold=0.0).allowlisted  # XBL + DNSWL
    assert tally([_hit(-12.0, allow=True, zone="wl.example"), _hit(10.0)], 0.0).allowlisted


# --- probes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "positive", "negative", "bad"),
    [
        ("ip", ["127.0.0.2"], [], False),
        ("ip", ["127.255.255.254"], ["127.255.255.254"], True),  # refused resolver
        ("ip", ["10.0.0.1"], ["10.0.0.1"], True),  # NXDOMAIN rewriting
        ("ip", ["127.0.0.1"], [], True),  # URIBL-style refusal
        ("ip", ["127.0.0.2"], ["127.0.0.2"], True),  # lists everything
        ("ip", [], [], True),  # test entry missing: dead zone
        ("domain", [], [], False),  # TEST is optional in practice
        ("domain", ["127.0.1.2"], ["127.0.1.2"], True),
        ("ip", None, [], False),  # timeout: inconclusive, never a reason
        ("ip", None, None, False),
    ],
)
def test_probe_verdict(
    kind: str, positive: list[str] | None, negative: list[str] | None, bad: bool
) -> None:
    assert bool(probe_verdict(kind, positive, negative)) is bad


def test_probe_verdict_knows_a_zones_own_refusal_code() -> None:
    assert probe_verdict("ip", ["127.0.0.255"], []) == ""
    assert "blocked" in probe_verdict("ip", ["127.0.0.255"], [], ("127.0.0.255",))


# --- the schema -----------------------------------------------------------------------

USER_TOML = """
[dnsbl]
threshold = 8
probe_interval = "10m"

[[dnsbl.zones]]
zone = "zen.spamhaus.org"
score = 10.0
reject = false
[dnsbl.zones.codes]
"127.0.0.2" = { label = "SBL", score = 10.0 }
"127.0.0.4" = { label = "xbl" }

[[dnsbl.zones]]
zone = "list.dnswl.org"
name = "DNSWL"
score = -2
allow = true
blocked_codes = ["127.0.0.255"]

[[dnsbl.zones]]
zone = "dbl.example"
type = "domain"
score = 4
codes = { "127.0.1.2" = { label = "SPAM", score = 5.0 } }
"""


def test_schema_parses_codes_allowlists_and_domain_zones() -> None:
    policy, problems = policy_from_dict(tomllib.loads(USER_TOML))
    assert problems == []
    assert policy is not None
    d = policy.dnsbl
    assert (d.threshold, d.probe_interval) == (8.0, 600.0)
    zen, wl, dbl = d.zones
    assert zen.codes == (DNSBLCode("127.0.0.2", "SBL", 10.0), DNSBLCode("127.0.0.4", "XBL"))
    assert (wl.allow, wl.tag, wl.blocked_codes) == (True, "DNSWL", ("127.0.0.255",))
    assert (dbl.type, dbl.tag, dbl.codes) == (
        "domain",
        "DBL",
        (DNSBLCode("127.0.1.2", "SPAM", 5.0),),
    )
    # policy show writes it back as TOML that reads as the same policy
    again, problems = policy_from_dict(tomllib.loads(render_toml(policy)))
    assert problems == [] and again == policy


def _problems(zones: list[dict[str, Any]], **dnsbl: Any) -> list[tuple[str, str]]:
    return policy_from_dict({"dnsbl": {"zones": zones, **dnsbl}})[1]


@pytest.mark.parametrize(
    ("zones", "key", "text"),
    [
        ([{"zone": "a.example", "codes": {"127.0.0.1": {"label": "X"}}}], '"127.0.0.1"', "listing"),
        ([{"zone": "a.example", "codes": {"10.0.0.2": {"label": "X"}}}], '"10.0.0.2"', "listing"),
        ([{"zone": "a.example", "codes": {"127.0.0.2": {"score": 1}}}], "label", "required"),
        ([{"zone": "a.example", "codes": {"127.0.0.2": {"label": "A B"}}}], "label", "letters"),
        (
            [{"zone": "a.example", "codes": {"127.0.0.2": {"label": "A", "scor": 1}}}],
            "scor",
            "did you mean",
        ),
        ([{"zone": "a.example", "codes": {"127.0.0.2": "SBL"}}], '"127.0.0.2"', "expected"),
        ([{"zone": "a.example", "codes": []}], "codes", "table"),
        ([{"zone": "a.example", "type": "url"}], "type", "expected one of"),
        ([{"zone": "a.example", "name": "zen"}], "name", "upper case"),
        ([{"zone": "a.example", "blocked_codes": ["10.0.0.1"]}], "blocked_codes[0]", "127.0.0.0/8"),
        ([{"zone": "wl.example", "allow": True, "score": 1}], "score", "<= 0"),
        ([{"zone": "wl.example", "allow": True, "reject": True}], "reject", "never rejects"),
        ([{"zone": "wl.example", "allow": True, "type": "domain"}], "allow", "client address"),
        (
            [
                {
                    "zone": "wl.example",
                    "allow": True,
                    "codes": {"127.0.0.2": {"label": "HI", "score": 2}},
                }
            ],
            "score",
            "<= 0",
        ),
        ([{"zone": "zen.spamhaus.org"}, {"zone": "zen.example.net"}], "zones[1].name", "ZEN"),
    ],
)
def test_schema_problems(zones: list[dict[str, Any]], key: str, text: str) -> None:
    problems = _problems(zones)
    assert any(key in k and text in m for k, m in problems), problems


def test_same_zone_as_ip_and_domain_list_needs_two_names() -> None:
    both = [{"zone": "multi.example"}, {"zone": "multi.example", "type": "domain"}]
    assert any("name" in k for k, _ in _problems(both))
    both[1]["name"] = "MULTI_DOMAIN"
    assert _problems(both) == []


def test_threshold_must_not_be_negative() -> None:
    assert _problems([], threshold=-1)
