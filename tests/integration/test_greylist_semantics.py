"""Greylisting and rate limits held to issue 4, postgrey's behaviour and RFC 5321 retries.

Real Redis (the worker's test db), the real check classes, an injected clock: the
edges are walked to the millisecond. Each test names the rule it holds the code to.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis

from filter.checks import Context
from filter.checks.ratelimit import RateLimitCheck, RateLimitConnectCheck
from filter.model import ClientInfo, Envelope, Recipient
from filter.policy.schema import Policy, policy_from_dict
from filter.replies import retry_seconds
from filter.results import CheckResult
from filter.store import Store
from tests.integration.test_greylist import (
    DELAY,
    T0,
    Clock,
    Harness,
    greylisted,
    make_policy,
    spf,
)

AWL = "mailgate:gl:awl:192.0.2.0/24"


# The harness of the greylist tests: one RCPT-stage Context per call, like the session.
Greylist = Harness
policy = make_policy


def spf_pass(domain: str = "example.org", identity: str = "mailfrom") -> dict[str, CheckResult]:
    return {"spf": spf("pass", domain, identity)}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gl(store: Store, redis_url: str, clock: Clock) -> Greylist:
    return Greylist(store, policy(redis_url), clock)


def advertised(r: CheckResult) -> int:
    """The N of "try again in N seconds" in the 451 the client got."""
    assert r.decision is not None and r.decision.reply is not None
    m = re.search(r"try again in (\d+) seconds", r.decision.reply.text)
    assert m is not None, r.decision.reply.text
    return int(m[1])


def triplets(raw: redis.Redis) -> list[str]:
    return sorted(str(k) for k in raw.scan_iter("mailgate:gl:t:*"))


def assert_every_key_expires(raw: redis.Redis) -> None:
    keys = list(raw.scan_iter("mailgate:*"))
    assert keys
    for k in keys:
        assert raw.pttl(k) > 0, f"{k} has no TTL"


# --- sender normalisation, through the check --------------------------------------------


async def test_batv_with_the_tag_last_is_one_sender(gl: Greylist, clock: Clock) -> None:
    """postgrey undoes "prvs=user=tag" as well as "prvs=tag=user": the tag changes per
    message, so keeping it made every retry a new triplet."""
    assert greylisted(await gl.rcpt(mail_from="prvs=alice=1234abcdef@example.org"))
    clock.now += DELAY
    r = await gl.rcpt(mail_from="prvs=alice=2234fedcba@example.org")
    assert r.decision is None and r.data["outcome"] == "passed"


async def test_quoted_atom_local_part_is_the_unquoted_mailbox(gl: Greylist, clock: Clock) -> None:
    """RFC 5321 4.1.2: "alice"@ and alice@ are one mailbox."""
    assert greylisted(await gl.rcpt(mail_from='"Alice"@example.org'))
    clock.now += DELAY
    assert (await gl.rcpt(mail_from="alice@example.org")).decision is None


async def test_hyphen_extension_is_not_stripped(gl: Greylist, clock: Clock) -> None:
    """Only "+ext" is an extension (issue 4, postgrey); "-" is part of many real names."""
    assert greylisted(await gl.rcpt(mail_from="john-doe@example.org"))
    clock.now += DELAY
    assert greylisted(await gl.rcpt(mail_from="john@example.org"))


async def test_very_long_sender_is_one_fixed_length_key(
    gl: Greylist, clock: Clock, raw: redis.Redis
) -> None:
    sender = "a" * 200 + "@" + "b" * 50 + ".example"
    assert greylisted(await gl.rcpt(mail_from=sender))
    (key,) = triplets(raw)
    assert len(key) == len("mailgate:gl:t:") + 40
    assert raw.hget(key, "sender") == sender
    clock.now += DELAY
    assert (await gl.rcpt(mail_from=sender.upper())).decision is None


# --- client network ---------------------------------------------------------------------


async def test_ipv4_mapped_client_is_its_ipv4_network(
    gl: Greylist, clock: Clock, raw: redis.Redis
) -> None:
    assert greylisted(await gl.rcpt(ip="::ffff:192.0.2.10"))
    assert raw.hget(triplets(raw)[0], "net") == "192.0.2.0/24"
    clock.now += DELAY
    assert (await gl.rcpt(ip="192.0.2.77")).decision is None


async def test_pool_aware_keys_a_subdomain_by_itself_and_null_sender_by_network(
    gl: Greylist, clock: Clock, raw: redis.Redis
) -> None:
    sub = spf_pass("bounce.example.org")
    assert greylisted(await gl.rcpt(mail_from="x@bounce.example.org", results=sub))
    assert raw.hget(triplets(raw)[0], "origin") == "spf:bounce.example.org"
    clock.now += DELAY
    r = await gl.rcpt(ip="203.0.113.9", mail_from="x@bounce.example.org", results=sub)
    assert r.decision is None
    # The parent domain's SPF pass is another origin: it did not vouch for this pool.
    other = await gl.rcpt(ip="203.0.113.9", mail_from="x@example.org", results=spf_pass())
    assert greylisted(other)
    # The null sender's only SPF identity is the HELO: keyed by network, never by domain.
    helo = spf_pass("mx.example.org", identity="helo")
    assert greylisted(await gl.rcpt(ip="192.0.2.10", mail_from="", results=helo))
    clock.now += DELAY
    assert greylisted(await gl.rcpt(ip="203.0.113.9", mail_from="", results=helo))
    assert (await gl.rcpt(ip="192.0.2.200", mail_from="", results=helo)).decision is None


# --- the edges of delay, retry_window and max_age ---------------------------------------


async def test_delay_edge_to_the_millisecond(gl: Greylist, clock: Clock) -> None:
    """postgrey: greylisted while delay - (now - first) > 0, so a retry at the delay passes."""
    await gl.rcpt()
    clock.now = T0 + DELAY - 0.001
    early = await gl.rcpt()
    assert greylisted(early) and early.data["outcome"] == "early"
    assert advertised(early) == 1  # never "0 seconds"
    clock.now = T0 + DELAY
    assert (await gl.rcpt()).decision is None


async def test_retry_after_the_advertised_seconds_passes(gl: Greylist, clock: Clock) -> None:
    """A client that waits exactly the N seconds the 451 named must pass (RFC 5321 4.5.4.1:
    the sender retries after a wait; telling it too little buys another 451)."""
    await gl.rcpt()
    clock.now = T0 + DELAY - 1.0005
    early = await gl.rcpt()
    n = advertised(early)
    assert n == 2
    assert early.data["reason"].endswith(f"retry in {n}s")
    clock.now += n
    assert (await gl.rcpt()).decision is None


@pytest.mark.parametrize(
    ("left", "seconds"), [(300.0, 300), (0.4, 1), (0.0001, 1), (59.5, 60), (60.0, 60)]
)
def test_retry_seconds_round_up_and_are_never_zero(left: float, seconds: int) -> None:
    assert retry_seconds(left) == seconds


async def test_reason_never_says_zero_seconds(gl: Greylist, clock: Clock) -> None:
    await gl.rcpt()
    clock.now = T0 + DELAY - 0.4
    r = await gl.rcpt()
    assert r.data["reason"].endswith("retry in 1s") and advertised(r) == 1


async def test_retry_window_edge(store: Store, redis_url: str, clock: Clock) -> None:
    """postgrey resets the first-seen time only when now - first > retry_window."""
    gl = Greylist(store, policy(redis_url, retry_window="1h", max_age="1h"), clock)
    await gl.rcpt("a@example.test")
    await gl.rcpt("b@example.test")
    clock.now = T0 + 3600
    assert (await gl.rcpt("a@example.test")).decision is None
    clock.now = T0 + 3600.001
    late = await gl.rcpt("b@example.test")
    assert greylisted(late) and late.data["outcome"] == "new" and advertised(late) == 300


async def test_max_age_edge_counts_from_the_last_pass(
    store: Store, redis_url: str, clock: Clock
) -> None:
    """postgrey: entries are deleted max_age after they were last seen, not first seen."""
    gl = Greylist(store, policy(redis_url, retry_window="1h", max_age="2h"), clock)
    await gl.rcpt()
    clock.now = T0 + DELAY
    assert (await gl.rcpt()).decision is None
    clock.now += 7200  # exactly max_age after the last pass: still known, and renewed
    assert (await gl.rcpt()).data["outcome"] == "passed"
    clock.now += 7200.001
    assert (await gl.rcpt()).data["outcome"] == "new"


# --- the auto-allowlist -----------------------------------------------------------------


async def test_awl_counts_retries_not_repeat_passes_of_a_known_triplet(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis
) -> None:
    """Issue 4: "auto-allowlist of a client after N successful retries"; postgrey counts a
    pass only when it ended a triplet's greylisting. A known triplet passing again proved
    nothing, and counting it allowlisted the whole network after one retry."""
    gl = Greylist(store, policy(redis_url, awl_count=2), clock)
    await gl.rcpt()
    clock.now += DELAY
    assert (await gl.rcpt()).data["outcome"] == "passed"
    assert raw.hget(AWL, "count") == "1"
    for _ in range(3):  # the same triplet, hours apart: passes, never counts
        clock.now += 3601
        assert (await gl.rcpt()).data["outcome"] == "passed"
    assert raw.hget(AWL, "count") == "1"
    r = await gl.rcpt("new@example.test", ip="192.0.2.99", mail_from="x@other.example")
    assert greylisted(r)
    clock.now += DELAY  # a second triplet's retry, over an hour after the first: counted
    assert (await gl.rcpt("new@example.test", mail_from="x@other.example")).decision is None
    assert raw.hget(AWL, "count") == "2"
    awl = await gl.rcpt("third@example.test", mail_from="y@third.example")
    assert awl.data["outcome"] == "allowlisted"


async def test_repeat_pass_leaves_no_countless_awl_entry(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis
) -> None:
    gl = Greylist(store, policy(redis_url, awl_count=2), clock)
    await gl.rcpt()
    clock.now += DELAY
    await gl.rcpt()
    raw.delete(AWL)
    clock.now += 60
    assert (await gl.rcpt()).data["outcome"] == "passed"
    assert not raw.exists(AWL)


async def test_pool_aware_pass_counts_for_the_retrying_network(
    gl: Greylist, clock: Clock, raw: redis.Redis
) -> None:
    """Design §21: the AWL is keyed by the client's own network even when the triplet's
    origin is an SPF domain; the network that delivered the retry gets the count."""
    await gl.rcpt(ip="192.0.2.10", results=spf_pass())
    clock.now += DELAY
    assert (await gl.rcpt(ip="203.0.113.9", results=spf_pass())).decision is None
    assert raw.hget("mailgate:gl:awl:203.0.113.0/24", "count") == "1"
    assert not raw.exists(AWL)


# --- memory bound and concurrency -------------------------------------------------------


async def test_every_key_expires_after_every_operation(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis
) -> None:
    gl = Greylist(store, policy(redis_url, awl_count=1), clock)
    await gl.rcpt()  # new
    assert_every_key_expires(raw)
    clock.now += 1
    await gl.rcpt()  # early
    assert_every_key_expires(raw)
    clock.now += DELAY
    await gl.rcpt()  # first pass, AWL counted
    assert_every_key_expires(raw)
    clock.now += 60
    await gl.rcpt()  # allowlisted by the AWL
    assert_every_key_expires(raw)
    await gl.rcpt(ip="198.51.100.1")  # another network: new
    assert_every_key_expires(raw)


# --- rate limits ------------------------------------------------------------------------


def rl_policy(redis_url: str, **ratelimit: Any) -> Policy:
    data = {"redis": {"url": redis_url}, "ratelimit": {"enabled": True, **ratelimit}}
    p, problems = policy_from_dict(data)
    assert p is not None, problems
    return p


def rl_ctx(
    p: Policy, clock: Clock, store: Store, envelope: Envelope | None = None, rcpt: str = ""
) -> Context:
    return Context(
        client=ClientInfo(ip="192.0.2.10", port=1, session_id=f"S{clock.now}"),
        policy=p,
        envelope=envelope,
        recipient=Recipient(rcpt) if rcpt else None,
        clock=clock,
        store=store,
    )


async def test_rate_window_edge_is_exact_and_retry_after_names_it(
    store: Store, redis_url: str, clock: Clock
) -> None:
    p = rl_policy(redis_url, connections_per_network=1, window="1m")

    async def connect() -> CheckResult:
        return await RateLimitConnectCheck().run(rl_ctx(p, clock, store))

    assert (await connect()).result == "pass"
    clock.now = T0 + 59.999
    over = await connect()
    assert over.decision is not None and over.decision.reply is not None
    reply = over.decision.reply
    assert (reply.code, reply.enhanced) == (451, "4.7.0")
    assert [s.name for s in over.symbols] == ["RATELIMIT_CONNECTIONS"]
    assert over.data["retry_after"] == pytest.approx(0.001)
    clock.now = T0 + 60  # the first connection left the window exactly now
    assert (await connect()).result == "pass"


async def test_a_five_recipient_message_is_one_message_and_five_recipients(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis
) -> None:
    p = rl_policy(redis_url, messages_per_network=1, recipients_per_network=5)
    env = Envelope(mail_from="alice@example.org", message_id="M1.1")
    for i in range(5):
        ctx = rl_ctx(p, clock, store, env, f"r{i}@example.test")
        assert (await RateLimitCheck().run(ctx)).result == "pass"
    assert raw.zcard("mailgate:rl:m:net:192.0.2.0/24") == 1
    assert raw.zcard("mailgate:rl:r:net:192.0.2.0/24") == 5
    sixth = await RateLimitCheck().run(rl_ctx(p, clock, store, env, "r5@example.test"))
    assert [s.name for s in sixth.symbols] == ["RATELIMIT_RECIPIENTS"]
    env2 = Envelope(mail_from="a@example.org", message_id="M2.1")
    second = await RateLimitCheck().run(rl_ctx(p, clock, store, env2, "x@example.test"))
    assert [s.name for s in second.symbols] == ["RATELIMIT_MESSAGES"]
    assert_every_key_expires(raw)


def test_rate_limits_are_off_by_default() -> None:
    p, _ = policy_from_dict({})
    assert p is not None and p.ratelimit.enabled is False
