"""SMTPStream's client-facing flow control, under both event loops mailgate may run on.

mailgate serves with uvloop; these pin the same behaviour on plain asyncio, whose
transports differ in EOF handling and write buffering.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from filter.smtpstream import SMTPStream, StreamClosed

pytestmark = pytest.mark.both_loops

Handler = Callable[[SMTPStream], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def _serve(handler: Handler) -> AsyncIterator[tuple[socket.socket, list[SMTPStream]]]:
    loop = asyncio.get_running_loop()
    streams: list[SMTPStream] = []
    done: list[asyncio.Task[None]] = []

    def factory() -> SMTPStream:
        stream = SMTPStream(client=True)
        streams.append(stream)
        stream.connected.add_done_callback(lambda _: done.append(loop.create_task(handler(stream))))
        return stream

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", port))
    try:
        yield client, streams
    finally:
        client.close()
        for task in done:
            task.cancel()
        server.close()


async def _replies_until_eof(client: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(10):
        while chunk := await loop.sock_recv(client, 65536):
            data += chunk
    return data


async def _answer_each_line(stream: SMTPStream, reply: bytes = b"250 ok\r\n") -> None:
    try:
        while True:
            await stream.readline(2048)
            stream.write(reply)
    except StreamClosed:
        pass
    finally:
        stream.close()


async def test_half_close_still_gets_the_replies() -> None:
    """EOF from the client ends its input only: the replies go out, then the close."""
    async with _serve(_answer_each_line) as (client, _):
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"EHLO a\r\nNOOP\r\nQUIT\r\n")
        client.shutdown(socket.SHUT_WR)
        assert await _replies_until_eof(client) == b"250 ok\r\n" * 3


async def test_a_client_not_reading_stops_the_reading_of_commands() -> None:
    """Replies pile up to a bound, then no command is read until the client drains them."""
    handled = 0
    reply = b"214 2.0.0 " + b"x" * 200 + b"\r\n"

    async def handler(stream: SMTPStream) -> None:
        nonlocal handled
        stream.read_timeout = 10
        try:
            while True:
                await stream.readline(2048)
                handled += 1
                stream.write(reply)
        except StreamClosed:
            pass

    async with _serve(handler) as (client, streams):
        loop = asyncio.get_running_loop()
        n = 100_000
        send = loop.create_task(loop.sock_sendall(client, b"HELP\r\n" * n))
        await asyncio.sleep(0.5)
        stalled_at = handled
        assert stalled_at < n
        transport = streams[0].transport
        assert transport is not None
        assert transport.get_write_buffer_size() + streams[0].pending_output < 1 << 20
        await asyncio.sleep(0.3)
        assert handled == stalled_at  # held back, not buffering
        got = 0
        async with asyncio.timeout(20):
            while got < n * len(reply):
                got += len(await loop.sock_recv(client, 1 << 20))
        await send
        assert handled == n


async def test_session_deadline_ends_a_dribbled_line() -> None:
    """Each byte restarts the idle timeout, but not the session deadline."""
    outcome: list[BaseException] = []

    async def handler(stream: SMTPStream) -> None:
        stream.read_timeout = 0.5
        stream.session_deadline = asyncio.get_running_loop().time() + 0.6
        try:
            await stream.readline(2048)
        except BaseException as exc:
            outcome.append(exc)

    async with _serve(handler) as (client, _):
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            while not outcome:
                await loop.sock_sendall(client, b"x")
                await asyncio.sleep(0.1)
        assert isinstance(outcome[0], TimeoutError)
        assert 0.5 < loop.time() - started < 1.5
