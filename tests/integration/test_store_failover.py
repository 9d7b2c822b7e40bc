"""Sentinel failover, for real: the Store against a master, a replica and a sentinel of
its own (``tests.rig.redisserver.start_sentinel_group``), with the master killed,
frozen (SIGSTOP: a host that stopped answering) or brought back from the dead.

What a Postfix admin needs from greylisting across a failover, and what each test
holds the Store and the greylist check to:

* nothing lost: a triplet recorded (and replicated) before the failover is still
  known after it, so its retry passes instead of being greylisted again;
* nothing forged: an unknown triplet is still greylisted after the failover;
* a dead Redis never silently opens or drops: while there is no master every check
  follows ``redis.on_error`` (tempfail: 451 4.3.0; accept: skipped, visibly, with
  ``GREYLIST_STORE_ERROR``) and every failure is counted in
  ``mailgate_store_errors_total``;
* the same Store object (no restart of mailgate) works again within seconds of the
  promotion, and never writes to an old master that comes back;
* no call hangs beyond the store's timeouts, whatever stopped answering.

Stores are built as ``mailgate serve`` builds them (``Store.from_policy``), so the
timeouts are the production defaults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from filter import replies
from filter.checks import Context
from filter.checks.greylist import GreylistCheck
from filter.greylist import Triplet, normalise_recipient
from filter.metrics import Metrics
from filter.model import ClientInfo, Envelope, Recipient
from filter.policy.schema import Policy, policy_from_dict
from filter.results import Action, CheckResult
from filter.store import RateCounter, Store
from tests.rig.redisserver import SentinelGroup, start_sentinel_group, wait_until

T0 = 1_700_000_000.0
DELAY = 300.0
IP, NET = "192.0.2.10", "192.0.2.0/24"

_defaults = inspect.signature(Store.__init__).parameters
SOCKET_TIMEOUT = float(_defaults["socket_timeout"].default)
POOL_TIMEOUT = float(_defaults["pool_timeout"].default)
#: The longest a store call may take whatever stopped answering: a wait for a pooled
#: connection, then one socket timeout. Far below ``server.check_timeout`` (20 s), past
#: which a check becomes a temperror *without* ``redis.on_error``'s decision.
CALL_BOUND = POOL_TIMEOUT + SOCKET_TIMEOUT
SLACK = 0.5  # scheduling on two shared cores
RECOVERY_BOUND = 10.0  # kill -> the same Store answers again (measured: about 3 s)


# --- the harness ------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_policy(url: str, on_error: str) -> Policy:
    data: dict[str, Any] = {
        "redis": {"url": url, "on_error": on_error},
        "greylist": {"delay": "5m", "retry_window": "2d", "max_age": "35d"},
    }
    policy, problems = policy_from_dict(data)
    assert policy is not None, problems
    return policy


class Mail:
    """The greylist check at RCPT against one Store, as a session runs it."""

    def __init__(self, store: Store, url: str, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.policies = {e: make_policy(url, e) for e in ("tempfail", "accept")}
        self.check = GreylistCheck()

    async def rcpt(self, rcpt: str = "bob@example.test", on_error: str = "tempfail") -> CheckResult:
        ctx = Context(
            client=ClientInfo(ip=IP, port=4000, session_id="S1"),
            policy=self.policies[on_error],
            envelope=Envelope(mail_from="alice@example.org", recipients=[Recipient(rcpt)]),
            recipient=Recipient(rcpt),
            clock=self.clock,
            store=self.store,
        )
        return await self.check.run(ctx)


def triplet_key(store: Store, rcpt: str) -> str:
    """The key the store keeps the triplet (IP, alice@example.org, rcpt) under."""
    triplet = Triplet(NET, "alice@example.org", normalise_recipient(rcpt))
    return store.key("triplet", triplet.digest())


def outcome(r: CheckResult) -> str:
    return str(r.data["outcome"])


def store_errors(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("mailgate_store_errors_total") or 0.0


def greylist_errors(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("mailgate_greylist_total", {"result": "error"})
    return value or 0.0


def assert_tempfailed(r: CheckResult) -> None:
    """``redis.on_error = "tempfail"`` with the store down: 451 4.3.0, never a pass."""
    assert r.result == "temperror" and outcome(r) == "error", r
    assert r.decision is not None and r.decision.action is Action.TEMPFAIL
    assert r.decision.reply == replies.STORE_TEMPFAIL
    assert r.decision.reply is not None and r.decision.reply.code == 451


def assert_skipped(r: CheckResult) -> None:
    """``redis.on_error = "accept"`` with the store down: no decision, but visibly so."""
    assert r.result == "temperror" and outcome(r) == "error", r
    assert r.decision is None
    assert [s.name for s in r.symbols] == ["GREYLIST_STORE_ERROR"]


def replicate(group: SentinelGroup, port: int) -> None:
    """Make sure what the master holds reached its replica (``WAIT 1 1000``)."""
    c = group.client(port)
    try:
        assert c.execute_command("WAIT", 1, 1000) == 1  # type: ignore[no-untyped-call]
    finally:
        c.close()


def exists(group: SentinelGroup, port: int, key: str) -> bool:
    return not missing(group, port, [key])


def missing(group: SentinelGroup, port: int, keys: list[str]) -> list[str]:
    """Those of ``keys`` one instance does not hold (one round trip)."""
    c = group.client(port)
    try:
        pipe = c.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [key for key, n in zip(keys, pipe.execute(), strict=True) if not n]
    finally:
        c.close()


async def until_answering(mail: Mail, rcpt: str, within: float) -> tuple[CheckResult, int, float]:
    """Retry one RCPT (an MTA's retry, compressed) until the store answers it.

    Returns the answer, how many tries failed on the store meanwhile (each one must
    have tempfailed) and how long it took."""
    start = time.monotonic()
    failed = 0
    while True:
        r = await mail.rcpt(rcpt)
        if r.result != "temperror":
            return r, failed, time.monotonic() - start
        assert_tempfailed(r)
        failed += 1
        assert time.monotonic() - start < within, f"store still failing after {within}s: {r}"
        await asyncio.sleep(0.05)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A master, one replica and one sentinel (quorum 1, down after 1 s)."""
    g = start_sentinel_group(tmp_path)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


# --- a master dies ----------------------------------------------------------------------


async def test_killed_master_follows_on_error_then_recovers_with_its_state(
    group: SentinelGroup, metrics: Metrics
) -> None:
    """Scenario 1: SIGKILL of the master. While there is no master the check follows
    ``redis.on_error`` and counts; after the promotion the same Store answers again,
    and the triplet (and rate counter) recorded before the failover are still known."""
    url = group.url()
    clock = Clock()
    store = Store.from_policy(make_policy(url, "tempfail").redis, metrics)
    mail = Mail(store, url, clock)
    counter = RateCounter("rl_messages", f"net:{NET}", 3, "m:before")
    try:
        assert outcome(await mail.rcpt()) == "new"
        before = await store.rate_limit([counter], 3600, clock.now)
        assert before.over is None and before.counts == (0,)
        replicate(group, group.master_port)

        group.kill(group.master_port)
        # No master now (the sentinel needs a second to even suspect it).
        assert_tempfailed(await mail.rcpt())
        assert_skipped(await mail.rcpt(on_error="accept"))
        assert (store_errors(metrics), greylist_errors(metrics)) == (2, 2)

        clock.now += DELAY
        r, failed, took = await until_answering(mail, "bob@example.test", RECOVERY_BOUND)
        # The retry of the triplet recorded before the failover passes: nothing lost.
        assert outcome(r) == "passed" and r.decision is None, r
        assert "retry of" in str(r.data["reason"])
        assert group.master_as_sentinel_says() == group.replica_ports[0]
        assert store_errors(metrics) == 2 + failed  # every failure counted, once
        assert greylist_errors(metrics) == 2 + failed
        # Nothing forged: an unknown triplet is still greylisted by the new master.
        fresh = await mail.rcpt("carol@example.test")
        assert outcome(fresh) == "new" and fresh.decision is not None
        assert fresh.decision.action is Action.GREYLIST
        # The rate counter kept the event counted before the failover.
        after = dataclasses.replace(counter, member="m:after")
        again = await store.rate_limit([after], 3600, clock.now)
        assert again.over is None and again.counts == (1,)
        assert took < RECOVERY_BOUND
    finally:
        await store.aclose()
    # Closing the Store closes its sentinel connections too (they used to stay open).
    wait_until(lambda: len(group.ask(lambda c: c.client_list())) == 1, "only this probe left")


async def test_old_master_restarted_is_never_written_and_reads_follow_the_new_master(
    group: SentinelGroup, metrics: Metrics
) -> None:
    """Scenario 2: the killed master comes back on its port, first as an empty master
    of its own, then demoted by the sentinel to a replica of the new master. Every
    call meanwhile goes to the new master: none is lost to the old one (which would
    throw it away when it resyncs), none fails with READONLY, none errs at all."""
    url = group.url()
    old, new = group.master_port, group.replica_ports[0]
    clock = Clock()
    store = Store.from_policy(make_policy(url, "tempfail").redis, metrics)
    mail = Mail(store, url, clock)
    try:
        await asyncio.gather(*(mail.rcpt(f"r{i}@example.test") for i in range(8)))  # a pool
        replicate(group, old)
        group.kill(old)
        await until_answering(mail, "r0@example.test", RECOVERY_BOUND)
        wait_until(lambda: group.settled_master() == new, "the failover to settle")
        errors_before = store_errors(metrics)

        group.restart(old)
        wait_until(lambda: group.role(old) == "master", "old master up again")
        written: list[str] = []
        seen_empty_master = False
        deadline = time.monotonic() + 25
        # Until the sentinel has demoted it (about 10 s: it waits to be sure), and a bit.
        while time.monotonic() < deadline:
            role = group.role(old)
            rcpt = f"after{len(written)}@example.test"
            r = await mail.rcpt(rcpt)
            assert outcome(r) == "new", r  # answered, by a master that did not know it
            written.append(rcpt)
            if role == "master":
                seen_empty_master = True
                # Not on the old master: it will drop its data when it resyncs.
                assert not exists(group, old, triplet_key(store, rcpt)), rcpt
            elif len(written) > 3 and group.in_sync(old):
                break
            await asyncio.sleep(0.1)
        assert seen_empty_master  # the dangerous window was exercised
        assert group.settled_master() == new  # (the rig: the sentinel did not flap)
        assert group.role(old) == "slave", "the sentinel never demoted the old master"
        assert store_errors(metrics) == errors_before
        # Everything is on the new master, and is known: its retries are "early".
        assert not missing(group, new, [triplet_key(store, rcpt) for rcpt in written])
        for rcpt in written[:3]:
            assert outcome(await mail.rcpt(rcpt)) == "early"
        assert store_errors(metrics) == errors_before
    finally:
        await store.aclose()


# --- a master stops answering (a frozen host, a partition) -------------------------------


async def test_frozen_master_that_comes_back_after_the_failover_gets_no_writes(
    group: SentinelGroup, metrics: Metrics
) -> None:
    """A master that stopped answering (SIGSTOP) with the Store idle meanwhile, then
    answers again after the sentinel promoted its replica: it still believes it is the
    master (for about 10 s, until the sentinel demotes it and it throws its data away
    to resync), and the Store's pooled connections to it are healthy sockets.

    Before the fix the Store went on using them: every triplet and rate event in that
    window was written to the old master and lost at its resync (and read from its
    stale data). Now the pool asks the sentinel again before reusing a connection
    (at most once a second) and drops connections to an address that is no longer the
    master's."""
    url = group.url()
    old, new = group.master_port, group.replica_ports[0]
    clock = Clock()
    store = Store.from_policy(make_policy(url, "tempfail").redis, metrics)
    mail = Mail(store, url, clock)
    try:
        # Several pooled connections to the master, then nothing while it is frozen.
        await asyncio.gather(*(mail.rcpt(f"r{i}@example.test") for i in range(8)))
        replicate(group, old)
        group.send_signal(old, signal.SIGSTOP)
        wait_until(lambda: group.settled_master() == new, "the failover to complete", 15)
        group.send_signal(old, signal.SIGCONT)

        for i in range(5):
            rcpt = f"after{i}@example.test"
            assert outcome(await mail.rcpt(rcpt)) == "new"
            assert exists(group, new, triplet_key(store, rcpt)), f"{rcpt} not on the new master"
            assert not exists(group, old, triplet_key(store, rcpt)), f"{rcpt} on the old master"
        assert group.role(old) == "master"  # the window was real: not demoted yet
        # State from before the freeze is served by the new master too.
        clock.now += DELAY
        assert outcome(await mail.rcpt("r1@example.test")) == "passed"
        assert store_errors(metrics) == 0
    finally:
        await store.aclose()


async def test_frozen_master_bounds_every_call_during_a_failover_under_load(
    group: SentinelGroup, metrics: Metrics
) -> None:
    """Scenario 3 and the blackhole bound: 60 sessions keep sending RCPTs while the
    master freezes (SIGSTOP: connections hang instead of being refused) and the
    sentinel fails over. No call takes longer than a pool wait plus one socket
    timeout, no exception escapes the check (each store failure is a counted, 451
    tempfail), and every answer given after the freeze came from the new master and
    is there."""
    url = group.url()
    clock = Clock()
    store = Store.from_policy(make_policy(url, "tempfail").redis, metrics)
    mail = Mail(store, url, clock)
    names = itertools.count()
    frozen_at = 0.0
    stop_at = float("inf")
    calls: list[tuple[float, float, str, CheckResult | BaseException]] = []

    async def session() -> None:
        while time.monotonic() < stop_at:
            rcpt = f"u{next(names)}@example.test"
            start = time.monotonic()
            try:
                r: CheckResult | BaseException = await mail.rcpt(rcpt)
            except Exception as exc:  # what escapes the check is the finding
                r = exc
            calls.append((start, time.monotonic() - start, rcpt, r))
            await asyncio.sleep(0.02)

    try:
        await asyncio.gather(*(mail.rcpt(f"warm{i}@example.test") for i in range(60)))
        replicate(group, group.master_port)
        tasks = [asyncio.create_task(session()) for _ in range(60)]
        await asyncio.sleep(0.2)
        frozen_at = time.monotonic()
        group.send_signal(group.master_port, signal.SIGSTOP)
        # Run until the new master has served calls for half a second (or give up).
        loop_deadline = frozen_at + RECOVERY_BOUND + CALL_BOUND
        while time.monotonic() < loop_deadline:
            await asyncio.sleep(0.1)
            after = [c for c in calls if c[0] > frozen_at + 0.1 and not _failed(c[3])]
            if after and time.monotonic() - min(c[0] for c in after) > 0.5:
                break
        stop_at = time.monotonic()
        await asyncio.gather(*tasks)
    finally:
        stop_at = 0.0
        await store.aclose()

    escaped = [c[3] for c in calls if isinstance(c[3], BaseException)]
    assert not escaped, escaped[:3]
    results = [
        (start, took, rcpt, r) for start, took, rcpt, r in calls if isinstance(r, CheckResult)
    ]
    slowest = max(took for _, took, _, _ in results)
    assert slowest <= CALL_BOUND + SLACK, f"a call took {slowest:.2f}s"
    failed = [r for _, _, _, r in results if _failed(r)]
    assert failed, "the freeze was never noticed"
    for r in failed:
        assert_tempfailed(r)
    assert store_errors(metrics) == len(failed)
    answered_after = [
        rcpt for start, _, rcpt, r in results if start > frozen_at + 0.1 and not _failed(r)
    ]
    assert answered_after, "the store never recovered"
    assert all(outcome(r) in ("new", "early") for _, _, _, r in results if not _failed(r))
    new = group.replica_ports[0]
    assert group.master_as_sentinel_says() == new
    lost = missing(group, new, [triplet_key(store, rcpt) for rcpt in answered_after])
    assert not lost, f"{len(lost)} of {len(answered_after)} answers not on the new master"


def _failed(r: CheckResult | BaseException) -> bool:
    return isinstance(r, BaseException) or r.result == "temperror"


# --- a sentinel stops answering ---------------------------------------------------------


@pytest.fixture
def two_sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A master (no replica) watched by two sentinels."""
    g = start_sentinel_group(tmp_path, replicas=0, sentinels=2)
    try:
        yield g
    finally:
        g.close()


async def test_unanswering_sentinels_are_skipped_and_never_hang_a_call(
    two_sentinels: SentinelGroup, metrics: Metrics
) -> None:
    """A frozen sentinel (first in ``redis.url``) costs one socket timeout before the
    next is asked, not redis-py's default ten retries with backoff per sentinel
    (before the fix: 14 s before the first call could even connect); and with every
    sentinel frozen and the master gone, a call fails within the store's bound (before:
    28 s, past ``server.check_timeout``, where ``on_error = "tempfail"`` no longer
    applies and the RCPT would have passed ungreylisted)."""
    g = two_sentinels
    url = g.url()
    store = Store.from_policy(make_policy(url, "tempfail").redis, metrics)
    mail = Mail(store, url, Clock())
    try:
        g.send_signal(g.sentinel_ports[0], signal.SIGSTOP)
        start = time.monotonic()
        r = await mail.rcpt()
        took = time.monotonic() - start
        assert outcome(r) == "new", r
        assert took <= SOCKET_TIMEOUT + SLACK, f"first call took {took:.2f}s"

        g.send_signal(g.sentinel_ports[1], signal.SIGSTOP)
        g.kill(g.master_port)
        # The first call fails on its broken connection; the next ones must find a
        # master through sentinels that do not answer.
        for i in range(2):
            start = time.monotonic()
            r = await mail.rcpt()
            took = time.monotonic() - start
            assert_tempfailed(r)
            assert took <= CALL_BOUND + SLACK, f"call {i} took {took:.2f}s"
        assert store_errors(metrics) == 2
    finally:
        await store.aclose()
