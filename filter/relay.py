"""The lockstep SMTP client towards the downstream MTA (Postfix).

One ``Upstream`` mirrors one client session: it is opened at the client's first MAIL,
forwards MAIL and RCPT as they come, sends DATA only after mailgate's verdict, and
hands the downstream's own replies back. It never completes a transaction on its own:
any error leaves the downstream without a final dot, so nothing is queued that the
client was not told about.

Why not aiosmtplib: its ``sendmail`` queues the whole transaction at once, and the
low-level calls would still need our own XCLIENT/XFORWARD handling, reply
pass-through and timeouts; the wire part is small once ``SMTPStream`` exists.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from filter import xtext
from filter.model import UpstreamError
from filter.replies import Reply
from filter.smtpdata import Stuffer
from filter.smtpstream import LineTooLong, SMTPStream, StreamClosed

MAX_REPLY_LINES = 100
WRITE_BATCH = 256 * 1024  # flush the body to the upstream in sends of about this size
MAX_REPLY_LINE = 4096
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def parse_reply(lines: list[bytes]) -> Reply:
    """Build a Reply from raw reply lines, keeping the upstream's text and status."""
    code = int(lines[0][:3])
    texts: list[str] = []
    enhanced = ""
    for i, raw in enumerate(lines):
        text = raw[4:].rstrip(b"\r\n").decode("utf-8", "replace")
        first, _, rest = text.partition(" ")
        m = _ENHANCED.match(first)
        if m and m.group(1) == str(code)[0]:
            if i == 0:
                enhanced = first
            text = rest
        texts.append(text)
    return Reply(code, enhanced, "\n".join(texts))


@dataclass
class UpstreamCapabilities:
    """What the upstream advertised in EHLO, keyword -> parameter string."""

    extensions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: Reply) -> UpstreamCapabilities:
        ext: dict[str, str] = {}
        for line in reply.lines()[1:]:
            key, _, params = line.strip().partition(" ")
            if key:
                ext[key.upper()] = params
        return cls(ext)

    def has(self, name: str) -> bool:
        return name.upper() in self.extensions

    def params(self, name: str) -> set[str]:
        return {p.upper() for p in self.extensions.get(name.upper(), "").split()}


