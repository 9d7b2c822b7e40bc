"""Greylisting's pure parts: triplet normalisation, networks, allow targets, key names."""

from __future__ import annotations

from typing import Any

import pytest

from filter.greylist import (
    Triplet,
    allow_fields,
    client_network,
    covering_networks,
    domain_matches,
    normalise_recipient,
    normalise_sender,
    parse_allow_target,
    parse_forget_target,
    rdns_matches,
    recipient_matches,
    triplet_digest,
    triplet_sender,
)
from filter.policy.schema import policy_from_dict
from filter.store import KEYS, Store, parse_store_url
from tests.rig.workers import TEST_REDIS_URL


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ""),
        ("<>", ""),
        ("Alice@Example.ORG", "alice@example.org"),
        ("<alice@example.org>", "alice@example.org"),
        ("alice+lists@example.org", "alice@example.org"),
        ("alice+a+b@example.org", "alice@example.org"),
        # BATV (draft-levine-smtp-batv) and its variants: the tag changes per message.
        ("prvs=1234abcdef=alice@example.org", "alice@example.org"),
        ("PRVS=0123456789=Alice@Example.org", "alice@example.org"),
        ("msprvs1=19372rp1ibnng=bounces-123@example.org", "bounces-123@example.org"),
        ("btv1==0123abcdef==alice@example.org", "alice@example.org"),
        # BATV with the tag last, as some MTAs write it (postgrey undoes this too).
        ("prvs=alice=1234abcdef@example.org", "alice@example.org"),
        ("PRVS=John.Smith=0123ABCDEF@Example.org", "john.smith@example.org"),
        # Both parts look like tags: the draft's order wins.
        ("prvs=1234abcdef=0123abcdef@example.org", "0123abcdef@example.org"),
        # Only "+" starts an extension: "-" is part of many real local parts.
        ("john-doe@example.org", "john-doe@example.org"),
        # RFC 5321 4.1.2: a quoted atom is the unquoted mailbox; any other quoted
        # local part is kept whole (its "+" is no extension).
        ('"Alice"@example.org', "alice@example.org"),
        ('"alice+x"@example.org', "alice@example.org"),
        ('"john doe+x"@example.org', '"john doe+x"@example.org'),
        # SRS0: forwarder's rewrite of the original sender, separator = + or -.
        ("SRS0=HHH=TT=orig.example=alice@forwarder.example", "alice@orig.example"),
        ("srs0+x7Ab=2c=orig.example=bob@fwd.example", "bob@orig.example"),
        ("SRS0-abcd=ZZ=orig.example=a=b@fwd.example", "a=b@orig.example"),
        # SRS1: a second forwarder wraps the first's SRS0 address.
        (
            "SRS1=HHH=first.example==HHH=TT=orig.example=alice@second.example",
            "alice@orig.example",
        ),
        # SRS of a BATV-tagged sender, with an extension after unwrapping.
        ("SRS0=h=tt=orig.example=prvs=1234abcdef=carol+x@fwd.example", "carol@orig.example"),
        ("postmaster", "postmaster"),
        ("+weird@example.org", "+weird@example.org"),
        ("alice@example.org.", "alice@example.org"),
    ],
)
def test_sender_normalisation(raw: str, expected: str) -> None:
    assert normalise_sender(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("bounce-12345-678@lists.example.org", "bounce-#-#@lists.example.org"),
        ("Bounces+alice=example.test@lists.example.org", "bounces@lists.example.org"),
        ("123@example.org", "#@example.org"),
        ("news.2026.11@example.org", "news.#.#@example.org"),
        # Digits that belong to a word stay: user42 is not user43.
        ("user42@example.org", "user42@example.org"),
        ("a_1@example.org", "a_1@example.org"),
        ("prvs=1234abcdef=bounce-99@example.org", "bounce-#@example.org"),
        ('"john 1 doe"@example.org', '"john 1 doe"@example.org'),
        ("", ""),
        ("postmaster", "postmaster"),
    ],
)
def test_triplet_sender_folds_verp_numbers(raw: str, expected: str) -> None:
    assert triplet_sender(raw) == expected


def test_list_matching_keeps_the_digits() -> None:
    """normalise_sender (list entries) must not fold: bounces-1@ is not bounces-2@."""
    assert normalise_sender("bounces-1@example.org") == "bounces-1@example.org"


