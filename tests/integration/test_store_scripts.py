"""The store's own path for scripts on the mail path (standalone Redis), on a real Redis.

The path skips redis-py's client layers, so what those layers did for us is proven
here: scripts the server forgot are loaded again, a socket the server closed is
replaced, a server that stops answering costs a bounded wait and never a reused
half-read connection, and an error reply leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions

from filter.policy.schema import policy_from_dict
from filter.store import Store, StoreError
from filter.units import parse_duration
from tests.rig.ports import free_port
from tests.rig.redisserver import start_redis_server, stop_servers, wait_until
from tests.rig.tlscerts import issue_certificate

#: mailgate serves on uvloop, whose transports differ from asyncio's: both loops here.
pytestmark = pytest.mark.both_loops

ECHO = "return ARGV[1]"


class SilentServer:
    """Accepts TCP connections and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    srv = SilentServer()
    yield srv
    srv.close()


@contextlib.asynccontextmanager
async def store_on(silent: SilentServer, socket_timeout: float) -> AsyncIterator[Store]:
    store = Store(
        f"redis://127.0.0.1:{silent.port}/0", socket_timeout=socket_timeout, pool_timeout=0.1
    )
    try:
        yield store
    finally:
        await store.aclose()


def connected_clients(raw: redis.Redis) -> int:
    return int(raw.info("clients")["connected_clients"])


async def test_scripts_run_on_the_direct_path(store: Store) -> None:
    script = store.client.register_script(ECHO)
    assert await store.run_script(script, ["k"], ["hello"]) == "hello"
    assert store.mode == "standalone"


async def test_a_script_the_server_forgot_is_loaded_again(store: Store, raw: redis.Redis) -> None:
    script = store.client.register_script(ECHO)
    assert await store.run_script(script, ["k"], ["one"]) == "one"
    raw.script_flush()  # a Redis restart or a SCRIPT FLUSH by an admin
    assert not raw.script_exists(script.sha)[0]
    assert await store.run_script(script, ["k"], ["two"]) == "two"
    assert raw.script_exists(script.sha)[0]


async def test_an_idle_connection_the_server_closed_is_replaced(
    store: Store, raw: redis.Redis
) -> None:
    script = store.client.register_script(ECHO)
    assert await store.run_script(script, ["k"], ["before"]) == "before"
    raw.client_kill_filter(_type="normal", skipme=True)  # every other client is cut off
    assert await store.run_script(script, ["k"], ["after"]) == "after"


async def test_an_error_reply_leaves_the_connection_in_use(store: Store, raw: redis.Redis) -> None:
    boom = store.client.register_script("return redis.error_reply('boom')")
    echo = store.client.register_script(ECHO)
    assert await store.run_script(echo, ["k"], ["x"]) == "x"
    clients = connected_clients(raw)
    with pytest.raises(redis.exceptions.ResponseError, match="boom"):
        await store.run_script(boom, ["k"], [])
    assert await store.run_script(echo, ["k"], ["y"]) == "y"
    assert connected_clients(raw) == clients  # no new connection was needed


async def test_a_hung_server_costs_a_bounded_wait_and_a_fresh_connection_each_time(
    silent: SilentServer,
) -> None:
    async with store_on(silent, socket_timeout=0.2) as store:
        script = store.client.register_script(ECHO)
        for attempt in (1, 2):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await store.run_script(script, ["k"], ["x"])
            assert loop.time() - t0 < 1.0  # socket_timeout + pool_timeout, not forever
            # The half-read connection was dropped, not put back for the next call.
            assert len(silent.accepted) == attempt
        with pytest.raises(StoreError):  # and the store's callers see a StoreError
            await store.call("test", lambda: store.run_script(script, ["k"], ["x"]))


@pytest.mark.parametrize(("answer", "pool_wait"), [("250ms", "0s"), ("600ms", "300ms")])
async def test_the_policys_timeouts_bound_a_call_to_a_hung_server(
    silent: SilentServer, answer: str, pool_wait: str
) -> None:
    policy, problems = policy_from_dict(
        {
            "redis": {
                "url": f"redis://127.0.0.1:{silent.port}/0",
                "timeout": answer,
                "pool_timeout": pool_wait,
                "pool_size": 1,
            }
        }
    )
    assert policy is not None, problems
    store = Store.from_policy(policy.redis)
    try:
        bound = parse_duration(answer) + parse_duration(pool_wait)
        assert store.call_timeout == pytest.approx(bound)
        script = store.client.register_script(ECHO)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(StoreError):
            await store.call("test", lambda: store.run_script(script, ["k"], ["x"]))
        took = loop.time() - t0
        # The answer's timeout, not the 1 s default (nor the 3 s of both defaults).
        assert parse_duration(answer) * 0.9 <= took < bound + 0.3
    finally:
        await store.aclose()


async def test_a_cancelled_call_does_not_leave_its_connection_behind(
    silent: SilentServer,
) -> None:
    async with store_on(silent, socket_timeout=5.0) as store:
        script = store.client.register_script(ECHO)
        task = asyncio.get_running_loop().create_task(store.run_script(script, ["k"], ["x"]))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        task = asyncio.get_running_loop().create_task(store.run_script(script, ["k"], ["x"]))
        await asyncio.sleep(0.1)
        assert len(silent.accepted) == 2  # the second call did not reuse the first socket
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- the connection settings of the URL hold on this path too -------------------------

