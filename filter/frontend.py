"""The SMTP server side: bytes in, commands out, replies back (L5).

Owns everything about the client connection that is not a decision: PROXY header,
connection limits, the greeting and the pregreet test, line limits, timeouts, the
error limit, STARTTLS, reading DATA in bulk, and writing replies. The meaning of each
command lives in ``session``.

Why not aiosmtpd: it reads DATA a line at a time (most of a naive relay's CPU), sends
no 421 on timeouts, passes bare LF through and has no XFORWARD; each would need
overriding its internals. See docs/design-notes.md for the measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from filter import replies
from filter.limits import ConnectionLimiter
from filter.logs import event
from filter.message import MessageBuffer
from filter.metrics import Metrics
from filter.model import ClientInfo
from filter.netaddr import ip_in, normalize_ip
from filter.pipeline import Pipeline
from filter.policy.schema import Policy
from filter.proxyproto import MAX_HEADER, ProxyProtocolError, parse_proxy_header
from filter.replies import Reply
from filter.resolver import Resolver
from filter.session import Session, UpstreamPort, new_session_id
from filter.smtpdata import DataReader
from filter.smtpstream import LineTooLong, SMTPStream, StreamClosed
from filter.smtpsyntax import SyntaxProblem, parse_command
from filter.store import Store

log = logging.getLogger("mailgate.smtp")

COMMAND_LINE_LIMIT = 2048  # RFC 5321 says 512; extensions and long paths need more (Postfix: 2048)
PROXY_TIMEOUT = 10.0
# A header field name (RFC 5322 ftext: printable US-ASCII but ":"), for header lines
# sent as commands.
_HEADER_NAME = re.compile(rb"[!-9;-~]+")
REFUSED_VERBS = {"VRFY", "EXPN", "TURN", "ETRN", "BDAT"}
# Commands that move no mail, limited as Postfix's smtpd_junk_command_limit does.
JUNK_VERBS = frozenset({"EHLO", "HELO", "RSET", "NOOP", "HELP", "VRFY", "ETRN"})


class SessionTimeout(Exception):
    """The command timeout or the total session lifetime ran out."""


class Closing(Exception):
    """The session must end now (421 already sent, or the client is gone)."""


@dataclass
class Runtime:
    """What every session starts from; swapped as a whole on reload."""

    policy: Policy
    pipeline: Pipeline
    tls: ssl.SSLContext | None
    generation: int = 1
    resolver: Resolver | None = None
    store: Store | None = None


class Frontend:
    """Accepts connections and runs one session per connection."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        metrics: Metrics,
        limiter: ConnectionLimiter,
        upstream_factory: Callable[[Policy], UpstreamPort],
        upstream_extensions: Callable[[], Mapping[str, str]],
    ) -> None:
        self._runtime = runtime
        self.metrics = metrics
        self.limiter = limiter
        self._upstream_factory = upstream_factory
        self._upstream_extensions = upstream_extensions
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self._idle: dict[asyncio.Task[None], bool] = {}

    def protocol_factory(self) -> SMTPStream:
        stream = SMTPStream(client=True)
        loop = asyncio.get_running_loop()
        fut = stream.connected

        def start(_: object) -> None:
            task = loop.create_task(self._serve(stream))
            self.tasks.add(task)
            task.add_done_callback(self._forget)

        fut.add_done_callback(start)
        return stream

    def _forget(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._idle.pop(task, None)

    def interrupt_idle(self) -> None:
        """Draining: end sessions that sit between transactions (they get 421 4.3.2)."""
        self.draining = True
        for task, idle in list(self._idle.items()):
            if idle:
                task.cancel()

    # -- one connection ----------------------------------------------------------------
    async def _serve(self, stream: SMTPStream) -> None:
        rt = self._runtime()
        policy = rt.policy
        _set_nodelay(stream)
        peer_ip, peer_port = stream.peername()
        with contextlib.suppress(ValueError):
            peer_ip = normalize_ip(peer_ip)
        ip, port, source = peer_ip, peer_port, "socket"
        if policy.server.proxy_protocol:
            allowed = policy.server.proxy_hosts
            if allowed and not ip_in(peer_ip, allowed):
                # Anyone else could name any client address in a header of its own.
                event(
                    log,
                    "proxy_refused",
                    logging.WARNING,
                    client=peer_ip,
                    reason="peer is not in server.proxy_hosts",
                )
                self.metrics.count_connection("proxy_error")
                stream.abort()
                return
            # The client is unknown until the header is in, but the connection already
            # holds a socket: it counts in max_connections meanwhile, or anyone reaching
            # the port could hold unlimited silent connections past the limit.
            if not self.limiter.reserve():
                self._refuse(stream, peer_ip, "refused_limit")
                return
            timeout = min(PROXY_TIMEOUT, policy.server.command_timeout)
            try:
                got = await self._read_proxy_header(stream, timeout)
            finally:
                self.limiter.unreserve()
            if got is None:
                self.metrics.count_connection("proxy_error")
                stream.abort()
                return
            if got[0]:
                ip, port, source = got[0], got[1], "proxy"
        # In filter mode every session comes from Postfix: its address has no limit of its
        # own (the real client is only known after XFORWARD; Postfix enforces its own).
        exempt = ip_in(peer_ip, policy.server.xforward_hosts) and source == "socket"
        refusal = self.limiter.acquire(ip, per_ip=not exempt)
        if refusal is not None:
            self._refuse(stream, ip, refusal)
            return
        client = ClientInfo(ip=ip, port=port, session_id=new_session_id(), source=source)
        session = Session(
            client,
            policy,
            rt.pipeline,
            lambda: self._upstream_factory(policy),
            self.metrics,
            self._upstream_extensions,
            rt.resolver,
            rt.store,
        )
        # XFORWARD is believed from the host that sends it: behind a balancer that is the
        # client the PROXY header names, never the balancer (a trusted address).
        session.allow_xforward(ip)
        conn = _Connection(self, stream, session, rt)
        self.metrics.count_connection("accepted")
        self.metrics.active_sessions.inc()
        started = time.monotonic()
        try:
            await conn.run()
        finally:
            self.limiter.release(ip)
            self.metrics.active_sessions.dec()
            self.metrics.session_duration.observe(time.monotonic() - started)
            session.abort()
            stream.close()
            event(
                log,
                "session_end",
                session=client.session_id,
                client=client.ip,
                helo=client.helo,
                messages=session.messages,
                errors=session.errors,
                seconds=round(time.monotonic() - started, 3),
                end=conn.end_reason,
            )

    def _refuse(self, stream: SMTPStream, ip: str, refusal: str) -> None:
        self.metrics.count_connection(refusal)
        reply = (
            replies.TOO_MANY_CONNECTIONS if refusal == "refused_limit" else replies.TOO_MANY_FROM_IP
        )
        stream.write(reply.to_bytes())
        stream.close()
        event(log, "connection_refused", client=ip, reason=refusal)

    async def _read_proxy_header(
        self, stream: SMTPStream, within: float
    ) -> tuple[str | None, int] | None:
        buf = b""
        try:
            async with asyncio.timeout(within):
                while True:
                    buf += await stream.read_some()
                    parsed = parse_proxy_header(buf)
                    if parsed is not None:
                        header, used = parsed
                        stream.unread(buf[used:])
                        if header.src is None:
                            return None, 0
                        return normalize_ip(header.src[0]), header.src[1]
                    if len(buf) > MAX_HEADER:
                        raise ProxyProtocolError("header too long")
        except (TimeoutError, StreamClosed, ProxyProtocolError, ValueError) as exc:
            reason = proxy_refusal_reason(exc, len(buf), within)
            event(log, "proxy_refused", logging.WARNING, client=stream.peername()[0], reason=reason)
            return None


def proxy_refusal_reason(exc: Exception, received: int, timeout: float = PROXY_TIMEOUT) -> str:
    """Why a PROXY header was refused, never empty: a timeout and a closed connection
    carry no text of their own, and an admin must tell a silent or misconfigured
    balancer from a client that speaks SMTP first."""
    if isinstance(exc, TimeoutError):
        return f"no complete header within {timeout:g}s ({received} bytes received)"
    if isinstance(exc, StreamClosed):
        return f"connection closed before a complete header ({received} bytes received)"
    return str(exc) or type(exc).__name__


class _Connection:
    """The command loop of one session."""

    def __init__(self, fe: Frontend, stream: SMTPStream, session: Session, rt: Runtime) -> None:
        self.fe = fe
        self.stream = stream
        self.session = session
        self.rt = rt
        self.policy = session.policy
        srv = self.policy.server
        self._forbidden_words = frozenset(w.upper() for w in srv.forbidden_commands)
        self.deadline = time.monotonic() + srv.session_timeout
        # The stream enforces it on every wait for input, even inside a command line
        # trickled a byte at a time (each byte would restart the idle timeout).
        stream.session_deadline = asyncio.get_running_loop().time() + srv.session_timeout
        self.end_reason = "quit"
        self.task = asyncio.current_task()

    def send(self, reply: Reply, stage: str = "other") -> None:
        self.stream.write(reply.to_bytes())
        self.fe.metrics.count_reply(stage, reply.code)

    def _set_idle(self, idle: bool) -> None:
        if self.task is not None:
            self.fe._idle[self.task] = idle

    async def run(self) -> None:
        session = self.session
        try:
            session.start_connect_checks()
            if not await self._greet():
                return
            while True:
                idle = session.txn is None
                if idle and self.fe.draining:
                    await self._last_word()
                    return
                self._set_idle(idle)
                try:
                    line: bytes | None = await self._readline()
                except LineTooLong:
                    # An error like any other: it counts toward the limit below.
                    self.send(session._error(replies.LINE_TOO_LONG))
                    line = None
                finally:
                    self._set_idle(False)
                if line is not None and not await self._dispatch(line):
                    return
                if session.errors >= self.policy.server.max_errors:
                    self.send(replies.TOO_MANY_ERRORS)
                    self.end_reason = "too_many_errors"
                    return
        except SessionTimeout:
            self.send(replies.TIMEOUT)
            self.end_reason = "timeout"
        except StreamClosed:
            self.end_reason = "client_gone"
        except asyncio.CancelledError:
            # Draining (idle session) or the grace period ran out.
            self.send(replies.SHUTTING_DOWN)
            self.end_reason = "shutdown"
        except Closing:
            pass
        except Exception:
            log.exception("session=%s internal error", session.client.session_id)
            self.send(Reply(421, "4.3.0", "Internal error, closing connection"))
            self.end_reason = "internal_error"
        finally:
            if self.end_reason == "quit":
                # The client has its 221 and goes now, as from Postfix; the upstream's
                # own QUIT exchange (up to its timeout) is no reason to keep it waiting.
                self.stream.close()
                await _quietly(session.close())
            else:
                session.abort()

    async def _last_word(self) -> None:
        """Draining after a transaction: a QUIT already on its way gets 221, else 421."""
        with contextlib.suppress(TimeoutError, LineTooLong, StreamClosed):
            async with asyncio.timeout(1.0):
                line = await self.stream.readline(COMMAND_LINE_LIMIT)
                if line.strip().upper() == b"QUIT":
                    self.send(replies.closing(self.session.hostname))
                    self.end_reason = "quit"
                    return
        self.send(replies.SHUTTING_DOWN)
        self.end_reason = "shutdown"

    def _timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SessionTimeout
        return min(self.policy.server.command_timeout, left)

    async def _readline(self) -> bytes:
        self.stream.read_timeout = self._timeout()
        try:
            return await self.stream.readline(COMMAND_LINE_LIMIT)
        except TimeoutError as exc:
            raise SessionTimeout from exc

    async def _greet(self) -> bool:
        srv = self.policy.server
        hostname = self.session.hostname
        if srv.greet_pause > 0:
            self.stream.write(f"220-{hostname} ESMTP mailgate\r\n".encode())
            try:
                async with asyncio.timeout(srv.greet_pause):
                    await self.stream.read_some()
            except TimeoutError:
                pass
            else:
                self.fe.metrics.count_connection("pregreet")
                self.send(replies.PREGREET, "connect")
                event(
                    log,
                    "pregreet",
                    session=self.session.client.session_id,
                    client=self.session.client.ip,
                )
                self.end_reason = "pregreet"
                return False
        self.send(replies.banner(hostname), "connect")
        return True

    def _forbidden(self, line: bytes) -> bool:
        """Non-SMTP input: answer as Postfix does, close, and tell the caller to stop.

        An HTTP request (a browser tricked into POSTing to port 25 could carry SMTP in
        its body), a proxy probe, a header line sent as a command, binary garbage: each
        line answered 500 would let the next run, so the session ends at the first.
        Known SMTP verbs never match (they start with a letter and have no colon).
        """
        word = line.lstrip(b" \t").split(None, 1)[0] if line.strip() else b""
        if not word:
            return False  # an empty line is a syntax error, nothing worse
        first = word[:1]
        bogus = not first.isalpha()  # bytes.isalpha: ASCII letters only
        header = word.endswith(b":") and _HEADER_NAME.fullmatch(word[:-1]) is not None
        listed = word.decode("ascii", "replace").upper() in self._forbidden_words
        if not (bogus or header or listed):
            return False
        self.send(replies.FORBIDDEN_COMMAND)
        event(
            log,
            "forbidden_command",
            logging.WARNING,
            session=self.session.client.session_id,
            client=self.session.client.ip,
            command=line[:100].rstrip(b"\r\n").decode("ascii", "backslashreplace"),
        )
        self.end_reason = "forbidden_command"
        return True

    async def _dispatch(self, line: bytes) -> bool:
        """Handle one command line; False ends the session."""
        s = self.session
        if self._forbidden(line):
            return False
        if not line.endswith(b"\r\n") and b"\r" in line:
            self.send(s._error(replies.BARE_NEWLINE_COMMAND))
            return True
        try:
            cmd = parse_command(line)
        except SyntaxProblem as exc:
            self.send(s._error(replies.SYNTAX_ERROR.with_text(f"Error: {exc}")))
            return True
        verb, arg = cmd.verb, cmd.arg
        if verb in JUNK_VERBS:
            s.count_junk()
        if verb in ("EHLO", "HELO"):
            self.send(await s.helo(verb, arg, self.rt.tls is not None), "helo")
        elif verb == "MAIL":
            self.send(await s.mail(arg), "mail")
        elif verb == "RCPT":
            self.send(await s.rcpt(arg), "rcpt")
        elif verb == "DATA":
            if arg:
                self.send(s._error(replies.syntax("DATA")), "data")
                return True
            reply = s.data_start()
            self.send(reply, "data")
            if reply.code == 354:
                return await self._receive_data()
        elif verb == "RSET":
            if arg:  # RFC 5321 4.1.1.5: RSET takes no argument; Postfix answers 501 too
                self.send(s._error(replies.syntax("RSET")))
                return True
            self.send(await s.rset())
        elif verb == "NOOP":
            self.send(replies.OK)
        elif verb == "QUIT":
            self.send(replies.closing(s.hostname))
            self.end_reason = "quit"  # run() closes the client, then the upstream
            return False
        elif verb == "STARTTLS":
            return await self._starttls(arg)
        elif verb == "XFORWARD":
            self.send(s.xforward(arg), "helo")
        elif verb == "HELP":
            self.send(replies.HELP)
        elif verb == "AUTH":
            self.send(s._error(replies.NO_AUTH))
        elif verb in REFUSED_VERBS:
            self.send(s._error(replies.NOT_IMPLEMENTED))
        else:
            self.send(s._error(replies.SYNTAX_ERROR))
        return True

    async def _receive_data(self) -> bool:
        s = self.session
        srv = self.policy.server
        reader = DataReader(srv.max_message_size)
        message = MessageBuffer()
        prefetched = False
        try:
            while not reader.done:
                self.stream.read_timeout = self._timeout()
                try:
                    chunk = await self.stream.read_some()
                except TimeoutError as exc:
                    raise SessionTimeout from exc
                content = reader.feed(chunk)
                if content:
                    message.write(content)
                    if not prefetched and message.header_complete:
                        prefetched = True
                        s.prefetch(message)
        except BaseException:
            message.close()
            raise
        self.stream.unread(reader.leftover)
        self.send(await s.data_end(message, reader.problems), "data")
        return True

    async def _starttls(self, arg: str) -> bool:
        s = self.session
        ctx = self.rt.tls
        if ctx is None:
            self.send(s._error(replies.NOT_IMPLEMENTED))
            return True
        if s.client.tls:
            self.send(s._error(replies.BAD_SEQUENCE))
            return True
        if arg:
            self.send(s._error(replies.syntax("STARTTLS")))
            return True
        self.send(replies.STARTTLS_READY, "helo")
        dropped = self.stream.discard_buffer()
        if dropped:
            log.warning(
                "session=%s dropped %d bytes pipelined after STARTTLS (injection attempt?)",
                s.client.session_id,
                dropped,
            )
        try:
            await self.stream.start_tls(ctx, server_side=True, handshake_timeout=self._timeout())
        except (OSError, ssl.SSLError, StreamClosed, TimeoutError) as exc:
            # Some carry no text (a client gone mid-handshake): name the exception then.
            why = str(exc) or f"{type(exc).__name__} (connection closed during the handshake)"
            log.info("session=%s TLS handshake failed: %s", s.client.session_id, why)
            self.end_reason = "tls_failed"
            raise Closing from exc
        s.client.tls = True
        await s.rset()
        s.helo_seen = False  # RFC 3207: the client must EHLO again
        return True


async def _quietly(coro: object) -> None:
    try:
        await coro  # type: ignore[misc]
    except Exception:
        log.debug("ignored error while closing", exc_info=True)


def _set_nodelay(stream: SMTPStream) -> None:
    import socket

    if stream.transport is None:
        return
    sock = stream.transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
