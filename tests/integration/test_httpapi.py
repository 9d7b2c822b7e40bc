"""The metrics/health HTTP listener over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from filter.httpapi import start_http_api
from filter.metrics import Metrics

Problems = list[str]


async def ready() -> Problems:
    return []


class Api:
    def __init__(self, server: asyncio.Server, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics
        sock = server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]


async def start(
    readiness: Callable[[], Awaitable[Problems]] = ready,
    host: str = "127.0.0.1",
    read_timeout: float = 10.0,
    readiness_timeout: float = 2.0,
) -> Api:
    metrics = Metrics(CollectorRegistry())
    server = await start_http_api(
        (host, 0),
        metrics,
        readiness,
        read_timeout=read_timeout,
        readiness_timeout=readiness_timeout,
    )
    return Api(server, metrics)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    a = await start()
    yield a
    a.server.close()
    await a.server.wait_closed()


async def raw(api: Api, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(api.host, api.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def get(api: Api, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    data = await raw(api, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


async def test_metrics_parse(api: Api) -> None:
    api.metrics.count_message("accept")
    status, headers, body = await get(api, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in families["mailgate_messages"].samples
    }
    assert samples[("mailgate_messages_total", (("action", "accept"),))] == 1.0
    assert "mailgate_build_info" in families


async def test_metrics_query_string_ignored(api: Api) -> None:
    assert (await get(api, "/metrics?x=1"))[0] == 200


async def test_healthz(api: Api) -> None:
    status, headers, body = await get(api, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"


async def test_readyz_ready(api: Api) -> None:
    assert (await get(api, "/readyz"))[::2] == (200, b"ready\n")


async def test_readyz_not_ready_lists_problems() -> None:
    async def problems() -> Problems:
        return ["upstream: connection refused", "store: timeout\r\ninjected"]

    a = await start(problems)
    try:
        status, _, body = await get(a, "/readyz")
    finally:
        a.server.close()
    assert status == 503
    assert body == b"upstream: connection refused\nstore: timeout injected\n"


async def test_readyz_timeout_and_exception() -> None:
    async def slow() -> Problems:
        await asyncio.sleep(10)
        return []

    async def broken() -> Problems:
        raise RuntimeError("boom")

    a = await start(slow, readiness_timeout=0.1)
    b = await start(broken)
    try:
        status, _, body = await get(a, "/readyz")
        assert status == 503 and b"timed out" in body
        status, _, body = await get(b, "/readyz")
        assert status == 503 and b"RuntimeError" in body
    finally:
        a.server.close()
        b.server.close()


async def test_not_found_and_method_not_allowed(api: Api) -> None:
    assert (await get(api, "/nope"))[0] == 404
    status, headers, _ = await get(api, "/metrics", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


async def test_head_has_no_body(api: Api) -> None:
    status, headers, body = await get(api, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "3"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
        (b"GET healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n", 431),
    ],
)
async def test_bad_requests(api: Api, request_bytes: bytes, status: int) -> None:
    data = await raw(api, request_bytes)
    assert data.startswith(f"HTTP/1.1 {status} ".encode())


async def test_slow_client_times_out() -> None:
    a = await start(read_timeout=0.3)
    try:
        reader, writer = await asyncio.open_connection(a.host, a.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finishes the head
        await writer.drain()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        data = await asyncio.wait_for(reader.read(), 5)
        elapsed = loop.time() - t0
        writer.close()
    finally:
        a.server.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.2 < elapsed < 3


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_ipv6_literal(host: str) -> None:
    try:
        a = await start(host=host)
    except OSError as err:
        pytest.skip(f"IPv6 loopback unavailable: {err}")
    try:
        assert a.host == "::1"
        assert (await get(a, "/healthz"))[0] == 200
    finally:
        a.server.close()