def test_recipient_keeps_its_extension() -> None:
    assert normalise_recipient("<Bob+Lists@Example.TEST>") == "bob+lists@example.test"


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "expected"),
    [
        ("192.0.2.77", 24, 64, "192.0.2.0/24"),
        ("192.0.2.77", 32, 64, "192.0.2.77/32"),
        ("192.0.2.77", 16, 64, "192.0.0.0/16"),
        ("::ffff:192.0.2.77", 24, 64, "192.0.2.0/24"),  # mapped IPv4 is IPv4
        ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::9", 24, 48, "2001:db8:1::/48"),
        ("2001:db8::1", 24, 128, "2001:db8::1/128"),
    ],
)
def test_client_network_by_prefix(ip: str, v4: int, v6: int, expected: str) -> None:
    assert client_network(ip, v4, v6) == expected


def test_covering_networks_narrowest_first() -> None:
    v4 = covering_networks("192.0.2.77")
    assert v4[0] == "192.0.2.77/32" and v4[-1] == "192.0.0.0/8" and len(v4) == 25
    assert "192.0.2.0/24" in v4
    v6 = covering_networks("2001:db8::1")
    assert v6[0] == "2001:db8::1/128" and v6[-1] == "2001::/16" and len(v6) == 113


def test_allow_fields_ask_for_domains_only_with_an_spf_pass() -> None:
    without = allow_fields("192.0.2.1", None)
    assert all(f.startswith("net:") for f in without)
    with_domain = allow_fields("192.0.2.1", "mail.example.org")
    assert with_domain[-2:] == ["domain:mail.example.org", "domain:example.org"]
    assert "domain:org" not in with_domain


def test_domain_and_rdns_matching_is_by_whole_labels() -> None:
    assert domain_matches("example.org", ["example.org"])
    assert domain_matches("mx1.Example.org", ["example.org"])
    assert not domain_matches("badexample.org", ["example.org"])
    assert not domain_matches("", ["example.org"])
    assert rdns_matches("mail-a.outbound.google.com", ["google.com"])
    assert not rdns_matches("evilgoogle.com", ["google.com"])
    assert not rdns_matches(None, ["google.com"])


@pytest.mark.parametrize(
    ("rcpt", "patterns", "expected"),
    [
        ("postmaster@example.test", ["postmaster@"], True),
        ("Postmaster+x@example.test", ["postmaster@"], True),
        ("bob@example.test", ["postmaster@"], False),
        ("bob@example.test", ["@example.test"], True),
        ("bob@sub.example.test", ["@example.test"], False),
        ("bob@example.test", ["bob@example.test"], True),
        ("bob@example.test", ["bob@other.test"], False),
        ("bob@example.test", ["nonsense"], False),
    ],
)
def test_recipient_opt_out_patterns(rcpt: str, patterns: list[str], expected: bool) -> None:
    assert recipient_matches(rcpt, patterns) is expected


