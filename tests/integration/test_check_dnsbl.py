"""The DNSBL checks against the real loopback DNS server through the real Resolver.

Zones live under ``bl.test`` (inside the server's ``test`` zone, so NXDOMAIN comes
with a SOA). Each test builds its own Resolver and its own ZoneHealth with a fresh
metrics registry, so neither cached answers nor zone health leak between tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from filter import replies
from filter.checks import Context
from filter.checks.dnsbl import (
    HEALTH,
    DNSBLCheck,
    DNSBLDomainCheck,
    ZoneHealth,
    bind_metrics,
    probe,
    run_prober,
)
from filter.dnsbl import ip_query_name
from filter.metrics import Metrics
from filter.model import ClientInfo, Envelope, Stage
from filter.pipeline import Pipeline
from filter.policy.schema import (
    DEFAULT_POLICY,
    DNSBLCode,
    DNSBLPolicy,
    DNSBLZone,
    DNSPolicy,
    Policy,
)
from filter.resolver import Resolver
from filter.results import Action, CheckResult
from filter.units import Address
from filter.verdict import decide
from tests.rig.dnsserver import ZoneDNSServer

CLIENT = "192.0.2.10"
CLEAN = "192.0.2.11"
V6_CLIENT = "2001:db8::25"
KEY = "abcdefghijklmnopqrstuvwx12"

ZEN = DNSBLZone(
    "zen.bl.test",
    10.0,
    True,
    codes=(
        DNSBLCode("127.0.0.2", "SBL", 10.0),
        DNSBLCode("127.0.0.4", "XBL"),
        DNSBLCode("127.0.0.10", "PBL", 3.0),
    ),
)


def policy(*zones: DNSBLZone, **dnsbl: Any) -> Policy:
    return dataclasses.replace(
        DEFAULT_POLICY,
        dnsbl=DNSBLPolicy(zones=zones, **dnsbl),
        dns=DNSPolicy(timeout=1.0),
    )


def resolver_for(server: ZoneDNSServer, timeout: float = 1.0) -> Resolver:
    return Resolver([Address(server.host, server.port)], timeout=timeout)


def healthy_zone(server: ZoneDNSServer, zone: str) -> None:
    """Publish the RFC 5782 test entry 127.0.0.2 (127.0.0.1 stays unlisted)."""
    server.set_records(f"2.0.0.127.{zone}", "A", ["127.0.0.2"])


def list_ip(server: ZoneDNSServer, zone: str, ip: str, *codes: str) -> None:
    server.set_records(ip_query_name(ip, zone), "A", list(codes))


@pytest.fixture
def health(metrics: Metrics) -> ZoneHealth:
    return ZoneHealth(metrics=metrics)


def gauge(metrics: Metrics, zone: str) -> float | None:
    return metrics.registry.get_sample_value("mailgate_dnsbl_zone_healthy", {"zone": zone})


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"mailgate_dnsbl_{name}_total", labels) or 0.0


async def run_ip(
    server: ZoneDNSServer,
    pol: Policy,
    health: ZoneHealth,
    ip: str = CLIENT,
    resolver: Resolver | None = None,
    dry_run: bool = False,
) -> CheckResult:
    ctx = Context(
        client=ClientInfo(ip=ip, port=25000, session_id="S1"),
        policy=pol,
        resolver=resolver or resolver_for(server),
        dry_run=dry_run,
    )
    return await DNSBLCheck(health).run(ctx)


async def run_domain(
    server: ZoneDNSServer,
    pol: Policy,
    health: ZoneHealth,
    helo: str,
    mail_from: str,
    prior: CheckResult | None = None,
) -> CheckResult:
    ctx = Context(
        client=ClientInfo(ip=CLIENT, port=25000, session_id="S1", helo=helo),
        policy=pol,
        envelope=Envelope(mail_from=mail_from),
        results={"dnsbl": prior} if prior is not None else {},
        resolver=resolver_for(server),
    )
    return await DNSBLDomainCheck(health).run(ctx)


def symbols(result: CheckResult) -> dict[str, float]:
    return {s.name: s.score for s in result.symbols}


# -- listings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        (("127.0.0.2",), {"DNSBL_ZEN_SBL": 10.0}),
        (("127.0.0.4",), {"DNSBL_ZEN_XBL": 10.0}),  # code without score: the zone's
        (("127.0.0.10",), {"DNSBL_ZEN_PBL": 3.0}),
        (("127.0.0.9",), {"DNSBL_ZEN": 10.0}),  # unknown code: plain listing
        (("127.0.0.2", "127.0.0.4"), {"DNSBL_ZEN_SBL": 10.0, "DNSBL_ZEN_XBL": 10.0}),
    ],
)
async def test_listed_per_code_rejects_with_the_generic_reply(
    dns_zone: ZoneDNSServer, health: ZoneHealth, codes: tuple[str, ...], expected: dict[str, float]
) -> None:
    list_ip(dns_zone, "zen.bl.test", CLIENT, *codes)
    r = await run_ip(dns_zone, policy(ZEN), health)
    assert r.result == "fail"
    assert symbols(r) == expected
    assert r.decision is not None
    assert r.decision.action is Action.REJECT
    assert r.decision.reply is replies.REJECT_DNSBL
    assert str(r.decision.reply).startswith("554 5.7.1")
    assert r.data["allowlisted"] is False
    assert {d["code"] for d in r.data["listed"]} == set(codes)  # type: ignore[attr-defined]


async def test_not_listed_is_none_without_decision(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    r = await run_ip(dns_zone, policy(ZEN), health, ip=CLEAN)
    assert (r.result, r.symbols, r.decision) == ("none", (), None)
    assert r.data == {
        "listed": [],
        "allowlisted": False,
        "score": 0.0,
        "skipped": [],
        "blocked": [],
        "errors": [],
    }
    assert dns_zone.count(ip_query_name(CLEAN, "zen.bl.test"), "A") == 1


async def test_ipv6_listing_and_ipv4_mapped_client(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    list_ip(dns_zone, "zen.bl.test", V6_CLIENT, "127.0.0.2")
    r = await run_ip(dns_zone, policy(ZEN), health, ip=V6_CLIENT)
    assert symbols(r) == {"DNSBL_ZEN_SBL": 10.0}
    name = ip_query_name(V6_CLIENT, "zen.bl.test")
    assert len(name.split(".")) == 32 + 3
    assert dns_zone.count(name, "A") == 1
    list_ip(dns_zone, "zen.bl.test", CLIENT, "127.0.0.4")
    r = await run_ip(dns_zone, policy(ZEN), health, ip=f"::ffff:{CLIENT}")
    assert symbols(r) == {"DNSBL_ZEN_XBL": 10.0}


async def test_reject_flag_off_only_scores(dns_zone: ZoneDNSServer, health: ZoneHealth) -> None:
    zone = DNSBLZone("soft.bl.test", 2.5)
    list_ip(dns_zone, "soft.bl.test", CLIENT, "127.0.0.2")
    r = await run_ip(dns_zone, policy(zone), health)
    assert (r.result, symbols(r), r.decision) == ("fail", {"DNSBL_SOFT": 2.5}, None)


async def test_zones_are_queried_in_parallel(dns_zone: ZoneDNSServer, health: ZoneHealth) -> None:
    zones = [DNSBLZone(f"z{i}.bl.test", 1.0) for i in range(4)]
    for z in zones:
        list_ip(dns_zone, z.zone, CLIENT, "127.0.0.2")
    dns_zone.set_delay(0.3)
    t0 = time.monotonic()
    r = await run_ip(dns_zone, policy(*zones), health)
    elapsed = time.monotonic() - t0
    assert len(r.symbols) == 4
    assert elapsed < 0.3 * 2, f"four zones took {elapsed:.2f}s: not in parallel"


async def test_threshold_combines_two_non_reject_zones(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    a, b = DNSBLZone("a.bl.test", 3.0), DNSBLZone("b.bl.test", 2.0)
    list_ip(dns_zone, "a.bl.test", CLIENT, "127.0.0.2")
    list_ip(dns_zone, "b.bl.test", CLIENT, "127.0.0.3")
    r = await run_ip(dns_zone, policy(a, b, threshold=6.0), health)
    assert r.decision is None and r.data["score"] == 5.0
    r = await run_ip(dns_zone, policy(a, b, threshold=5.0), health)
    assert r.decision is not None and r.decision.reply is replies.REJECT_DNSBL
    assert r.decision.reason == "DNSBL score 5 >= threshold 5 (a.bl.test, b.bl.test)"
    # a decision that rests on the sum says so, for the verdict to re-judge per domain
    assert (r.decision.sum_of, r.decision.threshold) == (("DNSBL_A", "DNSBL_B"), 5.0)


async def test_dnswl_hit_scores_negative_and_allowlists(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    wl = DNSBLZone("wl.bl.test", -3.0, name="WL", allow=True, blocked_codes=("127.0.0.255",))
    soft = DNSBLZone("soft.bl.test", 4.0)
    list_ip(dns_zone, "wl.bl.test", CLIENT, "127.0.10.2")
    r = await run_ip(dns_zone, policy(wl, soft, threshold=1.0), health)
    assert (r.result, symbols(r), r.decision) == ("pass", {"DNSWL_WL": -3.0}, None)
    assert r.data["allowlisted"] is True
    # with a blocklist hit too: the sum stays below the threshold, no reject
    list_ip(dns_zone, "soft.bl.test", CLIENT, "127.0.0.2")
    r = await run_ip(dns_zone, policy(wl, soft, threshold=2.0), health)
    assert (r.result, r.data["score"], r.decision) == ("fail", 1.0, None)
    # dnswl.org's "over the limit" answer is no allowlisting
    list_ip(dns_zone, "wl.bl.test", CLEAN, "127.0.0.255")
    r = await run_ip(dns_zone, policy(wl), health, ip=CLEAN)
    assert r.data["allowlisted"] is False and r.data["blocked"] == ["wl.bl.test"]


async def test_dnswl_hit_outweighed_by_a_listing_is_no_allowlisting(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    """postscreen-like: the combined score decides. A DNSWL-listed host that is also
    in a blocklist (a compromised machine in a listed network) is not spared greylisting."""
    wl = DNSBLZone("wl.bl.test", -2.0, name="WL", allow=True)
    xbl = DNSBLZone("xbl.bl.test", 10.0)
    list_ip(dns_zone, "wl.bl.test", CLIENT, "127.0.10.2")
    list_ip(dns_zone, "xbl.bl.test", CLIENT, "127.0.0.4")
    r = await run_ip(dns_zone, policy(wl, xbl, threshold=15.0), health)
    assert (r.result, r.data["score"], r.decision) == ("fail", 8.0, None)
    assert r.data["allowlisted"] is False
    # an allowlist score that outweighs the listing still allowlists
    strong = dataclasses.replace(wl, score=-12.0)
    r = await run_ip(dns_zone, policy(strong, xbl, threshold=15.0), health)
    assert (r.data["score"], r.data["allowlisted"]) == (-2.0, True)


async def test_dnswl_code_scored_zero_is_no_allowlisting(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    """dnswl.org's trust level "none" (127.0.x.0) mapped to 0: shown, but not trusted."""
    wl = DNSBLZone(
        "wl.bl.test",
        -3.0,
        name="WL",
        allow=True,
        codes=(DNSBLCode("127.0.10.0", "NONE", 0.0), DNSBLCode("127.0.10.3", "HI", -5.0)),
    )
    list_ip(dns_zone, "wl.bl.test", CLIENT, "127.0.10.0")
    r = await run_ip(dns_zone, policy(wl), health)
    assert symbols(r) == {"DNSWL_WL_NONE": 0.0}
    assert r.data["allowlisted"] is False
    list_ip(dns_zone, "wl.bl.test", CLIENT, "127.0.10.3")
    r = await run_ip(dns_zone, policy(wl), health)
    assert symbols(r) == {"DNSWL_WL_HI": -5.0} and r.data["allowlisted"] is True


