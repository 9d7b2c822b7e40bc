"""A byte stream over an asyncio transport, shaped for SMTP on both sides.

Why not asyncio.StreamReader: SMTP needs to push back bytes read past the end of
DATA (pipelined commands after the final dot), to drop buffered plaintext on
STARTTLS (CVE-2011-0411 command injection), and to read lines with a hard length
limit without buffering an attacker's endless line. This class does those three
things and nothing else; it knows no SMTP verbs.
"""

from __future__ import annotations

import asyncio
import math
import ssl

HIGH_WATER = 256 * 1024  # pause reading when this much is buffered and unread
# Replies queued but not yet handed to the transport: past this many a client-facing
# stream flushes before reading the next command, so the transport's flow control sees
# them (replies are small: this bounds the queue to tens of KB).
OUT_MAX_WRITES = 256
NO_CAP = 1 << 62
LINGER = 30.0  # close() with unsent output: abort after this long (no read_timeout set)
TIMER_SLACK = 0.01  # a deadline this much earlier than the armed timer does not re-arm it


class StreamClosed(ConnectionError):
    """The peer closed the connection (or it broke) while we waited for bytes."""


class LineTooLong(ValueError):
    """A line exceeded the limit; its bytes up to the next LF have been discarded."""


class SMTPStream(asyncio.Protocol):
    """Buffered reader and writer for one connection.

    ``client=True`` for the side that faces an SMTP client: an EOF from it closes only
    its sending side (its replies still go out, RFC 5321 4.1.1.10), and while it does
    not read its replies no further command is read from it (bounded memory).
    """

    def __init__(self, client: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self._client = client
        self._tls = False
        self._buf = bytearray()
        self._eof = False  # no more input will come
        self._lost = False  # the connection is gone: no output either
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        # readline holds back when len(_out) exceeds this: -1 while the transport's
        # buffer is over its high-water mark. One comparison on the per-command path.
        self._out_cap = OUT_MAX_WRITES if client else NO_CAP
        self._loop = asyncio.get_running_loop()
        self.connected = self._loop.create_future()
        # Idle timeout for every wait for input (None: wait forever). One timer per
        # connection, pushed forward lazily: a wait costs a clock read, not a TimerHandle.
        self.read_timeout: float | None = None
        # Loop time no wait for input may outlast, however recent the last byte (the
        # session lifetime); only applies while read_timeout is set.
        self.session_deadline = math.inf
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        self.transport = transport  # type: ignore[assignment]
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._wake()
        if len(self._buf) > HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        """A client that half-closes after its last command still reads the replies:
        keep our side open until close() has flushed them (TLS cannot half-close)."""
        self._eof = True
        self._wake()
        return self._client and not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = True
        self._out.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._wake()
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_exception(StreamClosed("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._client:
            self._out_cap = -1

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._client:
            self._out_cap = OUT_MAX_WRITES
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._wake()  # a client-facing stream may be holding back its next command

    # -- reading -------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        """Wait for more input; flushes pending output first (we are about to block).

        May return without new input (the client drained its replies); callers loop.
        """
        if self._eof:
            raise StreamClosed("connection closed by peer")
        self.flush()
        if self._write_paused and self._client:
            await self._hold_back()
            return
        if self._paused and self.transport:
            self._paused = False
            self.transport.resume_reading()
        await self._block()

    async def _hold_back(self) -> None:
        """The client does not read its replies: read none of its commands until it does.

        Otherwise a pipelining client that never reads grows the transport's buffer
        without bound. Reading pauses too, so TCP pushes back on the client; the read
        timeout (idle, and the session deadline) still ends a client that never drains.
        """
        self.flush()
        while self._write_paused:
            if self._lost:
                raise StreamClosed("connection lost")
            if not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
            await self._block()

    async def _block(self) -> None:
        """Wait for a wake-up (input, EOF, drained output) or the read deadline."""
        self._waiter = waiter = self._loop.create_future()
        if self.read_timeout is not None:
            deadline = self._loop.time() + self.read_timeout
            if deadline > self.session_deadline:
                deadline = self.session_deadline
            self._deadline = deadline
            # The timer is pushed forward lazily (_on_timer); it is re-armed only when
            # the deadline moves earlier, i.e. near the end of the session.
            if self._timer is None or deadline < self._timer_at - TIMER_SLACK:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer_at = deadline
                self._timer = self._loop.call_at(deadline, self._on_timer)
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done() or self.read_timeout is None:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        w.set_exception(TimeoutError())

    @property
    def buffered(self) -> int:
        return len(self._buf)

    async def readline(self, limit: int) -> bytes:
        """One line including its LF. Raises LineTooLong past ``limit`` bytes."""
        if len(self._out) > self._out_cap:
            await self._hold_back()
        start = 0
        while True:
            i = self._buf.find(b"\n", start)
            if i >= 0:
                if i + 1 > limit:
                    del self._buf[: i + 1]
                    raise LineTooLong(limit)
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                return line
            if len(self._buf) > limit:
                await self._discard_line()
                raise LineTooLong(limit)
            start = len(self._buf)
            await self._wait()

    async def _discard_line(self) -> None:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                del self._buf[: i + 1]
                return
            self._buf.clear()
            await self._wait()

    async def read_some(self) -> bytes:
        """Whatever is buffered (waiting for at least one byte)."""
        while not self._buf:
            await self._wait()
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the buffer (read past the end of DATA)."""
        if data:
            self._buf[0:0] = data

    def discard_buffer(self) -> int:
        """Drop unread bytes (plaintext pipelined after STARTTLS); return how many."""
        n = len(self._buf)
        self._buf.clear()
        return n

    # -- writing ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue bytes; they go out in one send when the stream next waits or flushes."""
        self._out.append(data)

    @property
    def pending_output(self) -> int:
        return sum(len(b) for b in self._out)

    def flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is over its high-water mark: ``drain`` would wait."""
        return self._write_paused

    async def drain(self) -> None:
        self.flush()
        if not self._write_paused:
            return
        if self._eof:
            raise StreamClosed("connection lost")
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def close(self) -> None:
        """Close after the pending output is sent; abort if the peer will not take it.

        A transport closes only once its buffer is sent: a peer that never reads would
        hold the socket (and the buffer) forever. It gets read_timeout to read it.
        """
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
            if t.get_write_buffer_size() and self._linger is None:
                self._linger = self._loop.call_later(self.read_timeout or LINGER, t.abort)

    def abort(self) -> None:
        self._out.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def start_tls(
        self, context: ssl.SSLContext, server_side: bool, handshake_timeout: float
    ) -> None:
        """Upgrade the connection in place; the protocol (this object) stays."""
        assert self.transport is not None
        self.flush()
        self._tls = True  # from here on EOF reaches us through the TLS layer
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=server_side,
            ssl_handshake_timeout=handshake_timeout,
        )
        if new is None:
            raise StreamClosed("TLS handshake failed")
        self.transport = new

    def peername(self) -> tuple[str, int]:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        return (str(peer[0]), int(peer[1])) if peer else ("", 0)

    def sockname(self) -> tuple[str, int]:
        assert self.transport is not None
        sock = self.transport.get_extra_info("sockname")
        return (str(sock[0]), int(sock[1])) if sock else ("", 0)
