"""Lua script calls on the mail path over lean Redis connections of our own (L2).

Greylisting, rate limits and explain batches are each one ``EVALSHA`` per event, and
on a busy MX that call is made for every recipient. Through redis-py's client it
cost ~118 µs of CPU (pool checkout, retry wrapper, hooks, a Task per timed write).
Over redis-py's bare connection, with its StreamReader/StreamWriter plumbing, it
cost 71-92 µs per ``Store.run_script`` call on this machine; here, where a plain
``asyncio.Protocol`` writes the command and feeds the bytes to hiredis's reader,
54-72 µs (five alternating runs each; the rest is mostly the two system calls).
The wire format stays the library's (``hiredis.pack_command`` and
``hiredis.Reader``, the parser redis-py uses itself); only the few lines of asyncio
around them are written here.

Standalone Redis only (Sentinel and Cluster keep redis-py, which follows failovers
and slots). Connection settings come from the redis-py pool the store built from its
URL, so ``redis://``, ``rediss://`` and ``unix://`` with user, password, database
and client name all mean the same as in redis-py. Failures are redis-py's exception
types, so the store handles them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
import redis.asyncio.connection as aioconn
import redis.exceptions

__all__ = ["ConnectParams", "ScriptConnection", "ScriptRunner"]


@dataclass(frozen=True)
class ConnectParams:
    """Where and how to connect, as the redis-py pool would."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host:port
    db: int = 0
    username: str | None = None
    password: str | None = None
    client_name: str | None = None
    ssl: ssl.SSLContext | None = None
    encoding: str | None = "utf-8"  # None: replies stay bytes
    encoding_errors: str = "strict"

    @classmethod
    def from_pool(cls, connection_class: type, kwargs: Mapping[str, Any]) -> ConnectParams:
        """The same endpoint, credentials and reply decoding as the pool's connections."""
        context = None
        if issubclass(connection_class, aioconn.SSLConnection):
            # redis-py builds the TLS context from the rediss:// URL's ssl_* options.
            context = connection_class(**kwargs).ssl_context.get()
        return cls(
            host=str(kwargs.get("host", "127.0.0.1")),
            port=int(kwargs.get("port", 6379)),
            path=kwargs.get("path"),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            client_name=kwargs.get("client_name"),
            ssl=context,
            encoding=kwargs.get("encoding", "utf-8") if kwargs.get("decode_responses") else None,
            encoding_errors=str(kwargs.get("encoding_errors", "strict")),
        )

    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def _error(reply: hiredis.ReplyError) -> redis.exceptions.RedisError:
    """An error reply as the redis-py exception the rest of the store expects."""
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(text)
    if text.startswith(("NOAUTH", "WRONGPASS")):
        return redis.exceptions.AuthenticationError(text)
    return redis.exceptions.ResponseError(text)


class ScriptConnection(asyncio.Protocol):
    """One connection, one command in flight at a time (the runner guarantees it)."""

    def __init__(self, params: ConnectParams) -> None:
        self._params = params
        if params.encoding is None:
            self._reader = hiredis.Reader()
        else:
            self._reader = hiredis.Reader(encoding=params.encoding, errors=params.encoding_errors)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Any] | None = None
        self._lost: BaseException | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as e:
                self._fail(redis.exceptions.InvalidResponse(f"protocol error: {e}"))
                return
            except ValueError as e:  # UnicodeDecodeError: a reply that is not text
                # Not a ConnectionError on purpose: the script ran, so no retry.
                self._fail(redis.exceptions.InvalidResponse(f"undecodable reply: {e}"))
                return
            if reply is False:
                return
            waiter, self._waiter = self._waiter, None
            if waiter is None or waiter.done():  # a reply nobody asked for: out of step
                self._fail(redis.exceptions.InvalidResponse("unexpected reply from Redis"))
                return
            waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = redis.exceptions.ConnectionError(
            f"Redis at {self._params.where()} closed the connection" + (f": {exc}" if exc else "")
        )
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._lost)

    # -- use ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, params: ConnectParams) -> ScriptConnection:
        """Connect and authenticate, select the database, name the client."""
        loop = asyncio.get_running_loop()
        conn = cls(params)
        try:
            if params.path:
                await loop.create_unix_connection(lambda: conn, params.path, ssl=params.ssl)
            else:
                await loop.create_connection(
                    lambda: conn,
                    params.host,
                    params.port,
                    ssl=params.ssl,
                    server_hostname=params.host if params.ssl else None,
                )
        except OSError as e:
            raise redis.exceptions.ConnectionError(
                f"Error connecting to {params.where()}: {e}"
            ) from e
        try:
            if params.password is not None:
                user = () if params.username is None else (params.username,)
                await conn.call("AUTH", *user, params.password)
            if params.client_name:
                await conn.call("CLIENT", "SETNAME", params.client_name)
            if params.db:
                await conn.call("SELECT", params.db)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def is_open(self) -> bool:
        transport = self._transport
        return self._lost is None and transport is not None and not transport.is_closing()

    async def call(self, *args: Any) -> Any:
        """Send one command and wait for its reply; error replies raise."""
        if self._lost is not None:
            raise self._lost
        if self._transport is None or self._transport.is_closing():
            raise redis.exceptions.ConnectionError("connection is closed")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._transport.write(hiredis.pack_command(args))
        reply = await waiter
        if isinstance(reply, hiredis.ReplyError):
            raise _error(reply)
        return reply

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        """Drop the connection at once (a half-read one must never be reused)."""
        if self._transport is not None:
            self._transport.abort()


class ScriptRunner:
    """``EVALSHA`` over a small set of idle connections, each call bounded by one timeout.

    A connection goes back to the idle set only after a whole reply was read (a
    result or an error reply); a timeout, a cancellation or a broken socket closes
    it. An idle socket the server closed meanwhile costs one retry on a fresh one.
    """

    def __init__(self, params: ConnectParams, limit: int, timeout: float) -> None:
        self.params = params
        self.timeout = timeout
        self._idle: list[ScriptConnection] = []
        self._slots = asyncio.Semaphore(limit)

    async def _connection(self) -> tuple[ScriptConnection, bool]:
        """An idle connection that still looks open (reused=True), else a new one."""
        while self._idle:
            conn = self._idle.pop()
            if conn.is_open:
                return conn, True
        return await ScriptConnection.open(self.params), False

    async def evalsha(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """``EVALSHA``, loading the script first if the server does not know it."""
        async with self._slots:
            conn: ScriptConnection | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    conn, reused = await self._connection()
                    try:
                        reply = await self._evalsha(conn, script, keys, args)
                    except redis.exceptions.ConnectionError:
                        if not reused:
                            raise
                        conn.close()
                        conn = None
                        conn = await ScriptConnection.open(self.params)
                        reply = await self._evalsha(conn, script, keys, args)
            except redis.exceptions.ResponseError:
                assert conn is not None
                self._idle.append(conn)  # a whole reply was read: the socket is fine
                raise
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            self._idle.append(conn)
            return reply

    @staticmethod
    async def _evalsha(
        conn: ScriptConnection, script: Any, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        try:
            return await conn.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await conn.call("SCRIPT", "LOAD", script.script)
            return await conn.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
