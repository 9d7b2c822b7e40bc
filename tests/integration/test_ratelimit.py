"""Rate limits against the real Redis (the worker's test db, flushed per test), no mocks.

Time is the checks' injectable ``Context.clock`` where a window has to slide by
minutes; one test waits a real second with the default clock. Redis TTLs (real time)
are asserted on their own. The last tests drive a real Session with both checks in
its pipeline, to show where the answers land (a connection limit answers at RCPT).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from filter import replies
from filter.checks import Context
from filter.checks.ratelimit import RateLimitCheck, RateLimitConnectCheck
from filter.metrics import Metrics
from filter.model import ClientInfo, Envelope, Recipient, Stage
from filter.pipeline import Pipeline, after_upstream
from filter.policy.schema import Policy, policy_from_dict
from filter.replies import Reply
from filter.results import Action, CheckResult, Decision, Symbol
from filter.session import Session
from filter.store import Store
from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate
from tests.rig.client import smtp_client
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.ports import free_cluster_port
from tests.rig.redisserver import start_redis_server, stop_servers
from tests.rig.upstream import ScriptedUpstream

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_policy(redis_url: str, on_error: str = "accept", **ratelimit: Any) -> Policy:
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "on_error": on_error},
        "greylist": {"enabled": False},
        "ratelimit": {"enabled": True, **ratelimit},
    }
    policy, problems = policy_from_dict(data)
    assert policy is not None, problems
    return policy


def spf_pass(domain: str) -> CheckResult:
    return CheckResult(
        "spf", "pass", (Symbol("SPF_PASS", 0.0),), None, {"identity": "mailfrom", "domain": domain}
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


_sessions = itertools.count(1)


class Harness:
    """Builds CONNECT and RCPT contexts the way the session does."""

    def __init__(self, store: Store | None, policy: Policy, clock: Callable[[], float]) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock

    async def connect(
        self, ip: str = "192.0.2.10", session: str | None = None, dry_run: bool = False
    ) -> CheckResult:
        ctx = Context(
            client=ClientInfo(ip=ip, port=4000, session_id=session or f"S{next(_sessions)}"),
            policy=self.policy,
            clock=self.clock,
            dry_run=dry_run,
            store=self.store,
        )
        return await RateLimitConnectCheck().run(ctx)

    async def rcpt(
        self,
        ip: str = "192.0.2.10",
        mail_from: str = "alice@example.org",
        txn: Envelope | None = None,
        rcpt: str = "bob@example.test",
        results: Mapping[str, CheckResult] | None = None,
        dry_run: bool = False,
    ) -> CheckResult:
        """One RCPT of transaction ``txn`` (a new transaction when None).

        The session keeps one Envelope per transaction; so does a test that
        passes ``txn`` again (the check tells transactions apart by that object).
        """
        ctx = Context(
            client=ClientInfo(ip=ip, port=4000, session_id="S0"),
            policy=self.policy,
            results=dict(results or {}),
            envelope=txn or Envelope(mail_from=mail_from, message_id=f"T{next(_sessions)}.1"),
            recipient=Recipient(rcpt),
            clock=self.clock,
            dry_run=dry_run,
            store=self.store,
        )
        return await RateLimitCheck().run(ctx)


def txn(message_id: str, mail_from: str = "alice@example.org") -> Envelope:
    """One transaction, as the session's MAIL command makes it."""
    return Envelope(mail_from=mail_from, message_id=message_id)


def limited(r: CheckResult) -> bool:
    return r.decision is not None and r.decision.action is Action.TEMPFAIL


def symbols(r: CheckResult) -> list[str]:
    return [s.name for s in r.symbols]


def rl_keys(raw: redis.Redis) -> list[str]:
    return sorted(str(k) for k in raw.scan_iter("mailgate:rl:*"))


def pass_all(results: Iterable[CheckResult]) -> bool:
    return all(r.result == "pass" and r.decision is None for r in results)


