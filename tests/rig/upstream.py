"""A scriptable, fault-injecting SMTP server standing in for Postfix behind mailgate.

Plain asyncio streams rather than aiosmtpd: tests need the DATA bytes exactly as they
crossed the wire (dot-stuffing, bare CR/LF) and need to misbehave at any stage, which a
correct server library makes hard.

Stages (keys of ``replies``, ``delay`` and ``drop``): ``connect`` (banner), ``ehlo``,
``helo``, ``xclient``, ``xforward``, ``mail``, ``rcpt``, ``data`` (the 354), ``data_mid``
(drop only: after the first DATA line), ``data_end``, ``rset``, ``noop``, ``quit``.

Usage in an async test (same loop)::

    up = ScriptedUpstream(rcpt={"nobody@example.test": "550 5.1.1 no such user"})
    await up.start()
    ...  # point mailgate at up.address
    up.script(data_end="451 4.3.0 try later", delay={"data_end": 3.0})
    assert up.transactions[0].rcpts == ["bob@example.test"]
    await up.aclose()

From a subprocess-based test: ``up.start_in_thread()`` ... ``up.stop()``.
A reply starting with ``421`` closes the connection after it is sent, like Postfix.

Misbehaving on purpose (a broken or hostile MTA):

* ``Raw("250-a\\r\\n550 b\\r\\n")`` as a reply is sent byte for byte (mixed codes, bad syntax);
* ``unsolicited={"data_end": "250 again"}`` sends a reply nobody asked for right after
  that stage's own one, in the same write; at ``data_mid`` after the first DATA line
  (before the dot). ``unsolicited_delay={"data_end": 0.2}`` sends it that much later;
* ``stall={"data_mid": 1.0}`` stops reading for that long after the stage (the client's
  sends then block once the socket buffers are full; ``rcvbuf`` makes those small).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_EXTENSIONS = (
    "PIPELINING",
    "SIZE 52428800",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "XCLIENT NAME ADDR PROTO HELO",
    "XFORWARD NAME ADDR PROTO HELO SOURCE",
)
STAGES = frozenset(
    {
        "connect",
        "ehlo",
        "helo",
        "xclient",
        "xforward",
        "mail",
        "rcpt",
        "data",
        "data_mid",
        "data_end",
        "rset",
        "noop",
        "quit",
    }
)
_ids = itertools.count(1)


@dataclass
class Transaction:
    """One DATA transaction as the upstream saw it."""

    session_id: int
    mail_from: str
    mail_params: list[str]
    rcpts: list[str]  # accepted recipients only
    rcpt_params: list[list[str]]
    rejected_rcpts: list[str]
    data: bytes  # wire bytes after 354, up to (not incl.) the final ".\r\n"; still dot-stuffed
    reply: str  # what we answered at end of data
    queue_id: str | None
    helo: str | None
    xclient: dict[str, str]
    xforward: dict[str, str]

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("2")

    @property
    def message(self) -> bytes:
        """The message with dot-stuffing undone (line ends untouched)."""
        lines = self.data.split(b"\n")
        return b"\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


@dataclass
class Session:
    """One connection: every command line verbatim, plus what XCLIENT/XFORWARD said."""

    id: int
    peer: tuple[str, int]
    commands: list[bytes] = field(default_factory=list)
    helo: str | None = None
    xclient: list[dict[str, str]] = field(default_factory=list)
    xforward: list[dict[str, str]] = field(default_factory=list)
    closed: bool = False

    def verbs(self) -> list[str]:
        return [c.split(b" ", 1)[0].strip().upper().decode("latin-1") for c in self.commands]


class _Dropped(Exception):
    """The script said to close the connection here."""


class Raw(str):
    """A reply sent exactly as written (CRLFs included): for replies no MTA should send."""


def _format_reply(reply: str) -> bytes:
    """Multi-line replies may be given with '\\n'; continuation dashes are added here."""
    if isinstance(reply, Raw):
        return reply.encode("utf-8")
    lines = reply.split("\n")
    code = lines[0][:3]
    out = []
    for i, ln in enumerate(lines):
        text = ln[4:] if ln[:3] == code and len(ln) > 3 else ln[3:] if ln[:3] == code else ln
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{text}\r\n")
    return "".join(out).encode("utf-8")


def _addr(arg: str) -> tuple[str, list[str]]:
    """'FROM:<a@b> SIZE=1' -> ('a@b', ['SIZE=1'])."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        addr, params = rest[1:end], rest[end + 1 :].split()
    else:
        parts = rest.split()
        addr, params = (parts[0] if parts else ""), parts[1:]
    return addr, params


def _attrs(arg: str) -> dict[str, str]:
    out = {}
    for item in arg.split():
        k, _, v = item.partition("=")
        out[k.upper()] = v
    return out