class Upstream:
    """One SMTP client session to the downstream MTA."""

    def __init__(
        self,
        host: str,
        port: int,
        helo_name: str,
        timeout: float,
        connect_timeout: float,
        on_capabilities: Callable[[Upstream], None] | None = None,
    ) -> None:
        self._on_capabilities = on_capabilities
        self.host = host
        self.port = port
        self.helo_name = helo_name
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.capabilities = UpstreamCapabilities()
        self.greeting: Reply | None = None
        self._stream: SMTPStream | None = None
        self.in_transaction = False
        self.broken = False
        self.timings: dict[str, float] = {}

    # -- connection ------------------------------------------------------------
    async def open(
        self,
        xclient: Mapping[str, str] | None = None,
        xforward: Mapping[str, str] | None = None,
    ) -> None:
        """Connect, EHLO, and introduce the real client with XCLIENT and/or XFORWARD."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, stream = await loop.create_connection(SMTPStream, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self.broken = True
            raise UpstreamError("connect", str(exc) or type(exc).__name__) from exc
        _set_nodelay(stream)
        stream.read_timeout = self.timeout
        self._stream = stream
        greeting = await self._read_reply("greeting")
        if greeting.code != 220:
            self.abort()
            raise UpstreamError("greeting", str(greeting), greeting)
        self.greeting = greeting
        await self._ehlo()
        if xclient and self.capabilities.has("XCLIENT"):
            allowed = self.capabilities.params("XCLIENT")
            attrs = {k: v for k, v in xclient.items() if k in allowed}
            reply = await self.command(
                "xclient", "XCLIENT " + " ".join(xtext.format_attributes(attrs))
            )
            # Postfix answers XCLIENT with a fresh 220 greeting; smtp-sink with 250.
            if reply.code not in (220, 250):
                self.abort()
                raise UpstreamError("xclient", str(reply), reply)
            # After XCLIENT the upstream takes the HELO name from the next EHLO, so that
            # EHLO carries the client's own name (as nginx's mail proxy does).
            helo = xclient.get("HELO", "")
            await self._ehlo(helo if helo and not helo.startswith("[UNAVAIL") else None)
        if xforward and self.capabilities.has("XFORWARD"):
            allowed = self.capabilities.params("XFORWARD")
            attrs = {k: v for k, v in xforward.items() if k in allowed}
            if attrs:
                reply = await self.command(
                    "xforward", "XFORWARD " + " ".join(xtext.format_attributes(attrs))
                )
                if reply.code != 250:
                    self.abort()
                    raise UpstreamError("xforward", str(reply), reply)
        self.timings["connect"] = time.monotonic() - t0

    async def _ehlo(self, name: str | None = None) -> None:
        reply = await self.command("ehlo", f"EHLO {name or self.helo_name}")
        if reply.code != 250:
            self.abort()
            raise UpstreamError("ehlo", str(reply), reply)
        self.capabilities = UpstreamCapabilities.from_reply(reply)
        if self._on_capabilities is not None:
            self._on_capabilities(self)

    @property
    def is_open(self) -> bool:
        return self._stream is not None and not self._stream.closed and not self.broken

    # -- commands ----------------------------------------------------------------
    async def command(self, stage: str, line: str) -> Reply:
        """Send one command line and return the reply; refuses control characters."""
        if _UNSAFE.search(line):
            raise UpstreamError(stage, "refusing to send a command with control characters")
        stream = self._require()
        stream.write(line.encode("utf-8") + b"\r\n")
        return await self._read_reply(stage)

    async def mail(self, address: str, params: Iterable[str]) -> Reply:
        reply = await self.command("mail", _join(f"MAIL FROM:<{address}>", params))
        self.in_transaction = reply.code == 250
        return reply

    async def rcpt(self, address: str, params: Iterable[str]) -> Reply:
        return await self.command("rcpt", _join(f"RCPT TO:<{address}>", params))

    async def data(self, chunks: Iterable[bytes]) -> Reply:
        """DATA, the dot-stuffed message, the final dot; returns the final reply.

        A non-354 answer to DATA is returned as is (e.g. 554 no valid recipients),
        except 421, which raises like every failure: stage ``data`` for the DATA
        command and the body, ``data_end`` for the reply to the final dot.
        """
        go = await self.command("data", "DATA")
        if go.code != 354:
            self.in_transaction = False
            return go
        stream = self._require()
        stuff = Stuffer()
        for chunk in chunks:
            stream.write(stuff(chunk))
            if stream.pending_output >= WRITE_BATCH:
                await self._drain("data")
        stream.write(b".\r\n")  # small messages go out in one send with the dot
        reply = await self._read_reply("data_end")
        self.in_transaction = False
        return reply

    async def rset(self) -> None:
        """End a transaction that must not complete; break the session if RSET fails."""
        if not self.is_open:
            return
        try:
            reply = await self.command("rset", "RSET")
        except UpstreamError:
            self.abort()
            return
        if reply.code != 250:
            self.abort()
        self.in_transaction = False

    async def quit(self) -> None:
        if not self.is_open:
            self.abort()
            return
        try:
            async with asyncio.timeout(min(self.timeout, 5.0)):
                await self.command("quit", "QUIT")
        except (UpstreamError, TimeoutError):
            pass
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None

    def abort(self) -> None:
        """Drop the connection at once: an unfinished transaction is discarded upstream."""
        self.broken = True
        if self._stream is not None:
            self._stream.abort()
        self._stream = None
        self.in_transaction = False

    # -- wire ------------------------------------------------------------------------
    def _require(self) -> SMTPStream:
        if self._stream is None or self.broken:
            raise UpstreamError("state", "not connected")
        return self._stream

    async def _drain(self, stage: str) -> None:
        stream = self._require()
        stream.flush()
        if not stream.write_paused:
            return  # the usual case: nothing to wait for, no timer to arm
        try:
            async with asyncio.timeout(self.timeout):
                await stream.drain()
        except (TimeoutError, StreamClosed) as exc:
            self.abort()
            raise UpstreamError(stage, "write failed: " + (str(exc) or "timeout")) from exc

    async def _read_reply(self, stage: str) -> Reply:
        stream = self._require()
        lines: list[bytes] = []
        try:
            # stream.read_timeout (set at open) bounds every wait for the upstream.
            while True:
                line = await stream.readline(MAX_REPLY_LINE)
                if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r"):
                    raise UpstreamError(stage, f"malformed reply {line[:60]!r}")
                lines.append(line)
                if line[3:4] != b"-":
                    break
                if len(lines) >= MAX_REPLY_LINES:
                    raise UpstreamError(stage, "reply too long")
        except TimeoutError as exc:
            self.abort()
            raise UpstreamError(stage, f"timeout after {self.timeout:g}s") from exc
        except (StreamClosed, LineTooLong, UpstreamError) as exc:
            self.abort()
            if isinstance(exc, UpstreamError):
                raise
            raise UpstreamError(stage, str(exc) or type(exc).__name__) from exc
        reply = parse_reply(lines)
        if reply.code == 421:
            # RFC 5321 3.8: the upstream is closing the channel. A failure like a lost
            # connection, raised here where the stage is known (DATA or the final dot).
            self.abort()
            raise UpstreamError(stage, f"closing: {reply}", reply)
        return reply


def _join(head: str, params: Iterable[str]) -> str:
    rest = " ".join(params)
    return f"{head} {rest}" if rest else head


def _set_nodelay(stream: SMTPStream) -> None:
    import socket

    if stream.transport is None:
        return
    sock = stream.transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
