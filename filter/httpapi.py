"""The ``metrics.listen`` HTTP endpoint: /metrics, /healthz, /readyz.

Hand-written on asyncio.start_server rather than a web framework or
prometheus_client's threaded server: it is three fixed GET endpoints, and
serving them on the SMTP event loop keeps the process single-loop (readiness
probes can await the same upstream and store clients) with no extra
dependency or thread. Every request is bounded in size and time, and the
connection closes after one response, so a stuck or hostile scraper costs
one socket for at most ``read_timeout`` seconds; at ``max_connections`` a new
connection pushes out the one that has waited longest for its request head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry

from filter.metrics import Metrics, exposition

__all__ = ["Readiness", "start_http_api"]

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[list[str]]]

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT = 10.0
READINESS_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 65536

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TEXT = "text/plain; charset=utf-8"


class _BadRequest(Exception):
    """The request head cannot be served; carries the status to answer with."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _HttpApi:
    """Per-listener state shared by all connections."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Readiness,
        read_timeout: float,
        readiness_timeout: float,
        max_connections: int,
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        self.read_timeout = read_timeout
        self.readiness_timeout = readiness_timeout
        self.max_connections = max_connections
        self._conns: set[asyncio.StreamWriter] = set()
        # Connections still sending their request head, oldest first (dicts keep order).
        self._waiting: dict[asyncio.StreamWriter, None] = {}

    @property
    def open(self) -> int:
        return len(self._conns)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one request, then close: no keep-alive to track."""
        if len(self._conns) >= self.max_connections and not self._evict():
            writer.close()
            return
        self._conns.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("http api: unexpected error")
        finally:
            self._conns.discard(writer)
            self._waiting.pop(writer, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _evict(self) -> bool:
        """Make room by dropping the connection that has waited longest for its request
        head. Real scrapers and probes send theirs in one packet: without this, a client
        holding max_connections idle sockets would starve them (a failing liveness probe
        restarts the service) for as long as it keeps reconnecting."""
        for oldest in self._waiting:
            del self._waiting[oldest]
            self._conns.discard(oldest)
            oldest.transport.abort()
            log.warning(
                "http api: %d connections open, dropped the oldest idle one", len(self._conns)
            )
            return True
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._waiting[writer] = None
        try:
            async with asyncio.timeout(self.read_timeout):
                method, path = await _read_head(reader)
        except TimeoutError:
            await self._send(writer, 408, b"request timeout\n")
            return
        except _BadRequest as err:
            await self._send(writer, err.status, f"{_REASONS[err.status].lower()}\n".encode())
            await _linger(reader, writer)
            return
        finally:
            self._waiting.pop(writer, None)
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
            return
        status, body, ctype = await self._route(path)
        await self._send(writer, status, body, ctype=ctype, head_only=method == "HEAD")

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            # A thread, because merging many workers' files in multiprocess
            # mode is blocking file I/O that would stall SMTP sessions.
            body, ctype = await asyncio.to_thread(exposition, self.registry)
            return 200, body, ctype
        if path == "/healthz":
            return 200, b"ok\n", _TEXT
        if path == "/readyz":
            problems = await self._problems()
            if not problems:
                return 200, b"ready\n", _TEXT
            lines = "".join(_one_line(p) + "\n" for p in problems)
            return 503, lines.encode("utf-8", "replace"), _TEXT
        return 404, b"not found\n", _TEXT

    async def _problems(self) -> list[str]:
        try:
            async with asyncio.timeout(self.readiness_timeout):
                return list(await self.readiness())
        except TimeoutError:
            return [f"readiness check timed out after {self.readiness_timeout:g}s"]
        except Exception as err:
            log.exception("http api: readiness check failed")
            return [f"readiness check failed: {type(err).__name__}"]

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        ctype: str = _TEXT,
        extra: str = "",
        head_only: bool = False,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            f"{extra}"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + (b"" if head_only else body))
        async with asyncio.timeout(self.read_timeout):
            await writer.drain()


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read the request line and headers (at most MAX_REQUEST_HEAD bytes).

    Headers are read only to find where the request ends; none changes the
    answer. Returns the method and the path without its query string.
    """
    used = 0
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431) from None
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("client closed mid-request") from None
        used += len(line)
        if used > MAX_REQUEST_HEAD:
            raise _BadRequest(431)
        if line in (b"\r\n", b"\n"):
            if lines:
                break
            continue  # RFC 9112 2.2: ignore empty lines before the request line
        lines.append(line)
    parts = lines[0].rstrip(b"\r\n").split(b" ")
    if len(parts) != 3:
        raise _BadRequest(400)
    method_b, target_b, version_b = parts
    if not version_b.startswith(b"HTTP/1."):
        raise _BadRequest(505 if version_b.startswith(b"HTTP/") else 400)
    try:
        method = method_b.decode("ascii")
        target = target_b.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400) from None
    if not method.isalpha() or not method.isupper():
        raise _BadRequest(400)
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        raise _BadRequest(400)
    return method, path


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close and swallow what the client is still sending, briefly.

    Closing with unread input makes the kernel send RST, which can destroy
    the error response before the client reads it.
    """
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_TIMEOUT):
            for _ in range(LINGER_BYTES // 4096):
                if not await reader.read(4096):
                    break


def _one_line(text: str) -> str:
    """Keep a readiness problem on one line of the 503 body."""
    return " ".join(text.split())


async def start_http_api(
    address: tuple[str, int] | socket.socket,
    metrics: Metrics | CollectorRegistry,
    readiness: Readiness,
    *,
    read_timeout: float = READ_TIMEOUT,
    readiness_timeout: float = READINESS_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> asyncio.Server:
    """Listen on ``address`` and serve until the returned server is closed.

    ``address`` is ``(host, port)`` or a socket already listening; the host may be
    an IPv6 literal, with or without brackets. ``readiness`` returns the list of
    problems (empty = ready) and is given ``readiness_timeout`` seconds to do so.
    """
    registry = metrics.registry if isinstance(metrics, Metrics) else metrics
    api = _HttpApi(registry, readiness, read_timeout, readiness_timeout, max_connections)
    if isinstance(address, socket.socket):
        return await asyncio.start_server(api.handle, sock=address, limit=MAX_REQUEST_HEAD)
    host, port = address
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return await asyncio.start_server(
        api.handle, host or None, port, limit=MAX_REQUEST_HEAD, reuse_address=True
    )