def test_triplet_digest_is_stable_and_separates_parts() -> None:
    t = Triplet("192.0.2.0/24", "a@b.test", "c@d.test")
    assert t.digest() == triplet_digest("192.0.2.0/24", "a@b.test", "c@d.test")
    assert len(t.digest()) == 40 and int(t.digest(), 16) >= 0
    # Moving text between parts must change the key.
    assert triplet_digest("x", "ab", "c") != triplet_digest("x", "a", "bc")
    assert str(t) == "192.0.2.0/24 <a@b.test> -> <c@d.test>"


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("192.0.2.7", "net", "192.0.2.7/32"),
        ("192.0.2.0/24", "net", "192.0.2.0/24"),
        ("2001:db8::/48", "net", "2001:db8::/48"),
        ("2001:DB8::1", "net", "2001:db8::1/128"),
        ("Example.ORG.", "domain", "example.org"),
        ("B\u00fccher.example", "domain", "xn--bcher-kva.example"),  # as SPF reports it
    ],
)
def test_allow_targets(text: str, kind: str, value: str) -> None:
    target = parse_allow_target(text)
    assert (target.kind, target.value, target.field) == (kind, value, f"{kind}:{value}")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "expected"),
        ("192.0.2.1/24", "did you mean 192.0.2.0/24"),
        ("10.0.0.0/7", "wider than /8"),
        ("2000::/15", "wider than /16"),
        ("300.1.2.3", "not an IP"),
        ("org", "not an IP address, CIDR network or domain"),
        ("not a domain!", "not an IP address, CIDR network or domain"),
    ],
)
def test_bad_allow_targets(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_allow_target(text)


def test_forget_accepts_any_width() -> None:
    assert parse_forget_target("10.0.0.0/7").value == "10.0.0.0/7"
    with pytest.raises(ValueError, match="host bits"):
        parse_forget_target("10.0.0.1/8")


def test_key_names_come_from_the_keys_table() -> None:
    store = Store(TEST_REDIS_URL, "mg:")  # builds a client, connects to nothing
    assert store.key("triplet", "ab12") == "mg:gl:t:ab12"
    assert store.key("awl", "192.0.2.0/24") == "mg:gl:awl:192.0.2.0/24"
    assert store.key("allow") == "mg:gl:allow"
    with pytest.raises(KeyError):
        store.key("nope")
    for spec in KEYS.values():  # every key kind says its type, TTL and purpose
        namespace = spec.pattern.split(":", 1)[0]  # gl: greylist, rl: rate, v/vs: verdicts
        assert namespace in ("gl", "rl", "v", "vs") and spec.type and spec.ttl and spec.purpose
    cluster = Store("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "mg:")
    assert cluster.key("triplet", "ab12") == "{mg:}gl:t:ab12"  # one hash slot for all


@pytest.mark.parametrize(
    ("url", "mode", "hosts", "extra"),
    [
        ("redis://127.0.0.1:6379/0", "standalone", (), {}),
        ("unix:///run/redis.sock?db=2", "standalone", (), {}),
        (
            "redis+sentinel://:secret@s1,s2:26380,[::1]/mymaster/3?sentinel_password=sp",
            "sentinel",
            (("s1", 26379), ("s2", 26380), ("::1", 26379)),
            {"service": "mymaster", "db": 3, "password": "secret", "sentinel_password": "sp"},
        ),
        (
            "rediss+sentinel://user:pw@s1:5000/svc",
            "sentinel",
            (("s1", 5000),),
            {"service": "svc", "db": 0, "tls": True, "username": "user", "password": "pw"},
        ),
        (
            "redis+cluster://n1:7000,n2",
            "cluster",
            (("n1", 7000), ("n2", 6379)),
            {"tls": False},
        ),
        ("rediss+cluster://n1:7000", "cluster", (("n1", 7000),), {"tls": True}),
    ],
)
def test_store_urls(url: str, mode: str, hosts: tuple[Any, ...], extra: dict[str, Any]) -> None:
    parsed = parse_store_url(url)
    assert parsed.mode == mode and parsed.hosts == hosts
    for name, value in extra.items():
        assert getattr(parsed, name) == value, name


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1:26379",
        "redis+cluster://n1:notaport",
        "redis+cluster://n1:70000",
        "redis+sentinel://s1/svc/1/2",
        "redis+sentinel://s1/svc?socket_timeout=1",
        "http://x",
    ],
)
def test_bad_store_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_store_url(url)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("redis+cluster://n1:7000,n2:7001", True),
        ("rediss+cluster://n1:7000", True),
        ("rediss+sentinel://s1/mymaster", True),
        ("redis+cluster://", False),
        ("memcached://x", False),
    ],
)
def test_schema_accepts_the_store_url_forms(url: str, ok: bool) -> None:
    policy, problems = policy_from_dict({"redis": {"url": url}})
    assert (policy is not None) is ok, problems


def test_greylist_policy_keys() -> None:
    policy, problems = policy_from_dict(
        {
            "greylist": {
                "awl_count": 0,
                "pool_aware": False,
                "allow_clients": ["192.0.2.0/24", "2001:db8::1"],
                "allow_rdns": ["google.com"],
                "allow_sender_domains": ["example.org"],
                "skip_recipients": ["postmaster@", "@example.test", "bob@example.test"],
            }
        }
    )
    assert policy is not None, problems
    assert policy.greylist.awl_count == 0 and not policy.greylist.pool_aware
    _, problems = policy_from_dict(
        {"greylist": {"skip_recipients": ["nobody"], "allow_sender_domains": ["no such"]}}
    )
    keys = sorted(k for k, _ in problems)
    assert keys == ["greylist.allow_sender_domains[0]", "greylist.skip_recipients[0]"]
