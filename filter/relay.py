"""The lockstep SMTP client towards the downstream MTA (Postfix).

One ``Upstream`` mirrors one client session: it is opened at the client's first MAIL,
forwards MAIL and RCPT as they come, sends DATA only after mailgate's verdict, and
hands the downstream's own replies back. It never completes a transaction on its own:
any error leaves the downstream without a final dot, so nothing is queued that the
client was not told about.

Why not aiosmtplib: its ``sendmail`` queues the whole transaction at once, and the
low-level calls would still need our own XCLIENT/XFORWARD handling, reply
pass-through and timeouts; the wire part is small once ``SMTPStream`` exists.

Lockstep means one reply per command, so anything the upstream says out of turn (a
reply to nothing, two replies to one command, a reply before the final dot, lines with
mixed codes, a 250 to DATA) is a protocol error that drops the connection: taken for
the reply to the next command it would shift every later answer by one, and a client
could get a 250 for a message the upstream never received.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import socket
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
MAX_REPLY_LINE = 4096  # what we read; what we pass on is cut to REPLY_LINE_OCTETS
REPLY_LINE_OCTETS = 512  # RFC 5321 4.5.3.1.5: a reply line, code and CRLF included
_CODE_CLASSES = b"2345"  # RFC 5321 4.2.1: the first digit of every reply code
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# Not passed on to the client: C0 (HT is reply text, RFC 5321 4.2), DEL, C1, and the
# Unicode line separators. Terminal escapes, NUL and a bare CR in an upstream's text
# would reach the client's terminal and logs.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def parse_reply(lines: list[bytes]) -> Reply:
    """Build a Reply from raw reply lines, keeping the upstream's text and status.

    The text is made safe to pass on (``printable``): we relay it to a client that
    trusts us, not the upstream, to speak valid SMTP.
    """
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
    # Reply.to_bytes writes "<code><sep><enhanced> <text>\r\n" for every line.
    room = REPLY_LINE_OCTETS - len("250 \r\n") - (len(enhanced) + 1 if enhanced else 0)
    return Reply(code, enhanced, "\n".join(printable(t, room) for t in texts))


def printable(text: str, room: int) -> str:
    """``text`` without control characters, cut to at most ``room`` UTF-8 octets.

    Why: the client gets the upstream's own text, but only as one well-formed reply
    line each (RFC 5321 4.5.3.1.5), and never with bytes a terminal would act on.
    """
    text = _CONTROL.sub("?", text)
    if len(text) * 4 > room:  # else it fits whatever the characters (fast path)
        raw = text.encode("utf-8")
        if len(raw) > room:
            text = raw[:room].decode("utf-8", "ignore")  # never half a character
    return text


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
        self._poller: select.poll | None = None  # the socket, for input before the final dot
        self.in_transaction = False
        self.broken = False
        self.timings: dict[str, float] = {}
        # The XFORWARD line sent at open. Postfix forgets XFORWARD attributes at the end
        # of every transaction (its mail_reset), so every MAIL after the first on this
        # connection is preceded by it again, or Postfix logs the next message (and a
        # replayed one) without orig_client and orig_queue_id.
        self._xforward_line: str | None = None
        self._mail_sent = False

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
        self._poller = _input_poller(stream)
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
                line = "XFORWARD " + " ".join(xtext.format_attributes(attrs))
                reply = await self.command("xforward", line)
                if reply.code != 250:
                    self.abort()
                    raise UpstreamError("xforward", str(reply), reply)
                self._xforward_line = line
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
    async def command(self, stage: str, line: str, *, intermediate: bool = False) -> Reply:
        """Send one command line and return the reply; refuses control characters.

        Input already waiting (a reply nobody asked for) is a protocol error, not the
        answer to this command. ``intermediate``: a 3xx reply may answer it (DATA only).
        """
        if _UNSAFE.search(line):
            raise UpstreamError(stage, "refusing to send a command with control characters")
        stream = self._require()
        if stream.buffered:  # the read buffer, no syscall: free on the normal path
            await self._unsolicited(stage, stream, f"before {line.split(' ', 1)[0]}")
        stream.write(line.encode("utf-8") + b"\r\n")
        return await self._read_reply(stage, intermediate)

    async def mail(self, address: str, params: Iterable[str]) -> Reply:
        line = _join(f"MAIL FROM:<{address}>", params)
        if self._mail_sent and self._xforward_line is not None:
            reply = await self._xforward_and(line)
        else:
            reply = await self.command("mail", line)
        self._mail_sent = True
        self.in_transaction = reply.code == 250
        return reply

    async def _xforward_and(self, mail_line: str) -> Reply:
        """XFORWARD again, then MAIL: one write when the upstream offers PIPELINING
        (RFC 2920; Postfix does), else one after the other."""
        xforward = self._xforward_line
        assert xforward is not None
        if not self.capabilities.has("PIPELINING"):
            reply = await self.command("xforward", xforward)
            if reply.code != 250:
                self.abort()
                raise UpstreamError("xforward", str(reply), reply)
            return await self.command("mail", mail_line)
        if _UNSAFE.search(mail_line):
            raise UpstreamError("mail", "refusing to send a command with control characters")
        stream = self._require()
        if stream.buffered:
            await self._unsolicited("mail", stream, "before MAIL")
        stream.write(f"{xforward}\r\n{mail_line}\r\n".encode())
        first = await self._read_reply("xforward", more_follow=True)
        reply = await self._read_reply("mail")
        if first.code != 250:
            self.abort()
            raise UpstreamError("xforward", str(first), first)
        return reply

    async def rcpt(self, address: str, params: Iterable[str]) -> Reply:
        return await self.command("rcpt", _join(f"RCPT TO:<{address}>", params))

    async def noop(self) -> Reply:
        """NOOP: resets the upstream's idle timer while a transaction waits on the client."""
        return await self.command("noop", "NOOP")

    async def data(self, chunks: Iterable[bytes]) -> Reply:
        """DATA, the dot-stuffed message, the final dot; returns the final reply.

        A 4xx/5xx answer to DATA is returned as is (e.g. 554 no valid recipients),
        except 421, which raises like every failure: stage ``data`` for the DATA
        command and the body, ``data_end`` for the reply to the final dot. Any other
        answer to DATA (RFC 5321 4.3.2 allows only 354) raises too: a 250 there is not
        the upstream taking a message it never received. So does input from the
        upstream before the dot: the dot is then never sent, nothing is queued.
        """
        go = await self.command("data", "DATA", intermediate=True)
        if go.code != 354:
            if go.code < 400:
                self.abort()
                raise UpstreamError("data", f"DATA answered {go} instead of 354", go)
            self.in_transaction = False
            return go
        stream = self._require()
        stuff = Stuffer()
        for chunk in chunks:
            stream.write(stuff(chunk))
            if stream.pending_output >= WRITE_BATCH:
                await self._drain("data")
                if stream.buffered:  # it spoke while we waited for the send buffer
                    await self._unsolicited("data", stream, "during the message body")
        # The last moment an early reply can be told from the answer to the dot. The
        # socket is asked too (one poll per message): with nothing awaited since the
        # 354, a reply in flight has not reached our buffer.
        if stream.buffered or self._input_waiting():
            await self._unsolicited("data", stream, "before the final dot")
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
        self._poller = None

    def abort(self) -> None:
        """Drop the connection at once: an unfinished transaction is discarded upstream."""
        self.broken = True
        if self._stream is not None:
            self._stream.abort()
        self._stream = None
        self._poller = None
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

    def _input_waiting(self) -> bool:
        """Bytes (or a close) from the upstream wait in the socket, not yet read."""
        return self._poller is not None and bool(self._poller.poll(0))

    async def _unsolicited(self, stage: str, stream: SMTPStream, where: str) -> None:
        """Input no command asked for: drop the connection and raise (never read it as
        a reply). The bytes go to the log; the caller counts the failure at ``stage``."""
        if stream.buffered:
            got = await stream.read_some()
        else:
            closed = _peer_gone(stream)
            if closed is not None:
                self.abort()
                raise UpstreamError(stage, f"connection {closed} by the upstream {where}")
            got = b"(waiting in the socket)"
        self.abort()
        raise UpstreamError(stage, f"unsolicited input {where}: {got[:80]!r}")

    async def _read_reply(
        self, stage: str, intermediate: bool = False, more_follow: bool = False
    ) -> Reply:
        """One reply; ``more_follow``: a pipelined command's reply may already wait."""
        stream = self._require()
        lines: list[bytes] = []
        try:
            # stream.read_timeout (set at open) bounds every wait for the upstream.
            while True:
                line = await stream.readline(MAX_REPLY_LINE)
                if (
                    len(line) < 4
                    or not line[:3].isdigit()
                    or line[0] not in _CODE_CLASSES
                    or line[3:4] not in (b" ", b"-", b"\r")
                ):
                    raise UpstreamError(stage, f"malformed reply {line[:60]!r}")
                if lines and line[:3] != lines[0][:3]:
                    # RFC 5321 4.2.1: one code for every line. Which one would it mean?
                    raise UpstreamError(
                        stage, f"malformed reply: mixed codes {lines[0][:60]!r} {line[:60]!r}"
                    )
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
        if reply.code // 100 == 3 and not intermediate:
            self.abort()  # e.g. 354 to MAIL or to the dot: not an answer we can relay
            raise UpstreamError(stage, f"unexpected intermediate reply {reply}", reply)
        if stream.buffered and not more_follow:
            # More than one reply to one command. After the dot it may be the answer
            # to the body that came early: which is the message's is unknowable, so
            # the client retries (a duplicate at worst, never a lost message).
            await self._unsolicited(stage, stream, f"after the reply {reply}")
        return reply


def _join(head: str, params: Iterable[str]) -> str:
    rest = " ".join(params)
    return f"{head} {rest}" if rest else head


def _input_poller(stream: SMTPStream) -> select.poll | None:
    """A poll object on the connection's socket (uvloop's pseudo-socket has fileno)."""
    sock = stream.transport.get_extra_info("socket") if stream.transport else None
    if sock is None:
        return None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return poller


def _peer_gone(stream: SMTPStream) -> str | None:
    """ "closed" or "reset" when what waits in the socket is the end of the connection,
    not bytes (a peek on a duplicate of the descriptor; the failure path only)."""
    sock = stream.transport.get_extra_info("socket") if stream.transport else None
    if sock is None:
        return None
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            data = dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except ConnectionResetError:
        return "reset"
    except OSError:
        return None
    return "closed" if data == b"" else None


def _set_nodelay(stream: SMTPStream) -> None:
    import socket

    if stream.transport is None:
        return
    sock = stream.transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