# --- off by default, exemptions ------------------------------------------------------------


async def test_disabled_by_default_writes_no_keys(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    policy, problems = policy_from_dict({"redis": {"url": redis_url}})
    assert policy is not None, problems
    assert policy.ratelimit.enabled is False
    h = Harness(store, policy, clock)
    got = [await h.connect(), await h.rcpt()]
    assert [r.result for r in got] == ["none", "none"]
    assert [r.data["outcome"] for r in got] == ["disabled", "disabled"]
    assert raw.dbsize() == 0


async def test_enabled_without_limits_writes_no_keys(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url), clock)
    assert (await h.connect()).result == "none"
    assert (await h.rcpt()).result == "none"
    assert raw.dbsize() == 0


async def test_exempt_clients_are_not_counted(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    policy = make_policy(
        redis_url,
        connections_per_network=1,
        recipients_per_network=1,
        exempt_clients=["192.0.2.0/25"],
    )
    h = Harness(store, policy, clock)
    for _ in range(3):
        c, r = await h.connect("192.0.2.10"), await h.rcpt("192.0.2.10")
        assert (c.data["outcome"], r.data["outcome"]) == ("exempt", "exempt")
    assert raw.dbsize() == 0
    # The other half of the /24 is not exempt, and counts on the /24 as usual.
    assert (await h.connect("192.0.2.200")).result == "pass"
    assert limited(await h.connect("192.0.2.201"))


# --- limits -----------------------------------------------------------------------------


async def test_connection_limit_answers_451_470_on_the_next_one(
    store: Store, redis_url: str, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, connections_per_network=3), clock)
    assert pass_all([await h.connect() for _ in range(3)])
    r = await h.connect()
    assert limited(r) and r.result == "policy"
    assert r.decision is not None and r.decision.reply == replies.RATE_LIMITED
    assert str(r.decision.reply).startswith("451 4.7.0 ")
    assert symbols(r) == ["RATELIMIT_CONNECTIONS"]
    assert "connections from 192.0.2.0/24" in r.decision.reason
    assert r.data["counter"] == "connections_per_network" and r.data["limit"] == 3


async def test_connect_stage_rerun_for_one_session_counts_once(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, connections_per_network=2), clock)
    assert pass_all([await h.connect(session="SAME") for _ in range(5)])
    assert raw.zcard("mailgate:rl:c:192.0.2.0/24") == 1


async def test_message_limit_counts_transactions_not_recipients(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, messages_per_network=2), clock)
    # Transaction 1: three recipients, one message.
    first = txn("A.1")
    assert pass_all([await h.rcpt(txn=first, rcpt=f"u{i}@example.test") for i in range(3)])
    assert pass_all([await h.rcpt(txn=txn("A.2"))])
    r = await h.rcpt(txn=txn("A.3"))
    assert limited(r) and symbols(r) == ["RATELIMIT_MESSAGES"]
    # Recipients of a message already counted still pass.
    assert pass_all([await h.rcpt(txn=first, rcpt="late@example.test")])
    assert raw.zcard("mailgate:rl:m:net:192.0.2.0/24") == 2


async def test_recipient_limit(store: Store, redis_url: str, clock: Clock) -> None:
    h = Harness(store, make_policy(redis_url, recipients_per_network=3), clock)
    one = txn("B.1")
    assert pass_all([await h.rcpt(txn=one, rcpt=f"u{i}@example.test") for i in range(3)])
    r = await h.rcpt(txn=one, rcpt="u4@example.test")
    assert limited(r) and symbols(r) == ["RATELIMIT_RECIPIENTS"]
    assert r.decision is not None and r.decision.reply == replies.RATE_LIMITED
    assert r.data["counts"] == {"recipients_per_network": 3}