# -- failures and zone health ------------------------------------------------------------


async def test_timeout_is_temperror_without_listing(
    dns_zone: ZoneDNSServer, health: ZoneHealth, metrics: Metrics
) -> None:
    dns_zone.set_name_mode(ip_query_name(CLIENT, "zen.bl.test"), "timeout")
    r = await run_ip(dns_zone, policy(ZEN), health, resolver=resolver_for(dns_zone, 0.5))
    assert r.result == "temperror"
    assert symbols(r) == {"DNSBL_TEMPERROR": 0.0}
    assert r.decision is None
    assert r.data["errors"] == ["zen.bl.test"]
    assert counter(metrics, "errors", zone="zen.bl.test", reason="timeout") == 1
    assert health.healthy(ZEN)  # a timeout says nothing about the list


async def test_one_failing_zone_of_two_is_not_temperror(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    other = DNSBLZone("other.bl.test", 1.0)
    dns_zone.set_name_mode(ip_query_name(CLIENT, "zen.bl.test"), "servfail")
    r = await run_ip(dns_zone, policy(ZEN, other), health)
    assert r.result == "none" and r.data["errors"] == ["zen.bl.test"]


@pytest.mark.parametrize("answer", ["127.255.255.254", "10.0.0.1", "127.0.0.1"])
async def test_blocked_answer_is_no_listing_and_disables_the_zone(
    dns_zone: ZoneDNSServer,
    health: ZoneHealth,
    metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    list_ip(dns_zone, "zen.bl.test", CLIENT, answer)
    caplog.set_level(logging.WARNING, "mailgate.dnsbl")
    r = await run_ip(dns_zone, policy(ZEN), health, dry_run=True)
    assert (r.result, r.symbols, r.decision) == ("none", (), None)
    assert r.data["blocked"] == ["zen.bl.test"]
    assert not health.healthy(ZEN)
    assert gauge(metrics, "zen.bl.test") == 0.0
    assert counter(metrics, "errors", zone="zen.bl.test", reason="blocked") == 1
    assert counter(metrics, "hits", zone="zen.bl.test", label="SBL") == 0
    # the disabled zone is skipped: no query, noted in the data, logged once
    list_ip(dns_zone, "zen.bl.test", CLEAN, answer)
    r = await run_ip(dns_zone, policy(ZEN), health, ip=CLEAN, dry_run=True)
    assert r.data["skipped"] == ["zen.bl.test"]
    assert dns_zone.count(ip_query_name(CLEAN, "zen.bl.test")) == 0
    disabled = [rec for rec in caplog.records if "dnsbl_zone_disabled" in str(rec.__dict__)]
    assert len(disabled) == 1


async def test_recovery_after_probes_pass(
    dns_zone: ZoneDNSServer, health: ZoneHealth, metrics: Metrics
) -> None:
    resolver = resolver_for(dns_zone)
    for name in ("2.0.0.127.zen.bl.test", "1.0.0.127.zen.bl.test"):
        dns_zone.set_records(name, "A", ["127.255.255.254"])
    assert await probe(resolver, ZEN, health)
    assert gauge(metrics, "zen.bl.test") == 0.0
    # still refused: stays off
    assert await probe(resolver, ZEN, health)
    assert not health.healthy(ZEN)
    # the resolver is allowed again: 127.0.0.2 listed, 127.0.0.1 not
    dns_zone.remove("1.0.0.127.zen.bl.test")
    healthy_zone(dns_zone, "zen.bl.test")
    assert await probe(resolver, ZEN, health) == ""
    assert health.healthy(ZEN) and gauge(metrics, "zen.bl.test") == 1.0
    list_ip(dns_zone, "zen.bl.test", CLIENT, "127.0.0.2")
    r = await run_ip(dns_zone, policy(ZEN), health, resolver=resolver)
    assert symbols(r) == {"DNSBL_ZEN_SBL": 10.0}
    assert counter(metrics, "hits", zone="zen.bl.test", label="SBL") == 1


async def test_probe_disables_a_zone_listing_everything_and_ignores_timeouts(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    dns_zone.set_records("2.0.0.127.zen.bl.test", "A", ["127.0.0.2"])
    dns_zone.set_records("1.0.0.127.zen.bl.test", "A", ["127.0.0.2"])
    assert "never" in (await probe(resolver_for(dns_zone), ZEN, health) or "")
    dns_zone.set_mode("timeout")
    assert await probe(resolver_for(dns_zone, 0.3), ZEN, health) is None
    assert not health.healthy(ZEN)  # unchanged by an inconclusive probe
    dns_zone.set_mode("normal")
    dns_zone.remove("1.0.0.127.zen.bl.test")
    assert await probe(resolver_for(dns_zone), ZEN, health) == ""


# RFC 5782 5: the IPv6 test points, ::FFFF:7F00:2 and ::FFFF:7F00:1, as 32 nibbles.
V6_TEST = "2.0.0.0.0.0.f.7.f.f.f.f" + ".0" * 20
V6_NEVER = "1.0.0.0.0.0.f.7.f.f.f.f" + ".0" * 20


async def test_ipv6_only_zone_passes_its_own_test_entry(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    """An IPv6 list holds ::FFFF:7F00:2, not 127.0.0.2: the probe must not disable it
    (and must ask for it as nibbles, not as the IPv4 a mapped client becomes)."""
    v6 = DNSBLZone("v6.bl.test", 5.0)
    dns_zone.set_records(f"{V6_TEST}.v6.bl.test", "A", ["127.0.0.2"])
    assert await probe(resolver_for(dns_zone), v6, health) == ""
    assert health.healthy(v6)
    assert dns_zone.count(f"{V6_TEST}.v6.bl.test", "A") == 1
    # one that lists the IPv6 "never listed" entry matches everyone: disabled
    dns_zone.set_records(f"{V6_NEVER}.v6.bl.test", "A", ["127.0.0.2"])
    assert "never" in (await probe(resolver_for(dns_zone), v6, health) or "")
    # a zone with neither test entry is still dead
    dead = DNSBLZone("gone.bl.test", 5.0)
    assert "test entry" in (await probe(resolver_for(dns_zone), dead, health) or "")
    # a list with 127.0.0.2 is not asked for the IPv6 entries at all
    healthy_zone(dns_zone, "zen.bl.test")
    dns_zone.reset_counters()
    assert await probe(resolver_for(dns_zone), ZEN, health) == ""
    assert dns_zone.count(f"{V6_TEST}.zen.bl.test") == 0


async def test_live_blocked_answer_triggers_a_retest_that_recovers(
    dns_zone: ZoneDNSServer, metrics: Metrics
) -> None:
    now = [1000.0]
    health = ZoneHealth(metrics=metrics, clock=lambda: now[0])
    healthy_zone(dns_zone, "zen.bl.test")
    list_ip(dns_zone, "zen.bl.test", CLIENT, "127.255.255.255")
    await run_ip(dns_zone, policy(ZEN), health)
    assert not health.healthy(ZEN)
    await asyncio.sleep(0.2)  # the re-test started right away; its probes pass
    assert health.healthy(ZEN)
    assert gauge(metrics, "zen.bl.test") == 1.0


async def test_skipped_zone_is_retested_at_most_once_a_minute(
    dns_zone: ZoneDNSServer, metrics: Metrics
) -> None:
    now = [1000.0]
    health = ZoneHealth(metrics=metrics, clock=lambda: now[0])
    resolver = resolver_for(dns_zone)
    dns_zone.set_records("2.0.0.127.zen.bl.test", "A", ["127.255.255.254"])
    assert await probe(resolver, ZEN, health)
    dns_zone.reset_counters()
    healthy_zone(dns_zone, "zen.bl.test")
    await run_ip(dns_zone, policy(ZEN), health, resolver=resolver)
    await asyncio.sleep(0.1)
    assert dns_zone.count("2.0.0.127.zen.bl.test") == 0  # probed 0 s ago
    now[0] += 61
    await run_ip(dns_zone, policy(ZEN), health, resolver=resolver)
    await asyncio.sleep(0.2)
    assert dns_zone.count("2.0.0.127.zen.bl.test") == 1
    assert health.healthy(ZEN)


async def test_prober_loop_follows_the_policy(dns_zone: ZoneDNSServer, metrics: Metrics) -> None:
    health = ZoneHealth(metrics=metrics)
    healthy_zone(dns_zone, "zen.bl.test")
    dns_zone.set_records("2.0.0.127.dead.bl.test", "A", ["10.0.0.1"])
    dead = DNSBLZone("dead.bl.test", 1.0)
    current = [policy(ZEN, dead)]
    resolver = resolver_for(dns_zone)
    task = asyncio.create_task(run_prober(lambda: current[0], lambda: resolver, 0.05, health))
    try:
        await asyncio.sleep(0.3)
        assert health.healthy(ZEN) and not health.healthy(dead)
        assert gauge(metrics, "zen.bl.test") == 1.0 and gauge(metrics, "dead.bl.test") == 0.0
        current[0] = policy(ZEN)  # a reload drops the dead zone and its series
        first = health.state(ZEN).last_probe
        await asyncio.sleep(0.2)
        assert gauge(metrics, "dead.bl.test") is None
        assert health.state(ZEN).last_probe != first  # still probing, round after round
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- probes ask the server, not the cache -------------------------------------------------

PROBE = "2.0.0.127.zen.bl.test"
HOUR = 3600


def answer_for_an_hour(server: ZoneDNSServer, name: str, address: str) -> None:
    """Replace the A answer of ``name`` with one a cache would keep for an hour."""
    server.remove(name, "A")
    server.add(name, "A", address, ttl=HOUR)


async def until(condition: Callable[[], bool], limit: float = 3.0) -> bool:
    """Poll ``condition`` until it holds or ``limit`` seconds pass (a prober round's wait)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_probe_recovers_at_once_although_the_refusal_had_a_long_ttl(
    dns_zone: ZoneDNSServer, health: ZoneHealth, metrics: Metrics
) -> None:
    resolver = resolver_for(dns_zone)
    answer_for_an_hour(dns_zone, PROBE, "127.255.255.254")
    assert await probe(resolver, ZEN, health)
    assert not health.healthy(ZEN) and gauge(metrics, "zen.bl.test") == 0.0
    # the resolver is allowed again; its refusal would sit in a cache for an hour
    answer_for_an_hour(dns_zone, PROBE, "127.0.0.2")
    assert await probe(resolver, ZEN, health) == ""
    assert health.healthy(ZEN) and gauge(metrics, "zen.bl.test") == 1.0
    assert dns_zone.count(PROBE, "A") == 2


async def test_probe_sees_a_refusing_resolver_behind_a_good_answer_with_a_long_ttl(
    dns_zone: ZoneDNSServer,
    health: ZoneHealth,
    metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = resolver_for(dns_zone, timeout=0.5)
    answer_for_an_hour(dns_zone, PROBE, "127.0.0.2")
    assert await probe(resolver, ZEN, health) == ""
    # the server starts refusing: the probe says "unknown" and counts it, not "fine"
    dns_zone.set_name_mode(PROBE, "refused")
    assert await probe(resolver, ZEN, health) is None
    assert counter(metrics, "errors", zone="zen.bl.test", reason="error") == 1
    assert health.healthy(ZEN)  # a failed lookup still says nothing about the list
    # the list refuses this resolver: disabled now, not in an hour, and said loudly
    dns_zone.set_name_mode(PROBE, None)
    answer_for_an_hour(dns_zone, PROBE, "127.255.255.254")
    caplog.set_level(logging.WARNING, "mailgate.dnsbl")
    assert "blocked answer 127.255.255.254" in (await probe(resolver, ZEN, health) or "")
    assert not health.healthy(ZEN) and gauge(metrics, "zen.bl.test") == 0.0
    assert counter(metrics, "errors", zone="zen.bl.test", reason="blocked") == 1
    disabled = [rec for rec in caplog.records if "dnsbl_zone_disabled" in str(rec.__dict__)]
    assert len(disabled) == 1
    assert dns_zone.count(PROBE, "A") == 3


async def test_checks_retest_asks_the_server_and_client_lookups_stay_cached(
    dns_zone: ZoneDNSServer, metrics: Metrics
) -> None:
    now = [1000.0]
    health = ZoneHealth(metrics=metrics, clock=lambda: now[0])
    resolver = resolver_for(dns_zone)
    answer_for_an_hour(dns_zone, PROBE, "127.255.255.254")
    assert await probe(resolver, ZEN, health)
    answer_for_an_hour(dns_zone, PROBE, "127.0.0.2")
    list_ip(dns_zone, "zen.bl.test", CLIENT, "127.0.0.2")
    now[0] += 61  # the re-test is due: the first client's lookup starts it
    r = await run_ip(dns_zone, policy(ZEN), health, resolver=resolver)
    assert r.data["skipped"] == ["zen.bl.test"]
    assert await until(lambda: health.healthy(ZEN))
    assert dns_zone.count(PROBE, "A") == 2
    # a client's lookup still goes through the cache: asked once for two connections
    for _ in range(2):
        r = await run_ip(dns_zone, policy(ZEN), health, resolver=resolver)
        assert symbols(r) == {"DNSBL_ZEN_SBL": 10.0}
    assert dns_zone.count(ip_query_name(CLIENT, "zen.bl.test"), "A") == 1


async def test_a_clients_refused_lookup_is_not_kept_to_disable_the_zone_again(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    """A blocked answer to a client's lookup disables the zone but is not cached: once
    the probes find the resolver allowed again, that client's next connection asks
    again and gets its real listing, instead of disabling the zone from an old refusal."""
    resolver = resolver_for(dns_zone)
    client_name = ip_query_name(CLIENT, "zen.bl.test")
    answer_for_an_hour(dns_zone, client_name, "127.255.255.254")
    r = await run_ip(dns_zone, policy(ZEN), health, resolver=resolver)
    assert r.data["blocked"] == ["zen.bl.test"] and not health.healthy(ZEN)
    # the resolver is allowed again, and the probe says so
    answer_for_an_hour(dns_zone, client_name, "127.0.0.2")
    answer_for_an_hour(dns_zone, PROBE, "127.0.0.2")
    assert await probe(resolver, ZEN, health) == ""
    r = await run_ip(dns_zone, policy(ZEN), health, resolver=resolver)
    assert health.healthy(ZEN), r.data
    assert symbols(r) == {"DNSBL_ZEN_SBL": 10.0}
    assert dns_zone.count(client_name, "A") == 2


async def test_prober_follows_the_zone_both_ways_despite_long_ttls(
    dns_zone: ZoneDNSServer, health: ZoneHealth, metrics: Metrics
) -> None:
    resolver = resolver_for(dns_zone)
    answer_for_an_hour(dns_zone, PROBE, "127.0.0.2")
    task = asyncio.create_task(run_prober(lambda: policy(ZEN), lambda: resolver, 0.05, health))
    try:
        assert await until(lambda: health.state(ZEN).last_probe is not None)
        assert await until(lambda: dns_zone.count(PROBE, "A") >= 2)  # every round asks
        assert health.healthy(ZEN)
        answer_for_an_hour(dns_zone, PROBE, "127.255.255.254")
        assert await until(lambda: not health.healthy(ZEN))
        answer_for_an_hour(dns_zone, PROBE, "127.0.0.2")
        assert await until(lambda: health.healthy(ZEN))
        assert gauge(metrics, "zen.bl.test") == 1.0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- domain zones ------------------------------------------------------------------------

DBL = DNSBLZone("dbl.bl.test", 4.0, type="domain", codes=(DNSBLCode("127.0.1.2", "SPAM", 5.0),))


async def test_domain_zone_on_helo_and_sender_domain(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    dns_zone.set_records("bad-helo.example.dbl.bl.test", "A", ["127.0.1.2"])
    r = await run_domain(dns_zone, policy(DBL), health, "bad-helo.example", "a@fine.example")
    assert (r.result, symbols(r), r.decision) == ("fail", {"DNSBL_DBL_SPAM": 5.0}, None)
    assert r.data["listed"] == [
        {
            "zone": "dbl.bl.test",
            "code": "127.0.1.2",
            "label": "SPAM",
            "score": 5.0,
            "subject": "helo",
        }
    ]
    dns_zone.set_records("spammer.example.dbl.bl.test", "A", ["127.0.1.9"])
    r = await run_domain(dns_zone, policy(DBL), health, "[192.0.2.10]", "x@Spammer.Example")
    assert symbols(r) == {"DNSBL_DBL": 4.0}
    assert r.data["listed"][0]["subject"] == "mail_from"  # type: ignore[index]
    # the null sender and an address-literal HELO: nothing to look up
    r = await run_domain(dns_zone, policy(DBL), health, "[192.0.2.10]", "")
    assert r.result == "none"
    # a HELO equal to the sender domain is asked once
    dns_zone.reset_counters()
    await run_domain(dns_zone, policy(DBL), health, "same.example", "a@same.example")
    assert dns_zone.count("same.example.dbl.bl.test") == 1


async def test_domain_reject_and_combined_threshold(
    dns_zone: ZoneDNSServer, health: ZoneHealth
) -> None:
    dns_zone.set_records("spammer.example.dbl.bl.test", "A", ["127.0.1.2"])
    hard = dataclasses.replace(DBL, reject=True)
    r = await run_domain(dns_zone, policy(hard), health, "mx.fine.example", "a@spammer.example")
    assert r.decision is not None and r.decision.reply is replies.REJECT_DNSBL
    assert r.decision.reason == "mail_from domain listed in dbl.bl.test (SPAM)"
    # 5 (domain) + 3 (client, from the connect-time result) reaches 8
    soft_ip = DNSBLZone("soft.bl.test", 3.0)
    list_ip(dns_zone, "soft.bl.test", CLIENT, "127.0.0.2")
    pol = policy(soft_ip, DBL, threshold=8.0)
    prior = await run_ip(dns_zone, pol, health)
    assert prior.decision is None
    r = await run_domain(dns_zone, pol, health, "mx.fine.example", "a@spammer.example", prior)
    assert r.decision is not None
    # the reason names the client's zone too, whose listing is part of the sum
    assert r.decision.reason == "DNSBL score 8 >= threshold 8 (dbl.bl.test, soft.bl.test)"
    assert r.decision.sum_of == ("DNSBL_DBL_SPAM", "DNSBL_SOFT")
    # a listing on a reject zone decides by itself: nothing to re-judge
    r = await run_domain(dns_zone, policy(hard), health, "mx.fine.example", "a@spammer.example")
    assert r.decision is not None and r.decision.sum_of == ()


async def test_domain_zone_refusing_both_names_is_reported_once(
    dns_zone: ZoneDNSServer, health: ZoneHealth, metrics: Metrics
) -> None:
    dns_zone.set_records("helo.example.dbl.bl.test", "A", ["127.255.255.254"])
    dns_zone.set_records("sender.example.dbl.bl.test", "A", ["127.255.255.254"])
    r = await run_domain(dns_zone, policy(DBL), health, "helo.example", "a@sender.example")
    assert (r.result, r.symbols, r.decision) == ("none", (), None)
    assert r.data["blocked"] == ["dbl.bl.test"]
    assert not health.healthy(DBL)


# -- access keys, the pipeline, the verdict ----------------------------------------------


async def test_reply_and_logs_never_show_the_access_key(
    dns_zone: ZoneDNSServer, health: ZoneHealth, caplog: pytest.LogCaptureFixture
) -> None:
    zone = DNSBLZone(f"{KEY}.zen.dq.bl.test", 10.0, True)
    list_ip(dns_zone, zone.zone, CLIENT, "127.0.0.2")
    list_ip(dns_zone, zone.zone, CLEAN, "127.255.255.252")  # Spamhaus: bad key
    caplog.set_level(logging.DEBUG)
    listed = await run_ip(dns_zone, policy(zone), health)
    blocked = await run_ip(dns_zone, policy(zone), health, ip=CLEAN, dry_run=True)
    assert listed.decision is not None and listed.decision.reply is not None
    reply = listed.decision.reply.to_bytes().decode()
    assert reply == "554 5.7.1 Service unavailable; client host blocked\r\n"
    assert "bl.test" not in reply
    shown = repr([listed, blocked]) + caplog.text
    assert KEY not in shown
    assert "***.zen.dq.bl.test" in shown
    assert symbols(listed) == {"DNSBL_ZEN": 10.0}


async def test_a_zone_key_is_queried_and_never_shown(
    dns_zone: ZoneDNSServer, health: ZoneHealth, caplog: pytest.LogCaptureFixture
) -> None:
    """``key`` goes in front of the zone in queries only, whatever it looks like (a
    short key would not be recognised inside ``zone``)."""
    short_key = "s3cr3t-ab12"
    zone = DNSBLZone("zen2.dq.bl.test", 10.0, False, key=short_key)
    list_ip(dns_zone, f"{short_key}.zen2.dq.bl.test", CLIENT, "127.0.0.2")
    caplog.set_level(logging.DEBUG)
    dns_zone.reset_counters()
    listed = await run_ip(dns_zone, policy(zone), health)
    assert symbols(listed) == {"DNSBL_ZEN2": 10.0}
    assert dns_zone.count(f"10.2.0.192.{short_key}.zen2.dq.bl.test", "A") == 1
    shown = repr(listed) + caplog.text
    assert short_key not in shown and "zen2.dq.bl.test" in shown


async def test_pipeline_connect_result_rejects_at_rcpt(
    dns_zone: ZoneDNSServer, health: ZoneHealth, metrics: Metrics
) -> None:
    list_ip(dns_zone, "zen.bl.test", CLIENT, "127.0.0.2")
    pol = policy(ZEN)
    pipeline = Pipeline([DNSBLCheck(health), DNSBLDomainCheck(health)], 5.0, metrics)
    ctx = Context(
        client=ClientInfo(ip=CLIENT, port=25000, session_id="S1", helo="mx.example.org"),
        policy=pol,
        results={},
        resolver=resolver_for(dns_zone),
    )
    connect = await pipeline.run(Stage.CONNECT, ctx)
    ctx.envelope = Envelope(mail_from="a@example.org")
    mail = await pipeline.run(Stage.MAIL, ctx)
    verdict = decide([*connect, *mail], pol, Stage.RCPT)
    assert verdict.action is Action.REJECT
    assert verdict.reply is replies.REJECT_DNSBL
    assert [r.result for r in mail] == ["none"]  # no domain zones configured
    labels = {"check": "dnsbl", "result": "fail"}
    assert metrics.registry.get_sample_value("mailgate_check_results_total", labels) == 1


async def test_disabled_and_without_resolver(dns_zone: ZoneDNSServer, health: ZoneHealth) -> None:
    off = dataclasses.replace(policy(ZEN), dnsbl=DNSBLPolicy(enabled=False))
    r = await run_ip(dns_zone, off, health)
    assert (r.result, r.symbols) == ("none", ())
    ctx = Context(client=ClientInfo(ip=CLIENT, port=1, session_id="S"), policy=policy(ZEN))
    r = await DNSBLCheck(health).run(ctx)
    assert r.result == "temperror" and symbols(r) == {"DNSBL_TEMPERROR": 0.0}


def test_bind_metrics_reaches_the_shared_health(metrics: Metrics) -> None:
    before = HEALTH.metrics
    try:
        bind_metrics(metrics)
        assert HEALTH.metrics is metrics
    finally:
        HEALTH.metrics = before
