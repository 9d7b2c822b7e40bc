"""Rate limits' pure parts: policy table, exemptions, which counters an event touches."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from filter import replies
from filter.checks.ratelimit import (
    _TransactionIds,
    connection_limits,
    exemption,
    recipient_limits,
    sender_subject,
)
from filter.model import Envelope
from filter.policy.schema import DEFAULT_POLICY, RateLimitPolicy, policy_from_dict
from filter.store import KEYS

NET = "192.0.2.0/24"


def rl(**values: Any) -> RateLimitPolicy:
    policy, problems = policy_from_dict({"ratelimit": {"enabled": True, **values}})
    assert policy is not None, problems
    return policy.ratelimit


# --- the policy table -------------------------------------------------------------------


def test_off_by_default_with_no_limits() -> None:
    p = DEFAULT_POLICY.ratelimit
    assert p.enabled is False
    assert p.mode == "enforce"
    assert p.window == 60.0
    assert (
        p.connections_per_network,
        p.messages_per_network,
        p.recipients_per_network,
        p.messages_per_sender_domain,
        p.recipients_per_sender_domain,
    ) == (0, 0, 0, 0, 0)
    assert (p.ipv4_prefix, p.ipv6_prefix) == (24, 64)
    assert p.exempt_clients == ()


def test_symbols_score_zero_by_default() -> None:
    for name in (
        "RATELIMIT_CONNECTIONS",
        "RATELIMIT_MESSAGES",
        "RATELIMIT_RECIPIENTS",
        "RATELIMIT_STORE_ERROR",
    ):
        assert DEFAULT_POLICY.scores[name] == 0.0


def test_values_parse() -> None:
    p = rl(window="2s", recipients_per_network=30, exempt_clients=["198.51.100.7"])
    assert p.window == 2.0 and p.recipients_per_network == 30
    assert [str(n) for n in p.exempt_clients] == ["198.51.100.7/32"]


@pytest.mark.parametrize(
    ("values", "key", "text"),
    [
        ({"window": "500ms"}, "ratelimit.window", "at least"),
        ({"window": "2d"}, "ratelimit.window", "at most"),
        ({"messages_per_network": -1}, "ratelimit.messages_per_network", "at least"),
        (
            {"recipients_per_sender_domain": "10"},
            "ratelimit.recipients_per_sender_domain",
            "integer",
        ),
        ({"ipv4_prefix": 4}, "ratelimit.ipv4_prefix", "at least"),
        ({"exempt_clients": ["192.0.2.1/24"]}, "ratelimit.exempt_clients[0]", "host bits"),
        ({"connections_per_ip": 5}, "ratelimit.connections_per_ip", "unknown key"),
    ],
)
def test_bad_values_are_reported(values: dict[str, Any], key: str, text: str) -> None:
    policy, problems = policy_from_dict({"ratelimit": values})
    assert policy is None
    assert any(k == key and text in msg for k, msg in problems), problems


def test_reply_is_a_451_470() -> None:
    assert str(replies.RATE_LIMITED) == "451 4.7.0 Rate limit exceeded, try again later"
    assert replies.RATE_LIMITED.is_transient


def test_every_counter_kind_is_a_declared_key() -> None:
    for kind in ("rl_connections", "rl_messages", "rl_recipients"):
        assert kind in KEYS and "ratelimit.window" in KEYS[kind].ttl


# --- exemptions and subjects -------------------------------------------------------------


def test_exemption() -> None:
    assert exemption("192.0.2.1", DEFAULT_POLICY.ratelimit) == "disabled"
    p = rl(exempt_clients=["198.51.100.0/24", "2001:db8::/32"])
    assert exemption("192.0.2.1", p) is None
    assert "exempt_clients" in (exemption("198.51.100.9", p) or "")
    assert "exempt_clients" in (exemption("::ffff:198.51.100.9", p) or "")
    assert "exempt_clients" in (exemption("2001:db8::25", p) or "")


def test_sender_subject_needs_an_spf_pass_for_that_domain() -> None:
    assert sender_subject("alice@Example.ORG", "example.org", NET) == "dom:example.org"
    assert sender_subject("alice@example.org", None, NET) == f"domnet:example.org|{NET}"
    # SPF passed, but for another domain than the one counted: still only a claim.
    assert sender_subject("alice@example.org", "other.example", NET) == (
        f"domnet:example.org|{NET}"
    )


def test_sender_subject_normalises_and_skips_what_has_no_domain() -> None:
    assert sender_subject("<a@Bücher.example.>", "xn--bcher-kva.example", NET) == (
        "dom:xn--bcher-kva.example"
    )
    assert sender_subject("", None, NET) is None
    assert sender_subject("postmaster", None, NET) is None
    assert sender_subject("a@[192.0.2.1]", None, NET) is None


# --- which counters an event touches ------------------------------------------------------


def test_connection_limits() -> None:
    assert connection_limits(rl(), NET, "S1") == []
    (lim,) = connection_limits(rl(connections_per_network=10), NET, "S1")
    assert (lim.counter.kind, lim.counter.subject, lim.counter.limit) == (
        "rl_connections",
        NET,
        10,
    )
    assert lim.counter.member == "c:S1" and lim.symbol == "RATELIMIT_CONNECTIONS"


def test_recipient_limits_only_for_set_limits_messages_first() -> None:
    assert recipient_limits(rl(), NET, "dom:example.org", "T.1", "e1") == []
    p = rl(
        messages_per_network=5,
        recipients_per_network=50,
        messages_per_sender_domain=7,
        recipients_per_sender_domain=70,
    )
    got = recipient_limits(p, NET, "dom:example.org", "T.1", "e1")
    assert [
        (x.counter.kind, x.counter.subject, x.counter.limit, x.counter.member) for x in got
    ] == [
        ("rl_messages", f"net:{NET}", 5, "m:T.1"),
        ("rl_messages", "dom:example.org", 7, "m:T.1"),
        ("rl_recipients", f"net:{NET}", 50, "r:e1"),
        ("rl_recipients", "dom:example.org", 70, "r:e1"),
    ]
    assert [x.symbol for x in got] == [
        "RATELIMIT_MESSAGES",
        "RATELIMIT_MESSAGES",
        "RATELIMIT_RECIPIENTS",
        "RATELIMIT_RECIPIENTS",
    ]
    assert [x.setting for x in got] == [
        "messages_per_network",
        "messages_per_sender_domain",
        "recipients_per_network",
        "recipients_per_sender_domain",
    ]
    assert got[1].what == "messages of sender domain example.org"


def test_recipient_limits_without_a_sender_domain_are_per_network_only() -> None:
    p = rl(recipients_per_network=50, recipients_per_sender_domain=70)
    got = recipient_limits(p, NET, None, "T.1", "e1")
    assert [x.setting for x in got] == ["recipients_per_network"]


def test_unverified_sender_is_described_with_its_network() -> None:
    p = rl(messages_per_sender_domain=7)
    (lim,) = recipient_limits(p, NET, f"domnet:example.org|{NET}", "T.1", "e1")
    assert lim.what == f"messages of sender domain example.org from {NET}"


def test_transaction_ids_are_per_envelope_object_and_forgotten_with_it() -> None:
    ids = _TransactionIds()
    a = Envelope("alice@example.org", message_id="S.1")
    b = Envelope("alice@example.org", message_id="S.1")  # after RSET: same message_id
    assert ids(a) == ids(a) != ids(b)
    assert len(ids) == 2
    del a, b
    gc.collect()
    assert len(ids) == 0


def test_recipient_limits_leave_out_the_messages_of_a_message_counted_already() -> None:
    p = rl(messages_per_network=5, recipients_per_network=50, messages_per_sender_domain=7)
    got = recipient_limits(p, NET, "dom:example.org", "T.1", "e1", message_counted=True)
    assert [x.setting for x in got] == ["recipients_per_network"]


def test_transaction_ids_remember_a_counted_message_until_the_transaction_ends() -> None:
    ids = _TransactionIds()
    a = Envelope("alice@example.org", message_id="S.1")
    b = Envelope("alice@example.org", message_id="S.2")
    ids(a), ids(b)
    assert not ids.counted(a)
    ids.mark_counted(a)
    assert ids.counted(a) and not ids.counted(b)
    del a
    gc.collect()
    assert len(ids) == 1 and not ids._counted