async def test_refused_events_use_no_quota_anywhere(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    """All-or-nothing: a recipient refused by one counter is not logged in the others."""
    policy = make_policy(redis_url, messages_per_network=100, recipients_per_network=2)
    h = Harness(store, policy, clock)
    one = txn("C.1")
    await h.rcpt(txn=one)
    await h.rcpt(txn=one)
    for i in range(5):
        assert limited(await h.rcpt(txn=txn(f"D.{i}")))
    assert raw.zcard("mailgate:rl:r:net:192.0.2.0/24") == 2
    assert raw.zcard("mailgate:rl:m:net:192.0.2.0/24") == 1


async def test_clients_of_one_network_share_a_limit_other_networks_do_not(
    store: Store, redis_url: str, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, recipients_per_network=2), clock)
    assert pass_all([await h.rcpt("192.0.2.1"), await h.rcpt("192.0.2.254")])
    assert limited(await h.rcpt("192.0.2.77"))
    assert limited(await h.rcpt("::ffff:192.0.2.78"))  # the same client, dual-stack spelling
    assert pass_all([await h.rcpt("198.51.100.1"), await h.rcpt("198.51.100.2")])
    # IPv6: the /64 is one client.
    assert pass_all([await h.rcpt("2001:db8::1"), await h.rcpt("2001:db8::ffff:1")])
    assert limited(await h.rcpt("2001:db8::2"))
    assert pass_all([await h.rcpt("2001:db8:0:1::1")])


async def test_prefixes_are_configurable(store: Store, redis_url: str, clock: Clock) -> None:
    policy = make_policy(redis_url, connections_per_network=1, ipv4_prefix=32)
    h = Harness(store, policy, clock)
    assert pass_all([await h.connect("192.0.2.1"), await h.connect("192.0.2.2")])
    assert limited(await h.connect("192.0.2.1"))


async def test_sender_domain_limit_across_networks_with_spf_pass(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, messages_per_sender_domain=2), clock)
    spf = {"spf": spf_pass("example.org")}
    assert pass_all(
        [await h.rcpt("192.0.2.1", results=spf), await h.rcpt("203.0.113.9", results=spf)]
    )
    r = await h.rcpt("198.51.100.1", "bob@EXAMPLE.org", results=spf)
    assert limited(r) and symbols(r) == ["RATELIMIT_MESSAGES"]
    assert "sender domain example.org" in str(r.data["reason"])
    assert r.data["counter"] == "messages_per_sender_domain"
    # Another domain has its own quota.
    assert pass_all([await h.rcpt("198.51.100.1", "x@example.net", results=spf)])
    assert raw.zcard("mailgate:rl:m:dom:example.org") == 2


async def test_forged_sender_domain_cannot_use_up_the_real_domains_quota(
    store: Store, redis_url: str, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, recipients_per_sender_domain=2), clock)
    # A bot claims example.org without SPF passing: limited per (domain, its network).
    assert pass_all([await h.rcpt("203.0.113.5"), await h.rcpt("203.0.113.6")])
    forged = await h.rcpt("203.0.113.7")
    assert limited(forged) and "from 203.0.113.0/24" in str(forged.data["reason"])
    # The real example.org (SPF pass) and unverified claims from elsewhere are untouched.
    assert pass_all([await h.rcpt("192.0.2.1", results={"spf": spf_pass("example.org")})])
    assert pass_all([await h.rcpt("198.51.100.1")])


