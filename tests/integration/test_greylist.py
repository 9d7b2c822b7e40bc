"""The greylist check against the real Redis (the worker's test db, flushed per test), no mocks.

Time is the check's injectable ``Context.clock`` except in one test that waits a
real second: the store keeps the caller's times, so minutes of greylisting can be
walked through instantly; Redis TTLs (real time) are asserted separately.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from filter import replies
from filter.checks import Context
from filter.checks.greylist import GreylistCheck
from filter.greylist import parse_allow_target
from filter.metrics import Metrics
from filter.model import ClientInfo, Envelope, Recipient
from filter.policy.schema import DNSBLPolicy, Policy, policy_from_dict
from filter.results import Action, CheckResult, Decision, Symbol
from filter.store import Store
from tests.rig.ports import free_cluster_port, free_port
from tests.rig.redisserver import start_redis_server, stop_servers, wait_until

T0 = 1_700_000_000.0
DELAY = 300.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_policy(redis_url: str, on_error: str = "accept", **greylist: Any) -> Policy:
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "on_error": on_error},
        "greylist": {"delay": "5m", "retry_window": "2d", "max_age": "35d", **greylist},
    }
    policy, problems = policy_from_dict(data)
    assert policy is not None, problems
    return policy


def spf(result: str, domain: str = "example.org", identity: str = "mailfrom") -> CheckResult:
    return CheckResult(
        "spf",
        result,
        (Symbol(f"SPF_{result.upper()}", 0.0),),
        None,
        {"identity": identity, "domain": domain},
    )


class Harness:
    """Builds one RCPT-stage Context per call, like the session will."""

    def __init__(self, store: Store | None, policy: Policy, clock: Callable[[], float]) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self.check = GreylistCheck()

    async def rcpt(
        self,
        rcpt: str = "bob@example.test",
        ip: str = "192.0.2.10",
        mail_from: str = "alice@example.org",
        results: dict[str, CheckResult] | None = None,
        hostname: str | None = None,
        dry_run: bool = False,
        policy: Policy | None = None,
    ) -> CheckResult:
        ctx = Context(
            client=ClientInfo(ip=ip, port=4000, session_id="S1", hostname=hostname),
            policy=policy or self.policy,
            results=dict(results or {}),
            envelope=Envelope(mail_from=mail_from, recipients=[Recipient(rcpt)]),
            recipient=Recipient(rcpt),
            clock=self.clock,
            dry_run=dry_run,
            store=self.store,
        )
        return await self.check.run(ctx)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gl(store: Store, redis_url: str, clock: Clock) -> Harness:
    return Harness(store, make_policy(redis_url), clock)


def greylisted(r: CheckResult) -> bool:
    return r.decision is not None and r.decision.action is Action.GREYLIST


def count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("mailgate_greylist_total", {"result": result})
    return value or 0.0


def triplet_keys(raw: redis.Redis) -> list[str]:
    return sorted(str(k) for k in raw.scan_iter("mailgate:gl:t:*"))


# --- the basic cycle --------------------------------------------------------------------


async def test_first_attempt_is_greylisted_with_the_retry_time(
    gl: Harness, metrics: Metrics, raw: redis.Redis
) -> None:
    r = await gl.rcpt()
    assert greylisted(r) and r.result == "policy"
    assert r.decision is not None and r.decision.reply == replies.greylisted(DELAY)
    reply = r.decision.reply
    assert reply is not None and (reply.code, reply.enhanced) == (451, "4.7.1")
    assert "try again in 300 seconds" in reply.text
    assert [s.name for s in r.symbols] == ["GREYLIST_NEW"]
    assert r.data["outcome"] == "new"
    assert count(metrics, "new") == 1
    (key,) = triplet_keys(raw)
    stored = raw.hgetall(key)
    assert stored["origin"] == "192.0.2.0/24" and stored["net"] == "192.0.2.0/24"
    assert (stored["sender"], stored["rcpt"]) == ("alice@example.org", "bob@example.test")


async def test_early_retry_is_greylisted_with_the_time_left(
    gl: Harness, clock: Clock, metrics: Metrics
) -> None:
    await gl.rcpt()
    clock.now += 100
    r = await gl.rcpt()
    assert greylisted(r) and r.data["outcome"] == "early"
    assert r.decision is not None and r.decision.reply == replies.greylisted(200)
    assert [s.name for s in r.symbols] == ["GREYLIST_EARLY"]
    assert count(metrics, "early") == 1


async def test_retry_after_the_delay_passes_and_stays_passed(
    gl: Harness, clock: Clock, metrics: Metrics, raw: redis.Redis
) -> None:
    await gl.rcpt()
    clock.now += DELAY
    r = await gl.rcpt()
    assert r.decision is None and r.result == "pass"
    assert [s.name for s in r.symbols] == ["GREYLIST_PASSED"]
    clock.now += 10 * 86400  # long after the retry window: passed triplets last max_age
    again = await gl.rcpt()
    assert again.decision is None and again.data["outcome"] == "passed"
    assert count(metrics, "passed") == 2
    (key,) = triplet_keys(raw)
    assert raw.hget(key, "seen") == "3"
    # The retry delay is observed once, for the pass that ended the greylisting.
    sample = metrics.registry.get_sample_value
    assert sample("mailgate_greylist_retry_delay_seconds_count") == 1
    assert sample("mailgate_greylist_retry_delay_seconds_sum") == pytest.approx(DELAY)


async def test_real_time_delay_with_the_default_clock(store: Store, redis_url: str) -> None:
    policy = make_policy(redis_url, delay="1s", retry_window="1m", max_age="1h")
    gl = Harness(store, policy, time.time)
    assert greylisted(await gl.rcpt())
    assert greylisted(await gl.rcpt())
    await asyncio.sleep(1.1)
    assert (await gl.rcpt()).decision is None


async def test_retry_after_the_window_starts_over(
    store: Store, redis_url: str, clock: Clock
) -> None:
    gl = Harness(store, make_policy(redis_url, delay="10s", retry_window="1m"), clock)
    assert (await gl.rcpt()).data["outcome"] == "new"
    clock.now += 61
    r = await gl.rcpt()
    assert greylisted(r) and r.data["outcome"] == "new"
    assert r.decision is not None and r.decision.reply == replies.greylisted(10)
    clock.now += 10
    assert (await gl.rcpt()).decision is None


async def test_passed_triplet_expires_after_max_age(
    store: Store, redis_url: str, clock: Clock
) -> None:
    gl = Harness(store, make_policy(redis_url, max_age="1h", retry_window="1h"), clock)
    await gl.rcpt()
    clock.now += DELAY
    assert (await gl.rcpt()).decision is None
    clock.now += 3601
    assert (await gl.rcpt()).data["outcome"] == "new"


async def test_every_key_has_a_ttl_from_its_policy(
    gl: Harness, clock: Clock, raw: redis.Redis, store: Store
) -> None:
    await gl.rcpt()
    (key,) = triplet_keys(raw)
    assert 2 * 86400 - 5 < raw.pttl(key) / 1000 <= 2 * 86400  # retry_window while waiting
    clock.now += DELAY
    await gl.rcpt()
    assert 35 * 86400 - 5 < raw.pttl(key) / 1000 <= 35 * 86400  # max_age once passed
    awl = "mailgate:gl:awl:192.0.2.0/24"
    assert 35 * 86400 - 5 < raw.pttl(awl) / 1000 <= 35 * 86400
    await store.allow(parse_allow_target("198.51.100.0/24"), 3600)
    for k in raw.scan_iter("*"):
        assert raw.pttl(k) > 0, f"{k} has no TTL"


# --- the auto-allowlist -----------------------------------------------------------------


async def test_awl_after_n_passes_counted_once_per_hour(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis, metrics: Metrics
) -> None:
    gl = Harness(store, make_policy(redis_url, awl_count=3), clock)

    async def deliver(rcpt: str) -> None:
        assert greylisted(await gl.rcpt(rcpt))
        clock.now += DELAY
        assert (await gl.rcpt(rcpt)).decision is None

    await deliver("a@example.test")
    await deliver("b@example.test")  # same hour: not counted again
    assert raw.hget("mailgate:gl:awl:192.0.2.0/24", "count") == "1"
    clock.now += 3600
    await deliver("c@example.test")
    clock.now += 3600
    await deliver("d@example.test")
    assert raw.hget("mailgate:gl:awl:192.0.2.0/24", "count") == "3"
    # A new triplet from anywhere in the network is no longer greylisted.
    before = len(triplet_keys(raw))
    r = await gl.rcpt("new@example.test", ip="192.0.2.200", mail_from="x@elsewhere.test")
    assert r.decision is None and r.data["outcome"] == "allowlisted"
    assert [s.name for s in r.symbols] == ["GREYLIST_AWL"]
    assert len(triplet_keys(raw)) == before  # the triplet was not even stored
    assert count(metrics, "allowlisted") == 1
    # Another network is not.
    assert greylisted(await gl.rcpt("new@example.test", ip="198.51.100.1"))


async def test_awl_off_with_zero(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis
) -> None:
    gl = Harness(store, make_policy(redis_url, awl_count=0), clock)
    await gl.rcpt()
    clock.now += DELAY
    await gl.rcpt()
    assert not raw.exists("mailgate:gl:awl:192.0.2.0/24")


# --- origin: networks and pool-aware mode -----------------------------------------------


async def test_retry_from_the_same_network_matches(gl: Harness, clock: Clock) -> None:
    assert greylisted(await gl.rcpt(ip="192.0.2.10"))
    clock.now += DELAY
    assert (await gl.rcpt(ip="192.0.2.99")).decision is None  # same /24
    assert greylisted(await gl.rcpt(ip="192.0.3.10"))  # another /24: new


async def test_ipv6_clients_are_keyed_by_their_64(gl: Harness, clock: Clock) -> None:
    assert greylisted(await gl.rcpt(ip="2001:db8:1:2::25"))
    clock.now += DELAY
    assert (await gl.rcpt(ip="2001:db8:1:2:aaaa::1")).decision is None
    assert greylisted(await gl.rcpt(ip="2001:db8:1:3::25"))


async def test_pool_aware_retry_from_another_network_of_the_spf_domain(
    gl: Harness, clock: Clock, raw: redis.Redis
) -> None:
    results = {"spf": spf("pass")}
    first = await gl.rcpt(ip="192.0.2.10", results=results)
    assert greylisted(first)
    clock.now += DELAY
    retry = await gl.rcpt(ip="203.0.113.50", results=results)  # another server of the pool
    assert retry.decision is None and retry.data["outcome"] == "passed"
    (key,) = triplet_keys(raw)
    assert raw.hget(key, "origin") == "spf:example.org"
    assert raw.hget(key, "net") == "192.0.2.0/24"  # where it was first seen


async def test_pool_aware_needs_an_spf_pass_for_the_mail_from(
    gl: Harness, clock: Clock, redis_url: str
) -> None:
    await gl.rcpt(ip="192.0.2.10", results={"spf": spf("softfail")})
    clock.now += DELAY
    assert greylisted(await gl.rcpt(ip="203.0.113.50", results={"spf": spf("softfail")}))
    helo_pass = {"spf": spf("pass", "client.example.org", identity="helo")}
    await gl.rcpt(ip="192.0.2.10", mail_from="", results=helo_pass)
    clock.now += DELAY
    assert greylisted(await gl.rcpt(ip="203.0.113.50", mail_from="", results=helo_pass))
    off = make_policy(redis_url, pool_aware=False)
    await gl.rcpt("z@example.test", ip="192.0.2.10", results={"spf": spf("pass")}, policy=off)
    clock.now += DELAY
    r = await gl.rcpt("z@example.test", ip="203.0.113.5", results={"spf": spf("pass")}, policy=off)
    assert greylisted(r)


async def test_batv_and_srs_tags_do_not_make_a_new_triplet(gl: Harness, clock: Clock) -> None:
    assert greylisted(await gl.rcpt(mail_from="prvs=1111aaaaaa=alice@example.org"))
    clock.now += DELAY
    assert (await gl.rcpt(mail_from="prvs=2222bbbbbb=Alice+x@Example.org")).decision is None
    assert (
        await gl.rcpt(mail_from="SRS0=abcd=XY=example.org=alice@forwarder.example")
    ).decision is None


async def test_verp_numbers_do_not_make_a_new_triplet(
    gl: Harness, clock: Clock, raw: redis.Redis
) -> None:
    """A list server numbers each bounce address; its retry keeps the triplet (postgrey)."""
    assert greylisted(await gl.rcpt(mail_from="bounce-1234-77@lists.example.org"))
    clock.now += DELAY
    r = await gl.rcpt(mail_from="bounce-1299-78@lists.example.org")
    assert r.decision is None and r.data["outcome"] == "passed"
    (key,) = triplet_keys(raw)
    assert raw.hget(key, "sender") == "bounce-#-#@lists.example.org"
    # Digits inside a name are part of it: user42 and user43 are two senders.
    assert greylisted(await gl.rcpt(mail_from="user42@example.org"))
    clock.now += DELAY
    assert greylisted(await gl.rcpt(mail_from="user43@example.org"))


async def test_null_sender_is_greylisted_like_any_sender(
    gl: Harness, clock: Clock, raw: redis.Redis
) -> None:
    assert greylisted(await gl.rcpt(mail_from=""))
    (key,) = triplet_keys(raw)
    assert raw.hget(key, "sender") == ""
    clock.now += DELAY
    assert (await gl.rcpt(mail_from="")).decision is None
    assert greylisted(await gl.rcpt(mail_from="alice@example.org"))  # not the same sender


# --- exemptions -------------------------------------------------------------------------


async def test_allow_clients_skip_without_touching_the_store(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis, metrics: Metrics
) -> None:
    gl = Harness(store, make_policy(redis_url, allow_clients=["192.0.2.0/25"]), clock)
    r = await gl.rcpt(ip="192.0.2.10")
    assert r.decision is None and r.result == "none" and r.data["outcome"] == "exempt"
    assert "allow_clients" in str(r.data["reason"])
    assert raw.dbsize() == 0
    assert count(metrics, "allowlisted") == 1
    assert greylisted(await gl.rcpt(ip="192.0.2.200"))


async def test_allow_rdns_matches_whole_labels(store: Store, redis_url: str, clock: Clock) -> None:
    gl = Harness(store, make_policy(redis_url, allow_rdns=["google.com"]), clock)
    assert (await gl.rcpt(hostname="mail-x.google.com")).decision is None
    assert greylisted(await gl.rcpt(hostname="mail.evilgoogle.com"))
    assert greylisted(await gl.rcpt(hostname=None, rcpt="c@example.test"))


async def test_allow_sender_domains_only_with_spf_pass(
    store: Store, redis_url: str, clock: Clock
) -> None:
    gl = Harness(store, make_policy(redis_url, allow_sender_domains=["example.org"]), clock)
    r = await gl.rcpt(results={"spf": spf("pass")})
    assert r.decision is None and r.data["outcome"] == "exempt"
    sub = await gl.rcpt(
        mail_from="a@lists.example.org", results={"spf": spf("pass", "lists.example.org")}
    )
    assert sub.decision is None
    assert greylisted(await gl.rcpt(results={"spf": spf("fail")}))
    assert greylisted(await gl.rcpt("x@example.test", results={"spf": spf("none")}))
    assert greylisted(await gl.rcpt("y@example.test"))  # no SPF result at all


async def test_skip_recipients_opt_out(store: Store, redis_url: str, clock: Clock) -> None:
    policy = make_policy(redis_url, skip_recipients=["postmaster@", "@lists.example.test"])
    gl = Harness(store, policy, clock)
    assert (await gl.rcpt("Postmaster@example.test")).decision is None
    assert (await gl.rcpt("anyone@lists.example.test")).decision is None
    assert greylisted(await gl.rcpt("bob@example.test"))


async def test_dnswl_listed_client_is_not_greylisted(gl: Harness, raw: redis.Redis) -> None:
    dnsbl = CheckResult("dnsbl", "pass", (Symbol("DNSWL_MED", -2.0),), None, {"allowlisted": True})
    r = await gl.rcpt(results={"dnsbl": dnsbl})
    assert r.decision is None and "allowlist" in str(r.data["reason"])
    listed = CheckResult("dnsbl", "fail", (), None, {"allowlisted": False})
    assert greylisted(await gl.rcpt(results={"dnsbl": listed}))


async def test_a_recipient_refused_anyway_leaves_no_triplet(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis, metrics: Metrics
) -> None:
    """A DNSBL reject or a block-list entry refuses the recipient at RCPT anyway: no
    triplet is written and nothing is counted, so botnet traffic does not fill the
    store. A refusal that a monitor mode only remembers does not count as one."""
    gl = Harness(store, make_policy(redis_url), clock)
    reject = Decision(Action.REJECT, replies.REJECT_DNSBL, "client listed in zen (SBL)")
    dnsbl = CheckResult("dnsbl", "fail", (Symbol("DNSBL_ZEN_SBL", 10.0),), reject, {})
    r = await gl.rcpt(results={"dnsbl": dnsbl})
    assert r.decision is None and r.data["outcome"] == "refused"
    assert "client listed in zen" in str(r.data["reason"])
    assert triplet_keys(raw) == []
    assert sum(count(metrics, x) for x in ("new", "early", "passed", "allowlisted")) == 0
    monitored = dataclasses.replace(make_policy(redis_url), dnsbl=DNSBLPolicy(mode="monitor"))
    assert greylisted(await gl.rcpt(results={"dnsbl": dnsbl}, policy=monitored))
    assert len(triplet_keys(raw)) == 1


async def test_apply_score_greylists_only_at_the_threshold(
    store: Store, redis_url: str, clock: Clock
) -> None:
    gl = Harness(store, make_policy(redis_url, apply="score"), clock)  # actions.greylist = 4
    low = {"spf": spf("softfail"), "rdns": _scored("rdns", 1.5)}
    r = await gl.rcpt(results=low)
    assert r.decision is None and "score 1.5 < actions.greylist 4" in str(r.data["reason"])
    high = {"spf": spf("softfail"), "rdns": _scored("rdns", 1.5), "helo": _scored("helo", 2.5)}
    assert greylisted(await gl.rcpt(results=high))


def _scored(check: str, score: float) -> CheckResult:
    return CheckResult(check, "fail", (Symbol(f"{check.upper()}_X", score),))


async def test_store_allow_entries_for_networks_and_spf_domains(gl: Harness, store: Store) -> None:
    await store.allow(parse_allow_target("192.0.2.0/26"), 3600, now=T0)
    r = await gl.rcpt(ip="192.0.2.10")
    assert r.decision is None and r.data["outcome"] == "allowlisted"
    assert "192.0.2.0/26" in str(r.data["reason"])
    assert greylisted(await gl.rcpt(ip="192.0.2.100"))
    await store.allow(parse_allow_target("example.org"), 3600, now=T0)
    ok = await gl.rcpt("c@example.test", ip="198.51.100.7", results={"spf": spf("pass")})
    assert ok.decision is None and "example.org" in str(ok.data["reason"])
    no_spf = await gl.rcpt("c@example.test", ip="198.51.100.7")
    assert greylisted(no_spf)


async def test_expired_allow_entries_do_not_count(gl: Harness, store: Store, clock: Clock) -> None:
    await store.allow(parse_allow_target("192.0.2.10"), 60, now=T0)
    assert (await gl.rcpt()).decision is None
    clock.now += 61
    assert greylisted(await gl.rcpt())


async def test_disabled_greylisting_does_nothing(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis
) -> None:
    gl = Harness(store, make_policy(redis_url, enabled=False), clock)
    r = await gl.rcpt()
    assert r.decision is None and r.data["outcome"] == "disabled"
    assert raw.dbsize() == 0


async def test_a_domain_with_greylisting_off_writes_and_counts_nothing(
    store: Store, redis_url: str, clock: Clock, raw: redis.Redis, metrics: Metrics
) -> None:
    base = make_policy(redis_url)
    policy, problems = policy_from_dict(
        {
            "redis": {"url": redis_url},
            "domains": {"partner.example": {"checks": {"greylist": "off"}}},
        }
    )
    assert policy is not None, problems
    gl = Harness(store, dataclasses.replace(policy, greylist=base.greylist), clock)
    r = await gl.rcpt("carol@sales.partner.example")  # a subdomain: the override covers it
    assert r.decision is None and r.data["outcome"] == "disabled"
    assert raw.dbsize() == 0 and count(metrics, "new") == 0
    assert greylisted(await gl.rcpt("bob@example.test"))  # other domains as before


# --- per recipient ----------------------------------------------------------------------


async def test_multi_recipient_message_gets_an_answer_per_recipient(
    gl: Harness, clock: Clock
) -> None:
    await gl.rcpt("known@example.test")
    clock.now += DELAY
    known = await gl.rcpt("known@example.test")
    fresh = await gl.rcpt("fresh@example.test")
    opted = await gl.rcpt("postmaster@example.test", policy=_with_skip(gl.policy))
    assert known.decision is None
    assert greylisted(fresh)
    assert opted.decision is None


def _with_skip(policy: Policy) -> Policy:
    return dataclasses.replace(
        policy, greylist=dataclasses.replace(policy.greylist, skip_recipients=("postmaster@",))
    )


# --- store failures ---------------------------------------------------------------------


async def test_store_down_with_on_error_accept_skips_and_counts(
    metrics: Metrics, clock: Clock
) -> None:
    down = Store("redis://127.0.0.1:1/0", metrics=metrics)
    try:
        gl = Harness(down, make_policy("redis://127.0.0.1:1/0"), clock)
        r = await gl.rcpt()
    finally:
        await down.aclose()
    assert r.decision is None and r.result == "temperror"
    assert [s.name for s in r.symbols] == ["GREYLIST_STORE_ERROR"]
    assert r.symbols[0].score == 0.0
    assert metrics.registry.get_sample_value("mailgate_store_errors_total") == 1
    assert count(metrics, "error") == 1


async def test_store_down_with_on_error_tempfail(metrics: Metrics, clock: Clock) -> None:
    down = Store("redis://127.0.0.1:1/0", metrics=metrics)
    try:
        gl = Harness(down, make_policy("redis://127.0.0.1:1/0", on_error="tempfail"), clock)
        r = await gl.rcpt()
    finally:
        await down.aclose()
    assert r.decision is not None and r.decision.action is Action.TEMPFAIL
    assert r.decision.reply == replies.STORE_TEMPFAIL
    assert r.decision.reply is not None and str(r.decision.reply).startswith("451 4.3.0")
    assert metrics.registry.get_sample_value("mailgate_store_errors_total") == 1


async def test_no_store_wired_follows_on_error(redis_url: str, clock: Clock) -> None:
    r = await Harness(None, make_policy(redis_url, on_error="tempfail"), clock).rcpt()
    assert r.decision is not None and r.decision.action is Action.TEMPFAIL


# --- concurrency and dry run ------------------------------------------------------------


async def test_concurrent_first_attempts_make_one_key_and_all_451(
    gl: Harness, raw: redis.Redis, metrics: Metrics
) -> None:
    results = await asyncio.gather(*(gl.rcpt() for _ in range(10)))
    assert all(greylisted(r) for r in results)
    assert sorted(str(r.data["outcome"]) for r in results) == ["early"] * 9 + ["new"]
    assert len(triplet_keys(raw)) == 1
    assert raw.hget(triplet_keys(raw)[0], "seen") == "10"
    assert count(metrics, "new") == 1 and count(metrics, "early") == 9


async def test_concurrent_first_attempts_from_two_stores(
    redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    """Two mailgate instances (two pools) racing on one triplet."""
    a, b = Store(redis_url), Store(redis_url)
    try:
        policy = make_policy(redis_url)
        ha, hb = Harness(a, policy, clock), Harness(b, policy, clock)
        results = await asyncio.gather(*(h.rcpt() for h in (ha, hb) for _ in range(5)))
    finally:
        await a.aclose()
        await b.aclose()
    assert all(greylisted(r) for r in results)
    assert len(triplet_keys(raw)) == 1


async def test_dry_run_writes_nothing(gl: Harness, clock: Clock, raw: redis.Redis) -> None:
    r = await gl.rcpt(dry_run=True)
    assert greylisted(r) and r.data["outcome"] == "new"
    assert raw.dbsize() == 0
    await gl.rcpt()
    (key,) = triplet_keys(raw)
    before = raw.hgetall(key)
    clock.now += DELAY
    dry = await gl.rcpt(dry_run=True)
    assert dry.decision is None and dry.data["outcome"] == "passed"
    assert raw.hgetall(key) == before
    assert not raw.exists("mailgate:gl:awl:192.0.2.0/24")
    assert raw.pttl(key) / 1000 <= 2 * 86400  # still on the retry window TTL


async def test_ping(store: Store) -> None:
    assert await store.ping() is True
    down = Store("redis://127.0.0.1:1/0")
    assert await down.ping() is False
    await down.aclose()


def test_network_text_is_canonical() -> None:
    # The AWL key and forget rely on one spelling of a network.
    assert str(ipaddress.ip_network("2001:DB8::/64")) == "2001:db8::/64"


# --- Sentinel and Cluster URLs, against private servers -------------------------------


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A master and one sentinel watching it as service "mg"."""
    tmp = tmp_path_factory.mktemp("sentinel")
    master, sport = free_port(), free_port()
    (tmp / "sentinel.conf").write_text(
        f"port {sport}\nbind 127.0.0.1\nsentinel monitor mg 127.0.0.1 {master} 1\n"
    )
    procs = [start_redis_server(tmp, "--port", str(master))]
    procs.append(start_redis_server(tmp, "sentinel.conf", "--sentinel"))
    try:
        probe = redis.Redis(port=sport, socket_timeout=1)
        wait_until(lambda: probe.sentinel_get_master_addr_by_name("mg") is not None, "sentinel")
        probe.close()
        yield f"redis+sentinel://127.0.0.1:{sport}/mg/2"
    finally:
        stop_servers(procs)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A two-node Redis Cluster (slots split in half), joined by hand: seconds faster
    than ``redis-cli --cluster create``."""
    tmp = tmp_path_factory.mktemp("cluster")
    ports = [free_cluster_port(), free_cluster_port()]
    procs = []
    for i, port in enumerate(ports):
        d = tmp / str(i)
        d.mkdir()
        procs.append(
            start_redis_server(
                d,
                "--port",
                str(port),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            )
        )
    try:
        nodes = [redis.Redis(port=p, socket_timeout=1, decode_responses=True) for p in ports]

        def cluster(n: redis.Redis, *args: str) -> str:
            return str(n.execute_command("CLUSTER", *args))  # type: ignore[no-untyped-call]

        for n in nodes:
            wait_until(functools.partial(n.ping), "cluster node")
        cluster(nodes[0], "ADDSLOTSRANGE", "0", "8191")
        cluster(nodes[1], "ADDSLOTSRANGE", "8192", "16383")
        cluster(nodes[0], "MEET", "127.0.0.1", str(ports[1]))
        for n in nodes:
            wait_until(lambda n=n: "cluster_state:ok" in cluster(n, "INFO"), "cluster state ok")  # type: ignore[misc]
            n.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    finally:
        stop_servers(procs)


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
async def test_sentinel_and_cluster_urls_greylist_and_administer(
    kind: str, request: pytest.FixtureRequest, clock: Clock
) -> None:
    url = request.getfixturevalue(f"{kind}_url")
    metrics = Metrics(CollectorRegistry())
    store = Store(url, f"t{time.monotonic_ns()}:", metrics=metrics)  # fresh keys per run
    try:
        gl = Harness(store, make_policy(url), clock)
        results = await asyncio.gather(*(gl.rcpt() for _ in range(5)))
        assert all(greylisted(r) for r in results)
        assert sorted(str(r.data["outcome"]) for r in results) == ["early"] * 4 + ["new"]
        clock.now += DELAY
        assert (await gl.rcpt()).decision is None
        await store.allow(parse_allow_target("198.51.100.0/24"), 600)
        assert (await gl.rcpt(ip="198.51.100.9")).data["outcome"] == "allowlisted"
        stats = await store.stats(5)
        assert (stats.triplets, stats.passed, stats.awl_networks, stats.allow_networks) == (
            1,
            1,
            1,
            1,
        )
        assert len(await store.triplets(10)) == 1
        report = await store.forget(parse_allow_target("192.0.2.1"))
        assert (report.triplets, report.awl, report.allow) == (1, 1, 0)
        assert await store.ping()
    finally:
        await store.aclose()
    assert metrics.registry.get_sample_value("mailgate_store_errors_total") == 0


async def test_admin_reads_work_on_a_fresh_cluster_client(cluster_url: str, clock: Clock) -> None:
    """`mailgate greylist stats|show|forget` start with a new client: its first call is
    a SCAN of the prefix's node, before any command taught it the cluster's slots."""
    prefix = f"t{time.monotonic_ns()}:"
    writer = Store(cluster_url, prefix)
    try:
        await Harness(writer, make_policy(cluster_url), clock).rcpt()
    finally:
        await writer.aclose()
    for read in ("stats", "triplets", "forget"):
        metrics = Metrics(CollectorRegistry())
        fresh = Store(cluster_url, prefix, metrics=metrics)
        try:
            if read == "stats":
                assert (await fresh.stats(5)).triplets == 1
            elif read == "triplets":
                assert len(await fresh.triplets(10)) == 1
            else:
                assert (await fresh.forget(parse_allow_target("192.0.2.1"))).triplets == 1
        finally:
            await fresh.aclose()
        assert metrics.registry.get_sample_value("mailgate_store_errors_total") == 0