class ScriptedUpstream:
    """SMTP server whose every reply, delay and disconnect can be scripted per stage."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str = "upstream.mailgate.test",
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        replies: dict[str, str] | None = None,
        rcpt: dict[str, str] | None = None,
        delay: dict[str, float] | None = None,
        drop: Iterable[str] = (),
        bare_lf_ends_data: bool = False,
        unsolicited: dict[str, str] | None = None,
        unsolicited_delay: dict[str, float] | None = None,
        stall: dict[str, float] | None = None,
        rcvbuf: int | None = None,
        **stage_replies: str,
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self._lock = threading.Lock()
        self._sessions: list[Session] = []
        self._transactions: list[Transaction] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.extensions: list[str] = list(extensions)
        self.replies: dict[str, str] = {}
        self.rcpt_replies: dict[str, str] = {}
        self.delays: dict[str, float] = {}
        self.drops: set[str] = set()
        self.unsolicited: dict[str, str] = {}
        self.unsolicited_delays: dict[str, float] = {}
        self.stalls: dict[str, float] = {}
        self.rcvbuf: int | None = None
        self._late: set[asyncio.Task[None]] = set()
        self.bare_lf_ends_data = bare_lf_ends_data
        self.script(
            replies=replies,
            rcpt=rcpt,
            delay=delay,
            drop=drop,
            extensions=None,
            unsolicited=unsolicited,
            unsolicited_delay=unsolicited_delay,
            stall=stall,
            rcvbuf=rcvbuf,
            **stage_replies,
        )

    # -- scripting -----------------------------------------------------------------------
    def script(
        self,
        *,
        replies: dict[str, str] | None = None,
        rcpt: dict[str, str] | None = None,
        delay: dict[str, float] | None = None,
        drop: Iterable[str] = (),
        extensions: Iterable[str] | None = None,
        unsolicited: dict[str, str] | None = None,
        unsolicited_delay: dict[str, float] | None = None,
        stall: dict[str, float] | None = None,
        rcvbuf: int | None = None,
        **stage_replies: str,
    ) -> None:
        """Add to the script; stage keywords are reply overrides (``data_end="451 …"``)."""
        merged = {**(replies or {}), **stage_replies}
        staged: list[Iterable[str]] = [merged, delay or {}, drop, unsolicited or {}]
        bad = set().union(*staged, unsolicited_delay or {}, stall or {}) - STAGES
        if bad:
            raise ValueError(f"unknown stage(s): {sorted(bad)}")
        with self._lock:
            self.replies.update(merged)
            self.rcpt_replies.update({k.lower(): v for k, v in (rcpt or {}).items()})
            self.delays.update(delay or {})
            self.drops.update(drop)
            self.unsolicited.update(unsolicited or {})
            self.unsolicited_delays.update(unsolicited_delay or {})
            self.stalls.update(stall or {})
            if rcvbuf is not None:
                self.rcvbuf = rcvbuf
            if extensions is not None:
                self.extensions = list(extensions)

    def reset_script(self) -> None:
        """Back to a well-behaved server with the default extensions."""
        with self._lock:
            self.replies.clear()
            self.rcpt_replies.clear()
            self.delays.clear()
            self.drops.clear()
            self.unsolicited.clear()
            self.unsolicited_delays.clear()
            self.stalls.clear()
            self.rcvbuf = None
            self.extensions = list(DEFAULT_EXTENSIONS)
            self.bare_lf_ends_data = False

    # -- records -------------------------------------------------------------------------
    @property
    def transactions(self) -> list[Transaction]:
        with self._lock:
            return list(self._transactions)

    @property
    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions)

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def commands(self) -> list[bytes]:
        """Every command line of every session, in order."""
        with self._lock:
            return [c for s in self._sessions for c in s.commands]

    def clear_records(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._transactions.clear()

    def wait_for_transactions(self, n: int = 1, timeout: float = 10.0) -> list[Transaction]:
        """Blocking wait (for thread mode)."""
        deadline = time.monotonic() + timeout
        while len(self.transactions) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.transactions)} of {n} transactions")
            time.sleep(0.02)
        return self.transactions

    def wait_until_closed(self, timeout: float = 10.0) -> list[Session]:
        """Blocking wait until every session so far has ended (thread mode).

        mailgate ends its upstream session after the client's has ended (QUIT is
        answered first): a test that reads a session's last commands waits here.
        """
        deadline = time.monotonic() + timeout
        while not all(s.closed for s in self.sessions):
            if time.monotonic() > deadline:
                open_ = [s.id for s in self.sessions if not s.closed]
                raise AssertionError(f"upstream sessions {open_} still open")
            time.sleep(0.02)
        return self.sessions

    async def await_transactions(self, n: int = 1, within: float = 10.0) -> list[Transaction]:
        """Async wait (same-loop mode) for at least n transactions, up to ``within`` s."""
        deadline = time.monotonic() + within
        while len(self.transactions) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.transactions)} of {n} transactions")
            await asyncio.sleep(0.01)
        return self.transactions

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``host:port`` as ``upstream.address`` takes it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> ScriptedUpstream:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=8 * 1024 * 1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop_listening(self) -> None:
        """Refuse new connections (the port is closed); existing sessions carry on."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def resume_listening(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self.start()

    async def aclose(self) -> None:
        """Stop listening and cut every open session."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> ScriptedUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start_in_thread(self) -> ScriptedUpstream:
        """Run in a private loop on a daemon thread (for tests driving a subprocess)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.aclose())
            # Conversations still running (a stalled script, a client that never left)
            # end here, not as "Task was destroyed but it is pending" at interpreter exit.
            loop.run_until_complete(_cancel_the_rest())
            loop.close()

        self._thread = threading.Thread(target=run, name="scripted-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def _call(self, coro_fn: Any) -> None:
        """Run an async method on the thread's loop (thread mode) and wait for it."""
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(10)

    def refuse(self) -> None:
        """Thread mode: stop listening so connects get ECONNREFUSED."""
        self._call(self.stop_listening)

    def accept(self) -> None:
        """Thread mode: listen again."""
        self._call(self.resume_listening)

    def stop(self) -> None:
        """Thread mode: shut down and join the thread."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("stop() is for start_in_thread(); use 'await aclose()'")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    # -- protocol ------------------------------------------------------------------------
    async def _send(
        self, w: asyncio.StreamWriter, stage: str, default: str, override: str | None = None
    ) -> str:
        """Reply for a stage, applying the script: delay, drop, reply text, 421 = close."""
        with self._lock:
            delay = self.delays.get(stage, 0.0)
            drop = stage in self.drops
            reply = override or self.replies.get(stage, default)
        if delay:
            await asyncio.sleep(delay)
        if drop:
            raise _Dropped(stage)
        extra, extra_delay, stall = self._misbehaviour(stage)
        out = _format_reply(reply)
        if extra is not None and not extra_delay:
            out += _format_reply(extra)  # one write: it arrives together with the reply
        w.write(out)
        await w.drain()
        if reply.startswith("421"):
            raise _Dropped(stage)
        await self._after(w, extra if extra_delay else None, extra_delay, stall)
        return reply

    def _misbehaviour(self, stage: str) -> tuple[str | None, float, float]:
        """(unsolicited reply, its delay, stall) scripted for a stage."""
        with self._lock:
            return (
                self.unsolicited.get(stage),
                self.unsolicited_delays.get(stage, 0.0),
                self.stalls.get(stage, 0.0),
            )

    async def _after(
        self, w: asyncio.StreamWriter, late: str | None, late_delay: float, stall: float
    ) -> None:
        """Schedule a late unsolicited reply; stop reading for ``stall`` seconds."""
        if late is not None:
            task = asyncio.get_running_loop().create_task(self._send_late(w, late, late_delay))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
        if stall:
            transport = w.transport
            assert isinstance(transport, asyncio.Transport)  # a socket's: reads and writes
            transport.pause_reading()
            try:
                await asyncio.sleep(stall)
            finally:
                if not transport.is_closing():
                    transport.resume_reading()

    async def _send_late(self, w: asyncio.StreamWriter, reply: str, after: float) -> None:
        await asyncio.sleep(after)
        if not w.is_closing():
            w.write(_format_reply(reply))

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._writers.add(w)
        with self._lock:
            rcvbuf = self.rcvbuf
        if rcvbuf:
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        peer = w.get_extra_info("peername") or ("?", 0)
        sess = Session(id=next(_ids), peer=(peer[0], peer[1]))
        with self._lock:
            self._sessions.append(sess)
        try:
            await self._converse(sess, r, w)
        except (_Dropped, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            sess.closed = True
            self._writers.discard(w)
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def _converse(
        self, sess: Session, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await self._send(w, "connect", f"220 {self.hostname} ESMTP scripted upstream")
        mail_from: str | None = None
        mail_params: list[str] = []
        rcpts: list[str] = []
        rcpt_params: list[list[str]] = []
        rejected: list[str] = []
        xclient: dict[str, str] = {}
        xforward: dict[str, str] = {}

        def reset() -> None:
            nonlocal mail_from, mail_params, rcpts, rcpt_params, rejected, xforward
            mail_from, mail_params, rcpts, rcpt_params, rejected = None, [], [], [], []
            xforward = {}

        while True:
            line = await r.readline()
            if not line:
                return
            with self._lock:
                sess.commands.append(line)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                sess.helo = arg.strip()
                reset()
                with self._lock:
                    exts = list(self.extensions)
                lines = [f"250 {self.hostname}", *(f"250 {e}" for e in exts)]
                await self._send(w, "ehlo", "\n".join(lines))
            elif verb == "HELO":
                sess.helo = arg.strip()
                reset()
                await self._send(w, "helo", f"250 {self.hostname}")
            elif verb == "XCLIENT":
                attrs = _attrs(arg)
                with self._lock:
                    sess.xclient.append(attrs)
                xclient.update(attrs)
                sess.helo = None
                reset()
                await self._send(w, "xclient", f"220 {self.hostname} ESMTP scripted upstream")
            elif verb == "XFORWARD":
                attrs = _attrs(arg)
                with self._lock:
                    sess.xforward.append(attrs)
                xforward.update(attrs)
                await self._send(w, "xforward", "250 2.0.0 Ok")
            elif verb == "MAIL":
                if sess.helo is None and "HELO" not in xclient:
                    await self._send(w, "_", "503 5.5.1 Error: send HELO/EHLO first")
                elif mail_from is not None:
                    await self._send(w, "_", "503 5.5.1 Error: nested MAIL command")
                else:
                    reply = await self._send(w, "mail", "250 2.1.0 Ok")
                    if reply.startswith("2"):
                        mail_from, mail_params = _addr(arg)
            elif verb == "RCPT":
                if mail_from is None:
                    await self._send(w, "_", "503 5.5.1 Error: need MAIL command")
                    continue
                addr, params = _addr(arg)
                with self._lock:
                    override = self.rcpt_replies.get(addr.lower())
                reply = await self._send(w, "rcpt", "250 2.1.5 Ok", override)
                if reply.startswith("2"):
                    rcpts.append(addr)
                    rcpt_params.append(params)
                else:
                    rejected.append(addr)
            elif verb == "DATA":
                if not rcpts:
                    await self._send(w, "_", "554 5.5.1 Error: no valid recipients")
                    continue
                reply = await self._send(w, "data", "354 End data with <CR><LF>.<CR><LF>")
                if not reply.startswith("3"):
                    continue
                data = await self._read_data(r, w)
                qid = f"{next(_ids):05X}{time.monotonic_ns() % 0xFFFFF:05X}"
                reply = self._peek("data_end", f"250 2.0.0 Ok: queued as {qid}")
                with self._lock:
                    if "data_end" in self.drops:
                        reply = "(dropped)"
                tx = Transaction(
                    session_id=sess.id,
                    mail_from=mail_from or "",
                    mail_params=mail_params,
                    rcpts=rcpts,
                    rcpt_params=rcpt_params,
                    rejected_rcpts=rejected,
                    data=data,
                    reply=reply,
                    queue_id=qid if reply.startswith("2") else None,
                    helo=sess.helo or xclient.get("HELO"),
                    xclient=dict(xclient),
                    xforward=dict(xforward),
                )
                with self._lock:
                    self._transactions.append(tx)
                reset()
                await self._send(w, "data_end", reply)
            elif verb == "RSET":
                reset()
                await self._send(w, "rset", "250 2.0.0 Ok")
            elif verb == "NOOP":
                await self._send(w, "noop", "250 2.0.0 Ok")
            elif verb == "QUIT":
                await self._send(w, "quit", "221 2.0.0 Bye")
                return
            elif verb == "VRFY":
                await self._send(w, "_", "252 2.0.0 Send some mail, I'll try my best")
            else:
                await self._send(w, "_", "502 5.5.2 Error: command not recognized")

    def _peek(self, stage: str, default: str) -> str:
        with self._lock:
            return self.replies.get(stage, default)

    async def _read_data(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter | None = None
    ) -> bytes:
        """Read DATA up to CRLF.CRLF (or also LF.LF when emulating a lax server)."""
        chunks: list[bytes] = []
        prev_ended_crlf = True  # the DATA command line ended the previous line
        first = True
        while True:
            line = await r.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"".join(chunks), None)
            if first:
                first = False
                with self._lock:
                    drop_mid = "data_mid" in self.drops
                if drop_mid:
                    raise _Dropped("data_mid")
                if w is not None:  # an early reply, before the dot
                    extra, extra_delay, stall = self._misbehaviour("data_mid")
                    if extra is not None and not extra_delay:
                        w.write(_format_reply(extra))
                        await w.drain()
                    await self._after(w, extra if extra_delay else None, extra_delay, stall)
            if line == b".\r\n" and prev_ended_crlf:
                break
            if self.bare_lf_ends_data and line in (b".\n", b".\r\n"):
                break
            chunks.append(line)
            prev_ended_crlf = line.endswith(b"\r\n")
        return b"".join(chunks)


async def _cancel_the_rest() -> None:
    """Cancel every other task of the running loop and wait until they have ended."""
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