async def test_null_sender_counts_per_network_only(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    policy = make_policy(redis_url, recipients_per_network=5, recipients_per_sender_domain=1)
    h = Harness(store, policy, clock)
    assert pass_all([await h.rcpt(mail_from="") for _ in range(3)])
    assert rl_keys(raw) == ["mailgate:rl:r:net:192.0.2.0/24"]


async def test_a_recipient_refused_anyway_is_counted_only_if_that_check_just_monitors(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    """Judged as the verdict judges: a greylist 451 in monitor mode lets the mail in."""
    greylisted = CheckResult(
        "greylist",
        "policy",
        (Symbol("GREYLIST_NEW", 0.0),),
        Decision(Action.GREYLIST, replies.GREYLISTED, "greylisted (new)"),
        {},
    )
    for mode, counted in (("enforce", 0), ("monitor", 1)):
        raw.flushdb()
        policy, problems = policy_from_dict(
            {
                "redis": {"url": redis_url},
                "greylist": {"enabled": True, "mode": mode},
                "ratelimit": {"enabled": True, "recipients_per_network": 5},
            }
        )
        assert policy is not None, problems
        r = await Harness(store, policy, clock).rcpt(results={"greylist": greylisted})
        assert r.decision is None
        assert r.data["outcome"] == ("skipped" if counted == 0 else "counted"), mode
        assert raw.zcard("mailgate:rl:r:net:192.0.2.0/24") == counted


def test_recipients_are_counted_after_the_upstream_and_greylisting() -> None:
    check = RateLimitCheck()
    assert after_upstream(check) and "greylist" in check.needs
    assert not after_upstream(RateLimitConnectCheck())


# --- the window ---------------------------------------------------------------------------


async def test_window_slides_with_the_clock(store: Store, redis_url: str, clock: Clock) -> None:
    h = Harness(store, make_policy(redis_url, connections_per_network=2, window="1m"), clock)
    assert pass_all([await h.connect()])
    clock.now += 20
    assert pass_all([await h.connect()])
    clock.now += 20
    r = await h.connect()
    assert limited(r)
    assert r.data["retry_after"] == pytest.approx(20.0)  # the first leaves at T0 + 60
    clock.now = T0 + 59.9
    assert limited(await h.connect())
    clock.now = T0 + 60.001  # the first one slid out; the second still counts
    assert pass_all([await h.connect()])
    assert limited(await h.connect())
    clock.now += 60
    assert pass_all([await h.connect(), await h.connect()])


async def test_a_message_admitted_once_is_not_counted_again_when_its_entry_slides_out(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    """A slow transaction outliving the window is still one message: its later
    recipients must neither count it a second time nor be refused for it."""
    h = Harness(store, make_policy(redis_url, messages_per_network=1, window="1m"), clock)
    slow = txn("F.1")
    assert pass_all([await h.rcpt(txn=slow, rcpt="a@example.test")])
    clock.now += 61  # F.1's entry slid out; another message takes the network's quota
    assert pass_all([await h.rcpt(txn=txn("F.2"))])
    clock.now += 1
    assert pass_all([await h.rcpt(txn=slow, rcpt="b@example.test")])
    assert raw.zcard("mailgate:rl:m:net:192.0.2.0/24") == 1
    assert limited(await h.rcpt(txn=txn("F.3")))


async def test_window_slides_in_real_time(store: Store, redis_url: str) -> None:
    policy = make_policy(redis_url, recipients_per_network=2, window="1s")
    h = Harness(store, policy, time.time)
    assert pass_all([await h.rcpt(), await h.rcpt()])
    assert limited(await h.rcpt())
    await asyncio.sleep(1.05)
    assert pass_all([await h.rcpt(), await h.rcpt()])
    assert limited(await h.rcpt())


async def test_every_key_has_a_ttl_of_the_window(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    policy = make_policy(
        redis_url,
        window="2m",
        connections_per_network=10,
        messages_per_network=10,
        recipients_per_network=10,
        messages_per_sender_domain=10,
        recipients_per_sender_domain=10,
    )
    h = Harness(store, policy, clock)
    await h.connect("2001:db8::1")
    await h.rcpt("2001:db8::1", results={"spf": spf_pass("example.org")})
    await h.rcpt("2001:db8::1", "x@example.net")
    keys = rl_keys(raw)
    assert keys == [
        "mailgate:rl:c:2001:db8::/64",
        "mailgate:rl:m:dom:example.org",
        "mailgate:rl:m:domnet:example.net|2001:db8::/64",
        "mailgate:rl:m:net:2001:db8::/64",
        "mailgate:rl:r:dom:example.org",
        "mailgate:rl:r:domnet:example.net|2001:db8::/64",
        "mailgate:rl:r:net:2001:db8::/64",
    ]
    for key in keys:
        assert 0 < raw.pttl(key) <= 120_000, key
        assert raw.type(key) == "zset"


# --- concurrency ----------------------------------------------------------------------------


async def test_concurrent_events_count_exactly(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, recipients_per_network=1000), clock)
    one = txn("E.1")
    results = await asyncio.gather(*(h.rcpt(txn=one) for _ in range(50)))
    assert pass_all(results)
    assert raw.zcard("mailgate:rl:r:net:192.0.2.0/24") == 50


async def test_concurrent_events_at_the_limit_admit_exactly_the_limit(
    redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    """Two instances (two pools) racing: the limit holds cluster-wide."""
    a, b = Store(redis_url), Store(redis_url)
    try:
        policy = make_policy(redis_url, connections_per_network=30)
        ha, hb = Harness(a, policy, clock), Harness(b, policy, clock)
        results = await asyncio.gather(*(h.connect() for h in (ha, hb) for _ in range(25)))
    finally:
        await a.aclose()
        await b.aclose()
    assert sum(1 for r in results if r.result == "pass") == 30
    assert sum(1 for r in results if limited(r)) == 20
    assert raw.zcard("mailgate:rl:c:192.0.2.0/24") == 30


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Redis Cluster owning every slot.

    One node is enough: Cluster refuses a script whose keys hash to different slots
    (CROSSSLOT) on a single node too. Its port must stay below 55536, since the
    cluster bus listens 10000 above it.
    """
    port = free_cluster_port()
    proc = start_redis_server(
        tmp_path_factory.mktemp("rlcluster"),
        *("--port", str(port), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
    )
    node = redis.Redis(port=port, socket_timeout=1, decode_responses=True)

    def cluster(*args: str) -> str:
        return str(node.execute_command("CLUSTER", *args))  # type: ignore[no-untyped-call]

    try:
        deadline = time.monotonic() + 10
        slots = False
        state = ""
        while "cluster_state:ok" not in state and time.monotonic() < deadline:
            try:
                if not slots:
                    cluster("ADDSLOTSRANGE", "0", "16383")
                    slots = True
                state = cluster("INFO")
            except redis.RedisError:
                pass
            time.sleep(0.05)
        assert "cluster_state:ok" in state, "the cluster node did not come up"
        yield f"redis+cluster://127.0.0.1:{port}"
    finally:
        node.close()
        stop_servers([proc])


async def test_cluster_keeps_every_counter_of_an_event_in_one_slot(
    cluster_url: str, clock: Clock
) -> None:
    """One script touches up to four keys: Cluster allows that only within a slot."""
    metrics = Metrics(CollectorRegistry())
    store = Store(cluster_url, f"t{time.monotonic_ns()}:", metrics=metrics)
    policy = make_policy(
        cluster_url,
        messages_per_network=10,
        recipients_per_network=2,
        messages_per_sender_domain=10,
        recipients_per_sender_domain=10,
    )
    try:
        h = Harness(store, policy, clock)
        spf = {"spf": spf_pass("example.org")}
        results = await asyncio.gather(*(h.rcpt(results=spf) for _ in range(5)))
    finally:
        await store.aclose()
    assert sum(1 for r in results if r.result == "pass") == 2
    assert all(symbols(r) == ["RATELIMIT_RECIPIENTS"] for r in results if limited(r))
    assert metrics.registry.get_sample_value("mailgate_store_errors_total") == 0


# --- dry run and store failures -------------------------------------------------------------


async def test_dry_run_reads_and_writes_nothing(
    store: Store, redis_url: str, raw: redis.Redis, clock: Clock
) -> None:
    policy = make_policy(redis_url, connections_per_network=1, recipients_per_network=1)
    h = Harness(store, policy, clock)
    dry = [await h.connect(dry_run=True), await h.rcpt(dry_run=True)]
    assert pass_all(dry) and [r.data["outcome"] for r in dry] == ["checked", "checked"]
    assert raw.dbsize() == 0
    await h.connect()
    await h.rcpt()
    before = {k: raw.zrange(k, 0, -1, withscores=True) for k in rl_keys(raw)}
    assert limited(await h.connect(dry_run=True))
    assert limited(await h.rcpt(dry_run=True))
    clock.now += 61  # expired members are skipped, not removed
    assert pass_all([await h.connect(dry_run=True), await h.rcpt(dry_run=True)])
    assert {k: raw.zrange(k, 0, -1, withscores=True) for k in rl_keys(raw)} == before


async def test_store_down_with_on_error_accept(metrics: Metrics, clock: Clock) -> None:
    down = Store("redis://127.0.0.1:1/0", metrics=metrics)
    policy = make_policy(
        "redis://127.0.0.1:1/0", connections_per_network=1, recipients_per_network=1
    )
    try:
        h = Harness(down, policy, clock)
        got = [await h.connect(), await h.rcpt()]
    finally:
        await down.aclose()
    for r in got:
        assert r.decision is None and r.result == "temperror"
        assert symbols(r) == ["RATELIMIT_STORE_ERROR"] and r.symbols[0].score == 0.0
    assert metrics.registry.get_sample_value("mailgate_store_errors_total") == 2


async def test_store_down_with_on_error_tempfail(metrics: Metrics, clock: Clock) -> None:
    down = Store("redis://127.0.0.1:1/0", metrics=metrics)
    policy = make_policy("redis://127.0.0.1:1/0", on_error="tempfail", recipients_per_network=1)
    try:
        r = await Harness(down, policy, clock).rcpt()
    finally:
        await down.aclose()
    assert r.decision is not None and r.decision.action is Action.TEMPFAIL
    assert r.decision.reply == replies.STORE_TEMPFAIL
    assert metrics.registry.get_sample_value("mailgate_store_errors_total") == 1


async def test_no_store_wired_follows_on_error(redis_url: str, clock: Clock) -> None:
    policy = make_policy(redis_url, on_error="tempfail", connections_per_network=1)
    r = await Harness(None, policy, clock).connect()
    assert r.decision is not None and r.decision.reply == replies.STORE_TEMPFAIL


# --- in a session ---------------------------------------------------------------------------


class OkUpstream:
    """An upstream that accepts everything (the session's UpstreamPort)."""

    in_transaction = False

    @property
    def is_open(self) -> bool:
        return True

    async def open(
        self, xclient: Mapping[str, str] | None, xforward: Mapping[str, str] | None
    ) -> None:
        return None

    async def mail(self, address: str, params: Iterable[str]) -> Reply:
        return replies.SENDER_OK

    async def rcpt(self, address: str, params: Iterable[str]) -> Reply:
        return replies.RECIPIENT_OK

    async def noop(self) -> Reply:
        return replies.OK

    async def data(self, chunks: Iterable[bytes]) -> Reply:
        return replies.OK

    async def rset(self) -> None:
        return None

    async def quit(self) -> None:
        return None

    def abort(self) -> None:
        return None


async def open_session(
    store: Store, policy: Policy, metrics: Metrics, ip: str = "192.0.2.10", sid: str = "S"
) -> Session:
    pipeline = Pipeline([RateLimitConnectCheck(), RateLimitCheck()], 5.0, metrics)
    assert pipeline.has_stage(Stage.CONNECT) and pipeline.has_stage(Stage.RCPT)
    client = ClientInfo(ip=ip, port=4000, session_id=sid)
    session = Session(client, policy, pipeline, OkUpstream, metrics, lambda: {}, store=store)
    # HELO runs the connect stage too when the front end has not started it.
    assert (await session.helo("EHLO", "client.example.org", False)).code == 250
    return session


async def test_session_over_its_connection_limit_is_refused_at_rcpt(
    store: Store, redis_url: str, raw: redis.Redis, metrics: Metrics
) -> None:
    policy = make_policy(redis_url, connections_per_network=1, recipients_per_network=10)
    first = await open_session(store, policy, metrics, sid="S1")
    second = await open_session(store, policy, metrics, sid="S2")
    assert (await second.mail("FROM:<alice@example.org>")).code == 250
    reply = await second.rcpt("TO:<bob@example.test>")
    assert str(reply).startswith("451 4.7.0 ")
    # Its recipients were not counted; the first session's mail goes through.
    assert not raw.exists("mailgate:rl:r:net:192.0.2.0/24")
    assert (await first.mail("FROM:<alice@example.org>")).code == 250
    assert (await first.rcpt("TO:<bob@example.test>")).code == 250


async def test_session_counts_one_message_per_transaction(
    store: Store, redis_url: str, raw: redis.Redis, metrics: Metrics
) -> None:
    policy = make_policy(redis_url, messages_per_network=2, recipients_per_network=100)
    s = await open_session(store, policy, metrics)
    for _ in range(2):
        assert (await s.mail("FROM:<alice@example.org>")).code == 250
        for i in range(3):
            assert (await s.rcpt(f"TO:<u{i}@example.test>")).code == 250
        await s.rset()
    assert (await s.mail("FROM:<alice@example.org>")).code == 250
    assert str(await s.rcpt("TO:<bob@example.test>")).startswith("451 4.7.0 ")
    assert raw.zcard("mailgate:rl:m:net:192.0.2.0/24") == 2
    assert raw.zcard("mailgate:rl:r:net:192.0.2.0/24") == 6


async def test_trusted_clients_are_never_counted(
    store: Store, redis_url: str, raw: redis.Redis, metrics: Metrics
) -> None:
    policy = make_policy(redis_url, connections_per_network=1, recipients_per_network=1)
    for sid in ("T1", "T2"):
        s = await open_session(store, policy, metrics, ip="127.0.0.1", sid=sid)
        assert (await s.mail("FROM:<alice@example.org>")).code == 250
        assert (await s.rcpt("TO:<bob@example.test>")).code == 250
        assert (await s.rcpt("TO:<carol@example.test>")).code == 250
    assert raw.dbsize() == 0


async def test_monitor_mode_only_records_what_would_have_been_refused(
    store: Store, redis_url: str, metrics: Metrics
) -> None:
    policy = make_policy(redis_url, mode="monitor", recipients_per_network=1)
    s = await open_session(store, policy, metrics)
    assert (await s.mail("FROM:<alice@example.org>")).code == 250
    assert (await s.rcpt("TO:<bob@example.test>")).code == 250
    assert (await s.rcpt("TO:<carol@example.test>")).code == 250  # would have been 451


async def test_outcomes_are_counted_in_metrics(
    store: Store, metrics: Metrics, redis_url: str, clock: Clock
) -> None:
    h = Harness(store, make_policy(redis_url, connections_per_network=2), clock)
    for _ in range(3):
        await h.connect()
    sample = metrics.registry.get_sample_value
    labels = {"limit": "connections_per_network"}
    assert sample("mailgate_ratelimit_total", {**labels, "result": "under"}) == 2
    assert sample("mailgate_ratelimit_total", {**labels, "result": "over"}) == 1


# --- a real mailgate process: what the client hears, what the store holds ------------------

UNKNOWN_USER = "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"


def _start_limited(
    mailgate: StartMailgate, extra: dict[str, Any] | None = None, **limits: Any
) -> MailgateProcess:
    policy = deep_merge(
        AUTH_CHECKS_OFF,
        {"dnsbl": {"enabled": False}, "ratelimit": {"enabled": True, **limits}},
    )
    return mailgate(deep_merge(policy, extra or {}))


def test_recipients_the_upstream_refused_use_no_quota(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str, raw: redis.Redis
) -> None:
    """An unknown user's 550 is the upstream's refusal: it is no recipient sent, and a
    transaction that never had an accepted recipient is no message sent."""
    upstream.script(rcpt={"nobody@example.test": UNKNOWN_USER})
    mg = _start_limited(mailgate, messages_per_network=1, recipients_per_network=2)
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.81") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        for _ in range(3):
            assert c.rcpt("nobody@example.test")[0] == 550
        c.rset()
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("nobody@example.test")[0] == 550
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 250
        code, text = c.rcpt("dave@example.test")
        assert code == 451 and text.startswith(b"4.7.0")
    assert raw.zcard("mailgate:rl:m:net:127.0.0.0/24") == 1
    assert raw.zcard("mailgate:rl:r:net:127.0.0.0/24") == 2


def test_greylisted_recipients_use_no_quota(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str, raw: redis.Redis
) -> None:
    """A greylisted recipient comes back after the delay: counting the 451 as well would
    charge the sender twice, and fill its quota with mail that never got in."""
    mg = _start_limited(
        mailgate, {"greylist": {"enabled": True, "delay": "1h"}}, recipients_per_network=2
    )
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.82") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        for i in range(4):
            code, text = c.rcpt(f"u{i}@example.test")
            assert code == 451 and text.startswith(b"4.7.1"), text  # greylisted, not limited
    assert not raw.exists("mailgate:rl:r:net:127.0.0.0/24")


def test_recipients_refused_by_a_block_list_use_no_quota(
    mailgate: StartMailgate,
    upstream: ScriptedUpstream,
    redis_url: str,
    raw: redis.Redis,
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "block-recipients.txt"
    blocked.write_text("spamtrap@example.test\n")
    mg = _start_limited(
        mailgate, {"lists": {"block_recipients": str(blocked)}}, recipients_per_network=1
    )
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.83") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        for _ in range(3):
            assert c.rcpt("spamtrap@example.test")[0] == 550
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
    assert raw.zcard("mailgate:rl:r:net:127.0.0.0/24") == 1


def test_allow_listed_client_uses_no_quota_of_its_network(
    mailgate: StartMailgate,
    upstream: ScriptedUpstream,
    redis_url: str,
    raw: redis.Redis,
    tmp_path: Path,
) -> None:
    """An enforced allow entry overrides the limit's 451 anyway: counting its mail would
    only defer the allow-listed host's neighbours in its network."""
    allowed = tmp_path / "allow-clients.txt"
    allowed.write_text("127.0.0.84\n")
    mg = _start_limited(
        mailgate, {"lists": {"allow_clients": str(allowed)}}, recipients_per_network=1
    )
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.84") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        for i in range(3):
            assert c.rcpt(f"u{i}@example.test")[0] == 250
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.85") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
    assert raw.zcard("mailgate:rl:r:net:127.0.0.0/24") == 1


def test_recipients_of_a_domain_with_ratelimit_off_use_no_quota(
    mailgate: StartMailgate, upstream: ScriptedUpstream, redis_url: str, raw: redis.Redis
) -> None:
    """``[domains."…"] checks = { ratelimit = "off" }``: the verdict ignores the check for
    that domain, so its recipients must not use up the quota of everyone else's mail."""
    mg = _start_limited(
        mailgate,
        {"domains": {"partner.example": {"checks": {"ratelimit": "off"}}}},
        messages_per_network=1,
        recipients_per_network=1,
    )
    with smtp_client("127.0.0.1", mg.smtp_port, source_ip="127.0.0.86") as c:
        c.ehlo("mail.example.org")
        assert c.mail("alice@example.org")[0] == 250
        for i in range(3):
            assert c.rcpt(f"u{i}@partner.example")[0] == 250
        c.rset()
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.rcpt("carol@example.test")[0] == 451
        assert c.rcpt("u9@partner.example")[0] == 250
    assert raw.zcard("mailgate:rl:m:net:127.0.0.0/24") == 1
    assert raw.zcard("mailgate:rl:r:net:127.0.0.0/24") == 1
