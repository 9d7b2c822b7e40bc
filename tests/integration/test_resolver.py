"""The DNS layer against a real authoritative server on loopback (tests/rig/dnsserver.py).

Real UDP/TCP, real truncation and real timeouts: the behaviours every check relies on
(NXDOMAIN vs NODATA vs temporary error, caching, de-duplication) are proven on the
wire, not against a mock of dnspython.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from filter.metrics import Metrics
from filter.resolver import DNSResult, DNSTempError, Resolver
from filter.units import Address
from tests.rig.dnsserver import SOA, ZoneDNSServer


class FakeClock:
    """Monotonic clock the test moves by hand, for TTL expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(zone: ZoneDNSServer, **kw: object) -> Resolver:
    return Resolver([Address(zone.host, zone.port)], **kw)  # type: ignore[arg-type]


# -- answers ---------------------------------------------------------------------------------
async def test_record_types(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("host.example.test", "A", "192.0.2.7")
    dns_zone.add("host.example.test", "AAAA", "2001:db8::7")
    dns_zone.add("host.example.test", "TXT", "v=spf1 -all")
    dns_zone.add("host.example.test", "MX", "20 MX2.Example.Test")
    dns_zone.add("host.example.test", "MX", "10 mx1.example.test")
    dns_zone.add("7.2.0.192.in-addr.arpa", "PTR", "Host.Example.Test")
    r = make(dns_zone)

    a = await r.resolve("host.example.test", "A")
    assert a.outcome == "ok"
    assert a.data == ("192.0.2.7",)
    assert a.name == "host.example.test"
    assert a.rtype == "A"
    assert 0 < a.ttl <= 60
    assert await r.addresses("host.example.test") == ["192.0.2.7"]
    assert await r.addresses("host.example.test", "AAAA") == ["2001:db8::7"]
    assert (await r.resolve("host.example.test", "txt")).data == ((b"v=spf1 -all",),)
    assert await r.txt("host.example.test") == [b"v=spf1 -all"]
    assert await r.mx("host.example.test") == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert await r.ptr("192.0.2.7") == ["host.example.test"]


async def test_ipv6_ptr_and_trailing_dot_and_case(dns_zone: ZoneDNSServer) -> None:
    rev = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    dns_zone.add(rev, "PTR", "v6.example.test")
    dns_zone.add("case.example.test", "A", "192.0.2.8")
    r = make(dns_zone)
    assert await r.ptr("2001:db8::7") == ["v6.example.test"]
    assert (await r.resolve("CASE.Example.TEST.", "A")).data == ("192.0.2.8",)
    assert (await r.resolve("case.example.test", "A")).data == ("192.0.2.8",)
    assert dns_zone.count("case.example.test", "A") == 1  # one cache entry for all spellings


async def test_multi_string_txt_joined(dns_zone: ZoneDNSServer) -> None:
    value = "k=rsa; p=" + "A" * 300  # two character-strings on the wire
    dns_zone.add("sel._domainkey.example.test", "TXT", value)
    r = make(dns_zone)
    res = await r.resolve("sel._domainkey.example.test", "TXT")
    (strings,) = res.data
    assert isinstance(strings, tuple)
    assert len(strings) == 2
    assert await r.txt("sel._domainkey.example.test") == [value.encode()]


async def test_cname_chain(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("alias.example.test", "CNAME", "target.example.test", ttl=30)
    dns_zone.add("target.example.test", "A", "192.0.2.9", ttl=300)
    r = make(dns_zone)
    res = await r.resolve("alias.example.test", "A")
    assert res.outcome == "ok"
    assert res.data == ("192.0.2.9",)
    assert res.name == "alias.example.test"
    assert res.ttl <= 30  # the chain's smallest TTL


async def test_nxdomain_vs_nodata(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("only-a.example.test", "A", "192.0.2.1")
    r = make(dns_zone)
    nx = await r.resolve("missing.example.test", "TXT")
    assert nx.outcome == "nxdomain"
    assert nx.data == ()
    nodata = await r.resolve("only-a.example.test", "TXT")
    assert nodata.outcome == "nodata"
    # empty non-terminal: exists (NODATA), not NXDOMAIN
    dns_zone.add("a.b.ent.example.test", "A", "192.0.2.2")
    assert (await r.resolve("b.ent.example.test", "A")).outcome == "nodata"
    assert await r.txt("missing.example.test") == []
    assert await r.addresses("only-a.example.test", "AAAA") == []
    assert await r.mx("missing.example.test") == []
    assert await r.ptr("192.0.2.200") == []


async def test_truncated_udp_falls_back_to_tcp(dns_zone: ZoneDNSServer) -> None:
    big = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(1, 200)) + " -all"
    assert len(big) > 2000  # beyond the 1232-byte EDNS payload we advertise
    dns_zone.add("big.example.test", "TXT", big)
    r = make(dns_zone)
    assert await r.txt("big.example.test") == [big.encode()]
    protocols = [p for n, t, p in dns_zone.query_log() if n == "big.example.test"]
    assert protocols == ["udp", "tcp"]


async def test_medium_answer_fits_edns_payload(dns_zone: ZoneDNSServer) -> None:
    """Over 512 bytes but under 1232: EDNS0 saves the TCP round trip."""
    value = "x" * 800
    dns_zone.add("medium.example.test", "TXT", value)
    r = make(dns_zone)
    assert await r.txt("medium.example.test") == [value.encode()]
    protocols = [p for n, t, p in dns_zone.query_log() if n == "medium.example.test"]
    assert protocols == ["udp"]


# -- temporary errors ------------------------------------------------------------------------
async def test_timeout_is_temp_error_quickly_and_not_cached(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("slow.example.test", "A", "192.0.2.3")
    dns_zone.set_mode("timeout")
    r = make(dns_zone, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DNSTempError) as ei:
        await r.resolve("slow.example.test", "A")
    elapsed = time.monotonic() - t0
    assert ei.value.reason == "timeout"
    assert ei.value.name == "slow.example.test"
    assert ei.value.rtype == "A"
    assert 0.4 < elapsed < 1.5  # the 0.5 s lifetime, not dnspython's 5 s default
    assert dns_zone.count("slow.example.test", "A") >= 2  # retried within the lifetime
    assert len(r.cache) == 0
    dns_zone.set_mode("normal")
    assert (await r.resolve("slow.example.test", "A")).data == ("192.0.2.3",)


async def test_a_resolver_slower_than_a_try_but_inside_the_budget_answers(
    dns_zone: ZoneDNSServer,
) -> None:
    """Every try has its own socket: with a third of the budget per try, a resolver
    answering in 0.4 s of a 1 s budget never got through (nor 1.1 s of 3 s)."""
    dns_zone.add("sluggish.example.test", "A", "192.0.2.4")
    dns_zone.set_delay(0.4)
    r = make(dns_zone, timeout=1.0)
    assert (await r.resolve("sluggish.example.test", "A")).data == ("192.0.2.4",)


async def test_the_budget_bounds_the_whole_lookup(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_mode("timeout")
    r = make(dns_zone, timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(DNSTempError):
        await r.resolve("never.example.test", "A")
    assert time.monotonic() - t0 < 1.1  # was up to 1.4 s


@pytest.mark.parametrize("mode", ["servfail", "refused"])
async def test_servfail_and_refused_are_temp_errors(dns_zone: ZoneDNSServer, mode: str) -> None:
    dns_zone.set_name_mode("broken.example.test", mode)  # type: ignore[arg-type]
    r = make(dns_zone)
    t0 = time.monotonic()
    with pytest.raises(DNSTempError) as ei:
        await r.resolve("broken.example.test", "TXT")
    assert ei.value.reason == mode
    assert time.monotonic() - t0 < 1.5  # an answer, not a wait for the 3 s lifetime
    assert len(r.cache) == 0
    assert (await r.resolve("missing.example.test", "TXT")).outcome == "nxdomain"


async def test_unreachable_server_is_temp_error() -> None:
    r = Resolver([Address("127.0.0.1", 9)], timeout=0.3)  # discard port: nobody answers
    with pytest.raises(DNSTempError):
        await r.resolve("example.test", "A")


async def test_invalid_names_raise_value_error(dns_zone: ZoneDNSServer) -> None:
    r = make(dns_zone)
    for bad in ["", ".", "a..b.test", "x" * 64 + ".test", "has space.test", "☃.test"]:
        with pytest.raises(ValueError):
            await r.resolve(bad, "A")
    with pytest.raises(ValueError):
        await r.resolve("example.test", "NOPE")
    with pytest.raises(ValueError):
        await r.resolve("example.test", "ANY")
    with pytest.raises(ValueError):
        await r.ptr("not-an-ip")
    assert dns_zone.count() == 0


async def test_idna_name(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("xn--bcher-kva.example.test", "A", "192.0.2.4")
    r = make(dns_zone)
    res = await r.resolve("Bücher.example.test", "A")
    assert res.name == "xn--bcher-kva.example.test"
    assert res.data == ("192.0.2.4",)
    assert await r.addresses("bücher。example.test") == ["192.0.2.4"]  # ideographic full stop
    assert dns_zone.count("xn--bcher-kva.example.test", "A") == 1


# -- cache -----------------------------------------------------------------------------------
async def test_cache_honours_positive_ttl(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("short.example.test", "A", "192.0.2.10", ttl=1)
    r = make(dns_zone)
    assert await r.addresses("short.example.test") == ["192.0.2.10"]
    dns_zone.set_records("short.example.test", "A", ["192.0.2.11"])
    assert await r.addresses("short.example.test") == ["192.0.2.10"]  # cached
    assert dns_zone.count("short.example.test", "A") == 1
    await asyncio.sleep(1.1)
    assert await r.addresses("short.example.test") == ["192.0.2.11"]
    assert dns_zone.count("short.example.test", "A") == 2


async def test_cached_ttl_counts_down(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("ttl.example.test", "A", "192.0.2.12", ttl=100)
    clock = FakeClock()
    r = make(dns_zone, clock=clock)
    assert (await r.resolve("ttl.example.test")).ttl == 100
    clock.now += 40
    assert (await r.resolve("ttl.example.test")).ttl == 60
    clock.now += 60
    assert (await r.resolve("ttl.example.test")).ttl == 100  # expired, asked again
    assert dns_zone.count("ttl.example.test", "A") == 2


async def test_negative_ttl_from_soa_minimum(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add(
        "neg.test", "SOA", SOA("ns.neg.test", "hm.neg.test", (1, 3600, 600, 86400, 30)), ttl=600
    )
    clock = FakeClock()
    r = make(dns_zone, clock=clock)
    nx = await r.resolve("later.neg.test", "A")
    assert nx.outcome == "nxdomain"
    assert nx.ttl == 30  # min(SOA TTL 600, minimum 30)
    dns_zone.add("later.neg.test", "A", "192.0.2.13")
    clock.now += 29
    assert (await r.resolve("later.neg.test", "A")).outcome == "nxdomain"  # cached
    assert (await r.resolve("later.neg.test", "TXT")).outcome == "nodata"  # other key
    clock.now += 2
    assert (await r.resolve("later.neg.test", "A")).data == ("192.0.2.13",)
    assert dns_zone.count("later.neg.test", "A") == 2


async def test_negative_ttl_soa_ttl_smaller_than_minimum(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add(
        "neg2.test", "SOA", SOA("ns.neg2.test", "hm.neg2.test", (1, 3600, 600, 86400, 900)), ttl=45
    )
    dns_zone.add("a.neg2.test", "A", "192.0.2.14")
    r = make(dns_zone)
    assert (await r.resolve("a.neg2.test", "TXT")).ttl == 45  # NODATA, min(45, 900)


async def test_negative_ttl_default_without_soa(dns_zone: ZoneDNSServer) -> None:
    r = make(dns_zone)
    res = await r.resolve("nothing.invalid", "A")  # no zone of ours: NXDOMAIN, no SOA
    assert res.outcome == "nxdomain"
    assert res.ttl == 60


async def test_lru_bound(dns_zone: ZoneDNSServer) -> None:
    for i in range(4):
        dns_zone.add(f"h{i}.example.test", "A", f"192.0.2.{20 + i}")
    r = make(dns_zone, cache_size=2)
    await r.resolve("h0.example.test")
    await r.resolve("h1.example.test")
    await r.resolve("h0.example.test")  # h0 now most recently used
    await r.resolve("h2.example.test")  # evicts h1
    assert len(r.cache) == 2
    await r.resolve("h0.example.test")
    assert dns_zone.count("h0.example.test", "A") == 1
    await r.resolve("h1.example.test")
    assert dns_zone.count("h1.example.test", "A") == 2


async def test_cache_disabled(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("nc.example.test", "A", "192.0.2.30")
    r = make(dns_zone, cache_size=0)
    await r.resolve("nc.example.test")
    await r.resolve("nc.example.test")
    assert dns_zone.count("nc.example.test", "A") == 2


async def test_clear_cache(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("cc.example.test", "A", "192.0.2.31")
    r = make(dns_zone)
    await r.resolve("cc.example.test")
    r.clear_cache()
    await r.resolve("cc.example.test")
    assert dns_zone.count("cc.example.test", "A") == 2


async def test_peek_answers_only_from_the_cache(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("pk.example.test", "A", "192.0.2.41")
    r = make(dns_zone)
    assert r.peek("pk.example.test") is None  # never asks the network
    assert dns_zone.count("pk.example.test") == 0
    await r.resolve("pk.example.test")
    hit = r.peek("PK.Example.Test.", "a")
    assert hit is not None and hit.data == ("192.0.2.41",)
    assert r.peek("bad name.example.test") is None  # resolve() says why, peek() does not


async def test_fresh_lookup_asks_the_server_never_the_cache(dns_zone: ZoneDNSServer) -> None:
    """``fresh=True`` (DNSBL health probes) skips the cache read, whatever it holds."""
    dns_zone.add("fr.example.test", "A", "192.0.2.71", ttl=3600)
    r = make(dns_zone)
    assert (await r.resolve("fr.example.test")).data == ("192.0.2.71",)
    dns_zone.remove("fr.example.test", "A")
    dns_zone.add("fr.example.test", "A", "192.0.2.72", ttl=3600)
    assert (await r.resolve("fr.example.test")).data == ("192.0.2.71",)  # an hour cached
    assert dns_zone.count("fr.example.test", "A") == 1
    got = await r.resolve("FR.example.test.", fresh=True)
    assert (got.data, got.ttl) == (("192.0.2.72",), 3600)
    assert dns_zone.count("fr.example.test", "A") == 2
    # its answer, the newest there is, replaced the stale one for cached lookups
    assert (await r.resolve("fr.example.test")).data == ("192.0.2.72",)
    assert dns_zone.count("fr.example.test", "A") == 2
    # an entry the server never gave is not read either
    planted = DNSResult("fr.example.test", "A", "ok", ("192.0.2.99",), 3600)
    r.cache.put(("fr.example.test", "A"), planted)
    assert (await r.resolve("fr.example.test", fresh=True)).data == ("192.0.2.72",)
    assert dns_zone.count("fr.example.test", "A") == 3
    # a server that fails is a failure, not the cached answer; the cache keeps its entry
    dns_zone.set_name_mode("fr.example.test", "refused")
    with pytest.raises(DNSTempError) as err:
        await r.resolve("fr.example.test", fresh=True)
    assert err.value.reason == "refused"
    assert (await r.resolve("fr.example.test")).data == ("192.0.2.72",)
    assert dns_zone.count("fr.example.test", "A") == 4


async def test_resolve_many_asks_only_for_what_is_not_cached(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("m1.example.test", "A", "192.0.2.51")
    dns_zone.add("m2.example.test", "TXT", "two")
    r = make(dns_zone)
    await r.resolve("m1.example.test")
    out = await r.resolve_many(
        [("m1.example.test", "A"), ("m2.example.test", "TXT"), ("bad name.test", "A")]
    )
    assert isinstance(out[0], DNSResult) and out[0].data == ("192.0.2.51",)
    assert isinstance(out[1], DNSResult) and out[1].data == ((b"two",),)
    assert isinstance(out[2], ValueError)  # in place of its answer, the others unharmed
    assert dns_zone.count("m1.example.test", "A") == 1  # the cached one was not asked again
    again = await r.resolve_many([("m1.example.test", "A"), ("m2.example.test", "TXT")])
    assert [x.data for x in again if isinstance(x, DNSResult)] == [("192.0.2.51",), ((b"two",),)]
    assert dns_zone.count() == 2  # m1 once, m2 once: the second round was all cache


async def test_resolve_many_reports_temporary_errors_per_query(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("t1.example.test", "A", "192.0.2.61")
    r = make(dns_zone, timeout=0.3)
    await r.resolve("t1.example.test")
    dns_zone.set_mode("timeout")
    out = await r.resolve_many([("t1.example.test", "A"), ("t2.example.test", "A")])
    assert isinstance(out[0], DNSResult)  # cached: the outage does not touch it
    assert isinstance(out[1], DNSTempError) and out[1].reason == "timeout"
    out = await r.resolve_many([("t3.example.test", "A"), ("t4.example.test", "A")])
    assert all(isinstance(x, DNSTempError) for x in out)


# -- de-duplication --------------------------------------------------------------------------
@pytest.mark.both_loops
async def test_concurrent_identical_queries_collapse(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("popular.example.test", "TXT", "v=spf1 -all")
    dns_zone.set_delay(0.05)
    r = make(dns_zone)
    results = await asyncio.gather(*(r.resolve("popular.example.test", "TXT") for _ in range(50)))
    assert all(res == results[0] for res in results)
    assert dns_zone.count("popular.example.test", "TXT") == 1


async def test_shared_error_reaches_every_waiter(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_name_mode("sick.example.test", "servfail")
    dns_zone.set_delay(0.05)
    r = make(dns_zone)
    results = await asyncio.gather(
        *(r.resolve("sick.example.test", "A") for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(e, DNSTempError) and e.reason == "servfail" for e in results)
    assert dns_zone.count("sick.example.test", "A") == 1


async def test_cancelled_waiter_does_not_cancel_the_others(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("shared.example.test", "A", "192.0.2.40")
    dns_zone.set_delay(0.2)
    r = make(dns_zone)
    first = asyncio.create_task(r.resolve("shared.example.test"))
    others = [asyncio.create_task(r.resolve("shared.example.test")) for _ in range(3)]
    await asyncio.sleep(0.05)
    first.cancel()
    results = await asyncio.gather(*others)
    assert [res.data for res in results] == [("192.0.2.40",)] * 3
    assert first.cancelled()
    assert dns_zone.count("shared.example.test", "A") == 1
    # and the answer was cached despite the cancellation
    assert (await r.resolve("shared.example.test")).data == ("192.0.2.40",)
    assert dns_zone.count("shared.example.test", "A") == 1


async def test_all_waiters_cancelled_query_still_completes(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("orphan.example.test", "A", "192.0.2.41")
    dns_zone.set_delay(0.1)
    r = make(dns_zone)
    waiter = asyncio.create_task(r.resolve("orphan.example.test"))
    await asyncio.sleep(0.02)
    waiter.cancel()
    await asyncio.sleep(0.2)
    dns_zone.set_delay(0)
    assert (await r.resolve("orphan.example.test")).data == ("192.0.2.41",)
    assert dns_zone.count("orphan.example.test", "A") == 1


# -- blocking front end ----------------------------------------------------------------------
async def test_blocking_resolver_from_thread_shares_cache(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("thread.example.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_zone.add("thread.example.test", "A", "192.0.2.50")
    r = make(dns_zone)
    first = await r.resolve("thread.example.test", "TXT")
    blocking = r.blocking(asyncio.get_running_loop())

    def in_thread() -> tuple[DNSResult, list[bytes], list[str], str]:
        return (
            blocking.resolve("thread.example.test", "TXT"),
            blocking.txt("thread.example.test"),
            blocking.addresses("thread.example.test"),
            threading.current_thread().name,
        )

    res, txts, addrs, thread_name = await asyncio.to_thread(in_thread)
    assert thread_name != threading.current_thread().name
    assert res.data == first.data
    assert txts == [b"v=spf1 ip4:192.0.2.0/24 -all"]
    assert addrs == ["192.0.2.50"]
    assert dns_zone.count("thread.example.test", "TXT") == 1

    def errors() -> list[BaseException]:
        out: list[BaseException] = []
        for call in (lambda: blocking.mx("missing.example.test"), lambda: blocking.ptr("x")):
            try:
                out.append(AssertionError(call()))
            except (ValueError, DNSTempError) as e:
                out.append(e)
        return out

    mx_missing, bad_ip = await asyncio.to_thread(errors)
    assert isinstance(mx_missing, AssertionError)
    assert mx_missing.args == ([],)
    assert isinstance(bad_ip, ValueError)


async def test_blocking_resolver_refuses_the_loop_thread(dns_zone: ZoneDNSServer) -> None:
    r = make(dns_zone)
    blocking = r.blocking(asyncio.get_running_loop())
    with pytest.raises(RuntimeError):
        blocking.resolve("example.test", "MX")
    assert dns_zone.count() == 0


async def test_blocking_resolver_temp_error(dns_zone: ZoneDNSServer) -> None:
    dns_zone.set_mode("timeout")
    r = make(dns_zone, timeout=0.3)
    blocking = r.blocking(asyncio.get_running_loop())
    with pytest.raises(DNSTempError):
        await asyncio.to_thread(blocking.resolve, "example.test", "A")


# -- metrics ---------------------------------------------------------------------------------
async def test_metrics_observed_per_network_query(dns_zone: ZoneDNSServer) -> None:
    registry = CollectorRegistry()
    dns_zone.add("m.example.test", "TXT", "hello")
    dns_zone.set_name_mode("sf.example.test", "servfail")
    dns_zone.set_name_mode("to.example.test", "timeout")
    r = make(dns_zone, metrics=Metrics(registry=registry), timeout=0.3)

    def count(rtype: str, outcome: str) -> float | None:
        return registry.get_sample_value(
            "mailgate_dns_query_duration_seconds_count", {"rtype": rtype, "outcome": outcome}
        )

    await asyncio.gather(*(r.resolve("m.example.test", "TXT") for _ in range(5)))
    await r.resolve("m.example.test", "TXT")  # cache hit: not a query
    assert count("TXT", "ok") == 1
    await r.resolve("nx.example.test", "A")
    assert count("A", "nxdomain") == 1
    await r.resolve("m.example.test", "MX")
    assert count("MX", "nodata") == 1
    with pytest.raises(DNSTempError):
        await r.resolve("sf.example.test", "A")
    assert count("A", "servfail") == 1
    with pytest.raises(DNSTempError):
        await r.resolve("to.example.test", "AAAA")
    assert count("AAAA", "timeout") == 1
    total = registry.get_sample_value(
        "mailgate_dns_query_duration_seconds_sum", {"rtype": "AAAA", "outcome": "timeout"}
    )
    assert total is not None
    assert total >= 0.25
