"""Shared fixtures: real Redis, zone DNS server, private Postfix, scripted upstream.

Nothing is skipped when a dependency is missing: a test suite that silently skips its
integration half reports green for the wrong reason, so missing Redis/Postfix fail.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# --import-mode=importlib does not put the repo root on sys.path; the rig lives there.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from tests.rig.dnsserver import ZoneDNSServer, base_records  # noqa: E402
from tests.rig.ports import free_port as _free_port  # noqa: E402
from tests.rig.postfix import PostfixInstance  # noqa: E402
from tests.rig.upstream import ScriptedUpstream  # noqa: E402
from tests.rig.workers import TEST_REDIS_URL  # noqa: E402

REDIS_URL = TEST_REDIS_URL


# -- event loops ---------------------------------------------------------------------------
def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests marked ``both_loops`` run under asyncio and uvloop; the rest under asyncio."""
    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def free_port() -> Callable[..., int]:
    """``free_port()`` -> an unused TCP port on 127.0.0.1 (``free_port("::1")`` for v6)."""
    return _free_port


def _private_dir(prefix: str) -> Path:
    """A world-searchable temp dir: Postfix daemons (not root) must reach paths in it."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


# -- Redis ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _redis_checked() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as e:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({e}); run scripts/ensure-redis.sh",
            pytrace=False,
        )
    return REDIS_URL


@pytest.fixture
def redis_url(_redis_checked: str) -> str:
    """URL of real Redis db 9, flushed before the test (that db belongs to the tests)."""
    import redis

    client = redis.Redis.from_url(_redis_checked, socket_timeout=2)
    client.flushdb()
    client.close()
    return _redis_checked


# -- DNS -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dns_server() -> Iterator[ZoneDNSServer]:
    """One ZoneDNSServer for the session (base zones: test, example.test, example.org…).

    Prefer ``dns_zone`` in tests: it restores zone data and failure modes afterwards.
    """
    srv = ZoneDNSServer(base_records()).start()
    yield srv
    srv.stop()


@pytest.fixture
def dns_zone(dns_server: ZoneDNSServer) -> Iterator[ZoneDNSServer]:
    """The session DNS server, with counters reset and zone/faults restored after the test."""
    snap = dns_server.snapshot()
    dns_server.reset_faults()
    dns_server.reset_counters()
    yield dns_server
    dns_server.reset_faults()
    dns_server.restore(snap)


# -- Postfix -------------------------------------------------------------------------------
def _need_postfix() -> None:
    if shutil.which("postfix") is None:
        pytest.fail("postfix is not installed; run scripts/bootstrap.sh", pytrace=False)


@pytest.fixture(scope="session")
def postfix() -> Iterator[PostfixInstance]:
    """Private Postfix on 127.0.0.1:<free port>: example.test -> Maildirs (bob/alice/carol)."""
    _need_postfix()
    base = _private_dir("mailgate-postfix-")
    pf = PostfixInstance(base, _free_port())
    pf.start()
    yield pf
    pf.stop(wait=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mailbox_reset(postfix: PostfixInstance) -> PostfixInstance:
    """The session Postfix with every Maildir emptied before the test."""
    postfix.clear_mail()
    return postfix


@pytest.fixture(scope="session")
def postfix_filter() -> Iterator[PostfixInstance]:
    """Postfix in front of mailgate (smtpd_proxy_filter topology).

    Clients connect to ``listen_port``; Postfix proxies each session to mailgate, which
    the test starts on ``proxy_filter_port``; mailgate relays to
    ``127.0.0.1:after_filter_port``.  Call ``clear_mail()`` yourself between tests.
    """
    _need_postfix()
    base = _private_dir("mailgate-postfix-filter-")
    pf = PostfixInstance.with_proxy_filter(base, _free_port(), _free_port(), _free_port())
    pf.start()
    yield pf
    pf.stop(wait=False)
    shutil.rmtree(base, ignore_errors=True)


# -- scripted upstream ---------------------------------------------------------------------
@pytest.fixture
async def test_upstream() -> AsyncIterator[ScriptedUpstream]:
    """A ScriptedUpstream on 127.0.0.1:<free> in the test's own event loop."""
    up = ScriptedUpstream()
    await up.start()
    yield up
    await up.aclose()
