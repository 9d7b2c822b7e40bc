"""Fixtures for tests that drive a real mailgate process against a scripted upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from filter.metrics import Metrics
from filter.resolver import Resolver
from filter.store import Store
from filter.units import Address
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.upstream import ScriptedUpstream
from tests.rig.workers import TEST_REDIS_URL

BASE_POLICY: dict[str, Any] = {
    "upstream": {"timeout": "3s", "connect_timeout": "2s"},
    "server": {"command_timeout": "10s"},
    # Greylisting (on by default) would answer every first attempt with 451; tests that
    # are about it switch it on. The test Redis database is the worker's own (tests/rig/workers.py).
    "greylist": {"enabled": False},
    "redis": {"url": TEST_REDIS_URL},
}

StartMailgate = Callable[..., MailgateProcess]

#: Policy overrides with SPF, DKIM, DMARC and ARC off: no DNS on the mail path.
AUTH_CHECKS_OFF: dict[str, Any] = {
    name: {"enabled": False} for name in ("spf", "dkim", "dmarc", "arc")
}


@pytest.fixture
async def resolver(dns_zone: ZoneDNSServer) -> AsyncIterator[Resolver]:
    """Our resolver, asking only the test DNS server."""
    yield Resolver([Address(*dns_zone.address)], timeout=1.0)


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream().start_in_thread()
    yield up
    up.stop()


@pytest.fixture
def mailgate(
    tmp_path: Path, upstream: ScriptedUpstream, dns_server: ZoneDNSServer
) -> Iterator[StartMailgate]:
    """Start mailgate processes relaying to ``upstream``; all stopped after the test.

    Their DNS is the loopback test server: a test never reaches real DNS.
    """
    started: list[MailgateProcess] = []

    def start(overrides: dict[str, Any] | None = None, **kw: Any) -> MailgateProcess:
        policy = deep_merge(
            BASE_POLICY,
            {
                "upstream": {"address": upstream.address},
                "dns": {"nameservers": [dns_server.nameserver], "timeout": "1s"},
            },
        )
        policy = deep_merge(policy, overrides or {})
        mg = MailgateProcess(tmp_path / f"mg{len(started)}", policy, **kw)
        started.append(mg)
        return mg.start()

    yield start
    for mg in started:
        mg.stop()


def message(
    subject: str = "test", body: str = "hello\r\n", sender: str = "alice@example.org"
) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    return (
        f"From: <{sender}>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n{body}"
    ).encode()


# -- the real Redis (the test database, through the redis_url fixture) ---------------------
@pytest.fixture
def metrics() -> Metrics:
    """A fresh registry per test, so counts start at zero."""
    return Metrics(CollectorRegistry())


@pytest.fixture
async def store(redis_url: str, metrics: Metrics) -> AsyncIterator[Store]:
    s = Store(redis_url, "mailgate:", metrics=metrics)
    yield s
    await s.aclose()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for looking at keys behind the store's back."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()