SET = "redis.call('SET', KEYS[1], ARGV[1]); return ARGV[1]"


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server of our own with a password and a unix socket (port, socket path)."""
    tmp = tmp_path_factory.mktemp("authredis")
    port, sock = free_port(), tmp / "redis.sock"
    proc = start_redis_server(
        tmp, "--port", str(port), "--requirepass", "s3cret", "--unixsocket", str(sock)
    )
    try:
        probe = redis.Redis(port=port, password="s3cret", socket_timeout=1)
        wait_until(probe.ping, "the private redis-server")
        probe.execute_command("ACL", "SETUSER", "mg", "on", ">mgpass", "~*", "&*", "+@all")
        probe.close()
        yield port, sock
    finally:
        stop_servers([proc])


async def set_through(url: str, key: str, value: str, admin: redis.Redis | None = None) -> None:
    """One SET script through a store on ``url``; ``admin`` then sees the connection
    the store keeps (still open) and, afterwards, the key."""
    store = Store(url)
    try:
        script = store.client.register_script(SET)
        assert await store.run_script(script, [key], [value]) == value
        if admin is not None:
            names = [c["name"] for c in admin.client_list()]
            assert "mg-scripts" in names  # the script connection, still idle, named itself
    finally:
        await store.aclose()


async def assert_refused(url: str, why: str) -> None:
    """A store on ``url`` fails with a StoreError matching ``why``, not a hang."""
    store = Store(url, socket_timeout=2.0)
    try:
        script = store.client.register_script(ECHO)
        with pytest.raises(StoreError, match=why):
            await store.call("test", lambda: store.run_script(script, ["k"], ["x"]))
    finally:
        await store.aclose()


async def test_password_database_and_client_name_from_the_url(
    private_redis: tuple[int, Path],
) -> None:
    port, _ = private_redis
    admin = redis.Redis(port=port, password="s3cret", db=3, decode_responses=True)
    other_db = redis.Redis(port=port, password="s3cret", db=0)
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/3?client_name=mg-scripts"
        await set_through(url, "mg:url-test", "db3", admin)
        assert admin.get("mg:url-test") == "db3"  # SELECT 3 happened
        assert other_db.get("mg:url-test") is None
    finally:
        admin.close()
        other_db.close()


async def test_acl_user_and_unix_socket(private_redis: tuple[int, Path]) -> None:
    port, sock = private_redis
    await set_through(f"unix://mg:mgpass@{sock}?db=5", "mg:unix-test", "db5")
    admin = redis.Redis(port=port, password="s3cret", db=5, decode_responses=True)
    try:
        assert admin.get("mg:unix-test") == "db5"
    finally:
        admin.close()


async def test_a_wrong_password_is_a_store_error_not_a_hang(
    private_redis: tuple[int, Path],
) -> None:
    port, _ = private_redis
    await assert_refused(f"redis://:wrong@127.0.0.1:{port}/0", r"(?i)auth|password")


async def test_replies_are_text_and_a_script_error_is_a_response_error(store: Store) -> None:
    table = store.client.register_script("return {1, 'two', ARGV[1]}")
    assert await store.run_script(table, ["k"], ["drei"]) == [1, "two", "drei"]
    bad = store.client.register_script("return redis.call('NO_SUCH_COMMAND')")
    with pytest.raises(redis.exceptions.ResponseError):
        await store.run_script(bad, ["k"], [])


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking only TLS (port, CA file that signed its certificate)."""
    tmp = tmp_path_factory.mktemp("tlsredis")
    ca, cert, key = issue_certificate(tmp, "127.0.0.1")
    port = free_port()
    proc = start_redis_server(
        tmp,
        *("--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"),
        *("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)),
    )
    try:
        probe = redis.Redis("127.0.0.1", port, ssl=True, ssl_ca_certs=str(ca), socket_timeout=1)
        wait_until(probe.ping, "the TLS redis-server")
        probe.close()
        yield port, ca
    finally:
        stop_servers([proc])


async def test_tls_with_the_urls_ca_and_a_refused_certificate_without_it(
    tls_redis: tuple[int, Path],
) -> None:
    port, ca = tls_redis
    await set_through(f"rediss://127.0.0.1:{port}/6?ssl_ca_certs={ca}", "mg:tls-test", "db6")
    admin = redis.Redis(
        "127.0.0.1", port, db=6, ssl=True, ssl_ca_certs=str(ca), decode_responses=True
    )
    try:
        assert admin.get("mg:tls-test") == "db6"
    finally:
        admin.close()
    await assert_refused(f"rediss://127.0.0.1:{port}/6", r"(?i)certificate")


async def test_a_reply_that_is_not_text_fails_once_and_is_not_run_again(
    store: Store, raw: redis.Redis
) -> None:
    """A script that ran must not run twice because its reply could not be decoded."""
    echo = store.client.register_script(ECHO)
    assert await store.run_script(echo, ["k"], ["warm"]) == "warm"  # a reused socket next
    count = store.client.register_script(
        "redis.call('INCR', KEYS[1]); return string.char(255, 254)"
    )
    with pytest.raises(redis.exceptions.InvalidResponse, match="undecodable"):
        await store.run_script(count, ["mg:undecodable"], [])
    assert raw.get("mg:undecodable") == "1"
    assert await store.run_script(echo, ["k"], ["still fine"]) == "still fine"
