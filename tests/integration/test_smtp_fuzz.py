"""Property-based fuzzing of the SMTP front end (Hypothesis) against a real mailgate.

One mailgate process per test function (starting one costs about a second), relaying to
the scripted upstream; every Hypothesis example is one fresh client connection that sends
a generated sequence of byte batches: valid commands, commands in the wrong order,
pipelined groups, bad syntax, over-long lines, bare CR/LF, NULs, 8-bit and UTF-8 bytes,
odd case, BDAT/VRFY/AUTH/STARTTLS (TLS is configured, so the upgrade itself is fuzzed
too), long parameters, and DATA bodies with dot-stuffing edge cases and "<LF>.<LF>" /
"<CR>.<CR>" smuggling attempts.

The client frames what it sent the way RFC 5321 (and mailgate's documented limits) say
the server must: one reply per command line, DATA content up to ``<CRLF>.<CRLF>``. It
then checks, on every reply and on what the upstream recorded:

1. every reply is well-formed RFC 5321: a 3-digit code, ``-`` continuation with the
   same code on every line, CRLF line ends, printable US-ASCII text, at most 512 octets
   a line, an enhanced status code of the reply's class, and no Python traceback,
   exception text or other internal detail;
2. mailgate never crashes or stops answering: every command gets its reply within the
   timeout, a 221/421 is followed by a close, after each example a fresh connection
   gets 220 and a 250 to EHLO, and the log holds no traceback or error line;
3. a message reaches the upstream only if the client heard ``250`` for its final dot,
   and each such 250 names exactly one upstream transaction (by its queue id), holding
   the client's message byte for byte after mailgate's own header fields, for the
   recipients the client was told 250 (before-queue semantics; the upstream is set to
   end DATA at a bare ``<LF>.<LF>`` too, so a smuggled second message would show up
   there as an extra transaction);
4. the number of messages the upstream received equals the number of final-dot 250s.

Beyond those, the framing gives a small oracle: a command line over 2048 octets gets
``500 5.5.2``, ``354`` answers only a DATA in a transaction with an accepted recipient
(and such a DATA always gets it), and the reply to the final dot follows from the
content: bare CR/LF ``550 5.5.2``, over the size limit ``552 5.3.4``, a line over 998
octets ``550 5.5.6``, a first line that is a continuation ``550 5.6.0``, otherwise the
upstream's ``250``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate
from tests.rig.client import RawSMTP, Reply
from tests.rig.mailgate import MailgateProcess
from tests.rig.tlscerts import issue_certificate
from tests.rig.upstream import ScriptedUpstream

CRLF = b"\r\n"
END = b"\r\n.\r\n"
MAX_MESSAGE = 64 * 1024  # small, so the fuzzer reaches the 552 path cheaply
COMMAND_LINE_LIMIT = 2048  # README "SMTP behaviour": over 2048 octets -> 500 5.5.2
DATA_LINE_LIMIT = 998
REPLY_TIMEOUT = 10.0
# Tests run under pytest-xdist: our clients use only these source addresses.
SOURCE_IPS = [f"127.0.0.{i}" for i in range(200, 231)]

FUZZ_POLICY: dict[str, Any] = {
    **AUTH_CHECKS_OFF,
    # No DNS on the SMTP path: the fuzzer is about the protocol, not the checks.
    "rdns": {"enabled": False},
    "helo": {"enabled": False},
    "dnsbl": {"enabled": False},
    "server": {"max_message_size": MAX_MESSAGE, "command_timeout": "10s"},
}
RCPT_REPLIES = {
    "nobody@example.test": "550 5.1.1 <nobody@example.test>: Recipient address rejected",
    "later@example.test": "450 4.2.0 <later@example.test>: try again later",
}

CI_SETTINGS = settings(
    max_examples=500,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# -- what the client sends -----------------------------------------------------------------
def _case(verb: str) -> st.SearchStrategy[str]:
    return st.sampled_from([verb, verb.lower(), verb.title(), verb[:1].lower() + verb[1:]])


EOL = st.sampled_from([CRLF] * 8 + [b"\n", b"\r", b"", b"\r\r\n", b"\n\r", b"\x00\r\n"])
ODD_BYTES = st.sampled_from(
    [b"\x00", b"\r", b"\n", b"\t", b"\x1b", b"\x7f", b"\xff", b"\xc3\xa9", b"\xe2\x80\xa8", b" "]
)
HELO_NAMES = st.sampled_from(
    [
        "client.example.org",
        "[127.0.0.1]",
        "[IPv6:::1]",
        "",
        "two words",
        "a\tb",
        "bücher.example",
        "x" * 300,
        "mx.mailgate.test",
        "-bad-.example",
    ]
) | st.text(max_size=20)
ADDRESSES = st.sampled_from(
    [
        "<alice@example.org>",
        "<>",
        "alice@example.org",
        '<"john doe"@example.org>',
        '<"a>b"@example.org>',
        "<@relay.example:alice@example.org>",
        "<a@b",
        "<ü@example.org>",
        "<" + "a" * 300 + "@example.org>",
        "<a>b@example.org>",
        "<a(b@example.org>",
        "<postmaster>",
        "<alice@[127.0.0.1]>",
        "<alice@exa mple.org>",
    ]
) | st.text(max_size=20).map(lambda t: f"<{t}>")
RCPTS = st.sampled_from(
    [
        "<bob@example.test>",
        "<alice@example.test>",
        "<nobody@example.test>",
        "<later@example.test>",
        "<>",
        "bob@example.test",
        "<bób@example.test>",
        "<Postmaster>",
    ]
)
MAIL_PARAMS = st.lists(
    st.sampled_from(
        [
            "SIZE=100",
            f"SIZE={MAX_MESSAGE + 1}",
            "SIZE=x",
            "SIZE",
            "BODY=8BITMIME",
            "BODY=BINARYMIME",
            "SMTPUTF8",
            "SMTPUTF8=yes",
            "RET=HDRS",
            "ENVID=abc+2Bdef",
            "FOO=bar",
            "AUTH=<>",
            "SIZE=1",
            "Xé=1",
            "BODY=é",
            "=x",
            "X" * 2100,
            "X" * 600,
            "K" * 700 + "=1 " + "k" * 700 + "=2",
            "ENVID=" + "v" * 1500,
        ]
    ),
    max_size=3,
)
RCPT_PARAMS = st.lists(
    st.sampled_from(
        ["NOTIFY=SUCCESS,FAILURE", "NOTIFY", "ORCPT=rfc822;bob@example.test", "FOO=1", "é"]
    ),
    max_size=2,
)


@st.composite
def mutated(draw: st.DrawFn, text: st.SearchStrategy[str]) -> bytes:
    """A command text, maybe with an odd byte inserted, and a line end (often CRLF)."""
    raw = draw(text).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(ODD_BYTES) + raw[at:]
    return raw + draw(EOL)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


SIMPLE_COMMANDS = st.sampled_from(
    [
        "RSET",
        "NOOP",
        "NOOP extra words",
        "HELP",
        "QUIT",
        "VRFY bob@example.test",
        "EXPN staff",
        "ETRN example.test",
        "TURN",
        "BDAT 10 LAST",
        "BDAT 0",
        "AUTH PLAIN AGJvYgBzZWNyZXQ=",
        "AUTH LOGIN",
        "STARTTLS",
        "STARTTLS now",
        "XFORWARD ADDR=192.0.2.1 NAME=evil.example",
        "XCLIENT ADDR=192.0.2.1",
        "DATA extra",
        "",
        "   ",
        "MAIL",
        "RCPT",
        "MAIL TO:<bob@example.test>",
        "RCPT FROM:<alice@example.org>",
        "FOO bar",
        "\u00e9t\u00e9",
    ]
)
COMMAND = st.one_of(
    mutated(st.builds(_join, _case("EHLO"), HELO_NAMES)),
    mutated(st.builds(_join, _case("HELO"), HELO_NAMES)),
    mutated(
        st.builds(
            lambda v, a, p: _join(f"{v} {'FROM:'}{a}", *p), _case("MAIL"), ADDRESSES, MAIL_PARAMS
        )
    ),
    mutated(st.builds(lambda v, a, p: _join(f"{v} TO:{a}", *p), _case("RCPT"), RCPTS, RCPT_PARAMS)),
    mutated(_case("DATA")),
    mutated(st.one_of(SIMPLE_COMMANDS, SIMPLE_COMMANDS.flatmap(lambda c: _case(c)))),
    # Often plainly, so that sessions go on inside TLS; pipelined text after it must be
    # dropped, never run inside TLS (CVE-2011-0411).
    st.just(b"STARTTLS\r\n"),
)
LONG_LINE = st.builds(
    lambda verb, n, eol: verb + b"x" * n + eol,
    st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"EHLO ", b""]),
    st.one_of(st.integers(2035, 2050), st.sampled_from([4096, 70_000])),
    st.sampled_from([CRLF, b"\n"]),
)
RAW_BYTES = st.binary(max_size=80)

BODY_LINES = st.one_of(
    st.sampled_from(
        [
            b"",
            b".",
            b"..",
            b"...",
            b".x",
            b". ",
            b"Subject: fuzz",
            b"From: <alice@example.org>",
            b"To: <bob@example.test>",
            b" folded continuation",
            b"Authentication-Results: mx.mailgate.test; spf=pass",
            b"X-Spam-Flag: YES",
            b"\x00",
            b"caf\xc3\xa9",
            b"\xff\xfe",
            b"x" * DATA_LINE_LIMIT,
            b"." + b"x" * DATA_LINE_LIMIT,
            b"x" * (DATA_LINE_LIMIT + 1),
            b"." + b"x" * (DATA_LINE_LIMIT + 1),
            b"MAIL FROM:<evil@example.org>",
            b"RCPT TO:<bob@example.test>",
            b"DATA",
            b"QUIT",
        ]
    ),
    st.binary(max_size=40),
)
BODY_SEP = st.sampled_from([CRLF] * 8 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])
SMUGGLE = st.sampled_from(
    [
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r\n.\r",
        b"\r.\r\n",
        b"\n..\n",
        b"\r\n\x00.\r\n",
    ]
)
SMUGGLED_TAIL = (
    b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled\r\n"
)
TERMINATOR = st.sampled_from(
    [END] * 6
    + [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b".\r\n", b"\r\n..\r\n", b"\r\n. \r\n", b""]
)


@st.composite
def body(draw: st.DrawFn) -> bytes:
    """DATA content plus a terminator that may or may not end it."""
    out = b""
    if draw(st.booleans()):
        out += b"From: <alice@example.org>\r\nSubject: fuzz\r\n\r\n"
    if draw(st.booleans()):  # a clean body: CRLF only, so that it can be delivered
        lines = st.lists(BODY_LINES.map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
        out += b"".join(line + CRLF for line in draw(lines))
    else:
        for line, sep in draw(st.lists(st.tuples(BODY_LINES, BODY_SEP), max_size=10)):
            out += line + sep
    kind = draw(st.integers(0, 9))
    if kind == 0:  # smuggling attempt: a lax end mark, then a second transaction
        out += draw(SMUGGLE) + SMUGGLED_TAIL
    elif kind == 1:  # over max_message_size
        out += (b"y" * 78 + CRLF) * (MAX_MESSAGE // 80 + 10)
    return out + draw(TERMINATOR)


@st.composite
def transaction(draw: st.DrawFn) -> bytes:
    """A whole pipelined transaction (RFC 2920 group), so deliveries are common."""
    out = b""
    if draw(st.booleans()):
        out += b"EHLO client.example.org\r\n"
    out += f"MAIL FROM:{draw(st.sampled_from(['<alice@example.org>', '<>']))}\r\n".encode()
    for rcpt in draw(st.lists(RCPTS, min_size=1, max_size=3)):
        out += f"RCPT TO:{rcpt}\r\n".encode()
    return out + b"DATA\r\n" + draw(body())


# Many pipelined commands at once: past 256 unsent replies mailgate holds back its
# reading until the client reads (SMTPStream.readline); errors end it at max_errors.
FLOOD = st.builds(
    lambda cmd, n: cmd * n,
    st.sampled_from([b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"VRFY x\r\n"]),
    st.sampled_from([255, 256, 257, 600]),
)
PIECE = st.one_of(COMMAND, transaction(), body(), LONG_LINE, RAW_BYTES, FLOOD)
BATCH = st.lists(PIECE, min_size=1, max_size=4).map(b"".join)
# Most sessions start politely, so that the fuzzer spends its time past EHLO.
GREETING = st.sampled_from(
    [b"EHLO client.example.org\r\n"] * 3 + [b"HELO client.example.org\r\n", b""]
)
SESSION = st.builds(lambda first, rest: [first, *rest], GREETING, st.lists(BATCH, max_size=8))
ENDING = st.sampled_from(["quit", "quit", "half-close", "drop"])


# -- checking replies ----------------------------------------------------------------------
_LINE = re.compile(rb"\A([2-5][0-9][0-9])([ -])([\t\x20-\x7e]*)\r\n\Z")
_ENHANCED = re.compile(r"\A([245])\.\d{1,3}\.\d{1,3}(?: |\Z)")
_INTERNAL = re.compile(
    r"Traceback|Exception|\bFile \"|\.py\b|object at 0x|\[Errno|asyncio|filter\.|"
    r"Internal error|NoneType|KeyError|ValueError|TypeError|AttributeError",
    re.IGNORECASE,
)
_QUEUED = re.compile(r"queued as ([0-9A-Fa-f]+)")


def check_reply(reply: Reply, context: str) -> None:
    """Invariant 1: well-formed RFC 5321 (4.2, 4.5.3.1.5; RFC 3463), nothing internal."""
    raw_lines = reply.raw.split(b"\n")
    assert raw_lines[-1] == b"", f"{context}: reply does not end in a line end: {reply.raw!r}"
    lines = [ln + b"\n" for ln in raw_lines[:-1]]
    codes = set()
    for i, line in enumerate(lines):
        m = _LINE.match(line)
        assert m, f"{context}: malformed reply line {line!r} in {reply.raw!r}"
        assert len(line) <= 512, f"{context}: reply line over 512 octets: {line[:80]!r}…"
        codes.add(m.group(1))
        last = i == len(lines) - 1
        assert (m.group(2) == b" ") == last, f"{context}: bad continuation in {reply.raw!r}"
        text = m.group(3).decode("ascii")
        assert not _INTERNAL.search(text), f"{context}: internal detail in {reply.raw!r}"
        if i == 0 and reply.code != 220 and reply.code != 354 and not 250 <= reply.code <= 252:
            em = _ENHANCED.match(text)
            assert em, f"{context}: no enhanced status code in {reply.raw!r}"
            assert em.group(1) == str(reply.code)[0], f"{context}: class mismatch {reply.raw!r}"
    assert len(codes) == 1, f"{context}: mixed codes in one reply {reply.raw!r}"


def read_reply(c: RawSMTP, context: str) -> Reply:
    try:
        reply = c.read_reply(REPLY_TIMEOUT)
    except TimeoutError as exc:  # invariant 2: it must keep answering
        raise AssertionError(f"{context}: no reply within {REPLY_TIMEOUT}s ({exc})") from None
    except ValueError as exc:
        raise AssertionError(f"{context}: not an SMTP reply: {exc}") from None
    check_reply(reply, context)
    return reply


# -- the client's model of the conversation -------------------------------------------------
def command_verb(line: bytes) -> tuple[str, str] | None:
    """(verb, argument) as RFC 5321 reads the line; None where it cannot be a command."""
    if not line.endswith(CRLF) and b"\r" in line:
        return None
    body_ = line[:-2] if line.endswith(CRLF) else line.rstrip(b"\n")
    try:
        text = body_.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text):
        return None
    verb, _, arg = text.strip(" ").partition(" ")
    return verb.upper(), arg.strip(" ")


def content_of(segment: bytes) -> tuple[bytes, str | None]:
    """(unstuffed message, the content problem mailgate must refuse it for, if any).

    ``segment`` is the wire data after DATA's line, preceded by a virtual CRLF, up to
    (not including) the CRLF.CRLF that ended it.
    """
    if segment.replace(CRLF, b"").count(b"\r") or segment.replace(CRLF, b"").count(b"\n"):
        return b"", "bare"
    lines = segment.split(CRLF)[1:]
    content = b"".join((ln[1:] if ln.startswith(b".") else ln) + CRLF for ln in lines)
    if len(content) > MAX_MESSAGE:
        return content, "size"
    if any(len(ln) - ln.startswith(b".") > DATA_LINE_LIMIT for ln in lines):
        return content, "long"
    if content[:1] in (b" ", b"\t"):
        return content, "folded"
    return content, None


GOODBYE = b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
_FTEXT = re.compile(rb"[!-9;-~]+")


def non_smtp(line: bytes) -> bool:
    """Input that ends the session with GOODBYE (Postfix's smtpd_forbidden_commands):
    a first word that is CONNECT/GET/POST, looks like a header field name with its
    colon, or does not start with an ASCII letter; an empty line does not."""
    words = line.split()
    if not words:
        return False
    word = words[0]
    header = word.endswith(b":") and _FTEXT.fullmatch(word[:-1]) is not None
    return not word[:1].isalpha() or header or word.upper() in (b"CONNECT", b"GET", b"POST")


EXPECTED_REFUSAL = {
    "bare": (550, "5.5.2"),
    "size": (552, "5.3.4"),
    "long": (550, "5.5.6"),
    "folded": (550, "5.6.0"),
}
DROPPED_NAMES = re.compile(rb"(?im)^(authentication-results|x-spam-|x-mailgate-id)")


@dataclass
class Delivery:
    """A final dot and what the client heard for it."""

    reply: Reply
    content: bytes
    rcpts: int
    queue_id: str | None = None


@dataclass
class Conversation:
    """Frames what was sent as the server must, and reads one reply per unit."""

    c: RawSMTP
    tls_ctx: ssl.SSLContext
    pending: bytearray = field(default_factory=bytearray)
    in_data: bool = False
    helo: bool = False  # a HELO/EHLO was answered 250 (and no STARTTLS since)
    txn: bool = False
    rcpts: int = 0
    tls: bool = False
    closed: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.pending += data
        # Closed after a 421/221 we have not read yet: process() sees it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.c.send(data)
        self.process()

    def _ended(self, reply: Reply, context: str) -> None:
        """221/421: the session ends; mailgate must close the connection."""
        self.closed = True
        assert self.c.is_closed(5.0), f"{context}: {reply.code} but the connection stays open"
        assert not self.c.pending(), f"{context}: more after {reply.code}: {self.c.pending()!r}"

    def process(self) -> None:
        while not self.closed:
            if self.in_data:
                if not self._data_unit():
                    return
            else:
                if not self._command_unit():
                    return

    def _command_unit(self) -> bool:
        i = self.pending.find(b"\n")
        if i < 0:
            return False
        line = bytes(self.pending[: i + 1])
        del self.pending[: i + 1]
        context = f"reply to {line[:100]!r}"
        reply = read_reply(self.c, context)
        self.log.append(f"{line[:60]!r} -> {str(reply)[:80]}")
        if len(line) <= COMMAND_LINE_LIMIT and non_smtp(line):
            assert reply.raw == GOODBYE, f"{context}: non-SMTP input answered {reply}"
            self._ended(reply, context)
            return False
        if reply.code in (221, 421):
            assert reply.code == 421 or (command_verb(line) or ("",))[0] == "QUIT", context
            self._ended(reply, context)
            return False
        if len(line) > COMMAND_LINE_LIMIT:
            assert (reply.code, reply.lines[0][:5]) == (500, "5.5.2"), context
            assert "too long" in reply.text, context
            return True
        parsed = command_verb(line)
        verb, arg = parsed if parsed is not None else ("", "")
        if parsed is None:
            assert reply.code == 500, context
        if reply.code == 354:
            assert verb == "DATA" and not arg, f"{context}: 354 for something else"
            assert self.txn and self.rcpts > 0, f"{context}: 354 without an open transaction"
            self.in_data = True
            return True
        if verb == "DATA" and not arg and self.txn and self.rcpts > 0:
            raise AssertionError(f"{context}: DATA with {self.rcpts} recipient(s) not 354")
        # A plain, valid MAIL or RCPT where the state allows it must be accepted: the
        # upstream accepts it, and no check that could refuse it is on.
        if verb == "MAIL" and arg == "FROM:<alice@example.org>" and self.helo and not self.txn:
            assert reply.code == 250, f"{context}: valid MAIL answered {reply}"
        if verb == "RCPT" and arg == "TO:<bob@example.test>" and self.txn:
            assert reply.code == 250, f"{context}: valid RCPT answered {reply}"
        if verb == "MAIL" and reply.code == 250:
            assert not self.txn, f"{context}: MAIL accepted inside a transaction"
            assert self.helo, f"{context}: MAIL accepted before HELO/EHLO"
            self.txn, self.rcpts = True, 0
        elif verb == "RCPT" and reply.code in (250, 251):
            assert self.txn, f"{context}: RCPT accepted without MAIL"
            self.rcpts += 1
        elif verb in ("RSET", "EHLO", "HELO") and reply.code == 250:
            self.txn, self.rcpts = False, 0
            self.helo = self.helo or verb != "RSET"
        elif verb == "STARTTLS" and reply.code == 220:
            self._starttls(context)
        else:
            assert reply.code != 250 or verb in ("NOOP", "RSET"), f"{context}: unexpected 250"
        return True

    def _starttls(self, context: str) -> None:
        # Bytes pipelined after STARTTLS are mailgate's to discard (CVE-2011-0411); those
        # still in flight when it does reach the TLS layer, where the handshake fails.
        self.pending.clear()
        self.txn, self.rcpts, self.helo = False, 0, False  # RFC 3207: EHLO again
        assert not self.tls, f"{context}: STARTTLS accepted twice"
        assert not self.c.pending(), f"{context}: bytes after 220 before the handshake"
        sock = self.c._sock()
        try:
            sock.settimeout(REPLY_TIMEOUT)
            self.c.sock = self.tls_ctx.wrap_socket(sock)
        except (ssl.SSLError, OSError):
            self.closed = True  # injected plaintext broke the handshake: session over
            return
        self.tls = True
        # Nothing pipelined before the handshake may be answered inside TLS: the first
        # reply in TLS must be the one to our HELP.
        self.c.send(b"HELP\r\n")
        try:
            first = read_reply(self.c, f"{context}: HELP after the handshake")
        except (AssertionError, EOFError, ConnectionError, ssl.SSLError):
            if self.c.is_closed(2.0):  # a dropped plaintext remainder broke the session
                self.closed = True
                return
            raise
        assert first.code == 214, f"{context}: injected command answered in TLS: {first}"

    def _data_unit(self) -> bool:
        wire = CRLF + bytes(self.pending)
        end = wire.find(END)
        if end < 0:
            return False
        segment = wire[:end]
        self.pending = bytearray(wire[end + len(END) :])
        self.in_data = False
        content, problem = content_of(segment)
        context = f"reply to the final dot of {segment[:120]!r}… ({len(segment)} octets)"
        reply = read_reply(self.c, context)
        self.log.append(f"<final dot, {len(segment)} octets, {problem}> -> {str(reply)[:80]}")
        delivery = Delivery(reply, content, self.rcpts)
        self.txn, self.rcpts = False, 0
        if reply.code == 250:
            m = _QUEUED.search(reply.text)
            assert m, f"{context}: 250 without the upstream's queue id: {reply}"
            delivery.queue_id = m.group(1)
        self.deliveries.append(delivery)
        if problem is not None:
            code, enhanced = EXPECTED_REFUSAL[problem]
            assert (reply.code, reply.lines[0][:5]) == (code, enhanced), (
                f"{context}: {problem} content answered {reply}"
            )
        elif reply.code != 421:
            assert reply.code == 250, f"{context}: clean message answered {reply}"
        if reply.code == 421:
            self._ended(reply, context)
            return False
        return True

    def finish(self, ending: str) -> None:
        """End the session: ``quit`` (whatever is open is ended first, so every final dot
        is answered), ``half-close`` (SHUT_WR: every complete command is still answered,
        then mailgate closes) or ``drop`` (close at once, maybe mid-DATA)."""
        if self.closed or ending == "drop":
            return
        if ending == "half-close" and not self.tls:
            self.c._sock().shutdown(socket.SHUT_WR)
            assert self.c.is_closed(5.0), "half-closed, but mailgate keeps the connection"
            assert not self.c.pending(), f"replies nobody asked for: {self.c.pending()!r}"
            self.closed = True
            return
        if self.in_data:
            self.send(END)
        elif self.pending:
            self.send(CRLF)
        if self.closed:
            return
        self.c.send(b"QUIT\r\n")
        reply = read_reply(self.c, "reply to the closing QUIT")
        assert reply.code in (221, 421), f"QUIT answered {reply}"
        self._ended(reply, "QUIT")


# -- the fixture: one mailgate for all examples of a test ----------------------------------
@dataclass
class FuzzRig:
    mg: MailgateProcess
    upstream: ScriptedUpstream
    tls_ctx: ssl.SSLContext
    ips: Iterator[str]
    log_offset: int = 0

    def next_ip(self) -> str:
        return next(self.ips)


def _cycle(items: list[str]) -> Iterator[str]:
    while True:
        yield from items


@pytest.fixture
def fuzz_rig(mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path) -> FuzzRig:
    _, cert, key = issue_certificate(tmp_path, "mx.mailgate.test")
    policy = {**FUZZ_POLICY, "server": {**FUZZ_POLICY["server"]}}
    policy["server"]["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    mg = mailgate(policy)
    upstream.script(rcpt=RCPT_REPLIES)
    # A lax upstream that also ends DATA at <LF>.<LF>: if mailgate ever relayed one, the
    # rest of the message would become a second transaction there (invariants 3 and 4).
    upstream.bare_lf_ends_data = True
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return FuzzRig(mg, upstream, ctx, _cycle(SOURCE_IPS))


_LOG_PROBLEM = re.compile(r"Traceback|level=error|level=critical|Task exception|Exception in ")


def check_logs(rig: FuzzRig, text: str | None = None) -> None:
    """Invariant 2: no traceback or error line. (No error line is expected at all: upstream
    trouble, refused input and client misbehaviour are logged at warning or below.)"""
    text = rig.mg.stderr() if text is None else text
    new = text[rig.log_offset :]
    rig.log_offset = len(text)
    bad = [ln for ln in new.splitlines() if _LOG_PROBLEM.search(ln)]
    assert not bad, "mailgate logged errors:\n" + "\n".join(bad[:20])


def check_alive(rig: FuzzRig) -> None:
    """Invariant 2: the process runs and a fresh connection is served."""
    assert rig.mg.returncode is None, f"mailgate exited\n{rig.mg.logs()}"
    with RawSMTP("127.0.0.1", rig.mg.smtp_port, source_ip=rig.next_ip(), timeout=10) as c:
        assert read_reply(c, "banner").code == 220
        c.send(b"EHLO alive.example.org\r\n")
        assert read_reply(c, "EHLO after the example").code == 250
        c.send(b"QUIT\r\n")
        assert read_reply(c, "QUIT after the example").code == 221


def run_session(rig: FuzzRig, batches: list[bytes], ending: str = "quit") -> None:
    """One example: a fresh connection, the batches, then every invariant."""
    up = rig.upstream
    before = len(up.transactions)
    ip = rig.next_ip()
    with RawSMTP("127.0.0.1", rig.mg.smtp_port, source_ip=ip, timeout=REPLY_TIMEOUT) as c:
        banner = read_reply(c, "banner")
        assert banner.code == 220, banner
        conv = Conversation(c, rig.tls_ctx)
        try:
            for batch in batches:
                conv.send(batch)
            conv.finish(ending)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nconversation:\n" + "\n".join(conv.log[-30:])) from None
    if currently_in_test_context():  # statistics: pytest --hypothesis-show-statistics
        for d in conv.deliveries:
            event(f"final dot answered {d.reply.code}")
        event(f"ending: {ending}; TLS: {conv.tls}")
    check_alive(rig)
    check_logs(rig)
    # Invariants 3 and 4: upstream transactions of this connection <-> final-dot 250s.
    new = up.transactions[before:]
    # (The scripted upstream's XCLIENT takes no PORT: the address tells our client.)
    mine = [t for t in new if t.xclient.get("ADDR") == ip]
    assert mine == new, f"transactions of another client during the example: {new}"
    told = [d for d in conv.deliveries if d.reply.code == 250]
    by_id = {t.queue_id: t for t in mine}
    assert len(mine) == len(told), (
        f"upstream got {len(mine)} message(s), the client heard 250 for {len(told)}: "
        f"{[t.reply for t in mine]} / {[str(d.reply) for d in conv.deliveries]}"
    )
    for d in told:
        tx = by_id.get(d.queue_id)
        assert tx is not None, f"250 names queue id {d.queue_id} the upstream never gave"
        assert tx.accepted, tx.reply
        assert len(tx.rcpts) == d.rcpts, (tx.rcpts, d.rcpts)
        got = tx.message
        # Only CRLF line ends go on (RFC 5321 2.3.8), and nothing could end DATA early.
        assert got.count(b"\n") == got.count(CRLF) == got.count(b"\r"), got[:200]
        # mailgate drops fields it owns from the header block (all of the message if it
        # has no blank line); the rest must arrive byte for byte.
        blank = d.content.find(b"\r\n\r\n")
        head_end = 0 if d.content.startswith(CRLF) else len(d.content) if blank < 0 else blank + 2
        kept = d.content if not DROPPED_NAMES.search(d.content[:head_end]) else d.content[head_end:]
        assert got.endswith(kept), (
            f"the upstream's message is not the client's: {got[-300:]!r} vs {kept[-300:]!r}"
        )


@CI_SETTINGS
@given(batches=SESSION, ending=ENDING)
def test_smtp_front_end_fuzz(fuzz_rig: FuzzRig, batches: list[bytes], ending: str) -> None:
    """Generated sessions keep every invariant of the module docstring."""
    run_session(fuzz_rig, batches, ending)


def test_fuzz_rig_counts_a_delivery(fuzz_rig: FuzzRig) -> None:
    """The oracle itself: one clean pipelined transaction is one 250 and one upstream
    message; a smuggling attempt is one 550 and none (guards against a vacuous fuzzer)."""
    up = fuzz_rig.upstream
    run_session(
        fuzz_rig,
        [
            b"EHLO c.example.org\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
            b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\n"
        ],
    )
    assert len(up.transactions) == 1
    assert up.transactions[0].message.endswith(b"Subject: x\r\n\r\n.dot\r\n")
    run_session(
        fuzz_rig,
        [
            b"EHLO c.example.org\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.test>\r\n"
            b"DATA\r\nSubject: x\r\n\r\nhi\n.\n" + SMUGGLED_TAIL + b".\r\n"
        ],
    )
    assert len(up.transactions) == 1
    check_logs(fuzz_rig, fuzz_rig.mg.logs())


# -- regressions for what the fuzzer found ----------------------------------------------------
def _exchange(rig: FuzzRig, lines: list[bytes]) -> list[Reply]:
    """Send each line and read its reply (every reply checked by check_reply)."""
    with RawSMTP("127.0.0.1", rig.mg.smtp_port, source_ip=rig.next_ip()) as c:
        assert read_reply(c, "banner").code == 220
        out = []
        for line in lines:
            c.send(line)
            out.append(read_reply(c, f"reply to {line!r}"))
        return out


def test_replies_echoing_8bit_parameters_stay_ascii(fuzz_rig: FuzzRig) -> None:
    """Found by the fuzzer: ``RCPT TO:<> ¡`` was answered ``501 … (malformed parameter
    '¡')`` with the raw UTF-8 octets, and ``MAIL … BODY=é`` ``555 … BODY=é``; reply
    text is US-ASCII (RFC 5321 4.2). check_reply enforces it on every reply."""
    replies_ = _exchange(
        fuzz_rig,
        [
            b"EHLO client.example.org\r\n",
            b"MAIL FROM:<> \xc2\xa1\r\n",
            b"MAIL FROM:<alice@example.org> BODY=\xc3\xa9\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<bob@example.test> X\xc3\xa9=1\r\n",
        ],
    )
    assert [r.code for r in replies_] == [250, 501, 555, 250, 501]
    assert "malformed parameter '\\xa1'" in replies_[1].text
    assert replies_[2].text == "5.5.4 Unsupported option: BODY=\\xe9"
    assert "malformed parameter 'X\\xe9=1'" in replies_[4].text


def test_helo_name_with_a_tab_is_refused_not_a_dead_session(fuzz_rig: FuzzRig) -> None:
    """Found by the fuzzer: ``EHLO a<HT>b`` got 250, then every MAIL ``451 4.3.0`` (the
    relay refuses to send the name upstream), an upstream connection opened and dropped
    for each. Now a syntax error, like a name with a space; the session goes on."""
    replies_ = _exchange(
        fuzz_rig,
        [
            b"EHLO a\tb.example.org\r\n",
            b"HELO a\tb\r\n",
            # ESC, a C1 control (CSI) and a bidi override: no host name holds one.
            b"EHLO a\x1b[31mb.example.org\r\n",
            "EHLO a\u009b31mb.example.org\r\n".encode(),
            "EHLO \u202eb.example.org\r\n".encode(),
            b"EHLO client.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
        ],
    )
    # ESC is refused as a command no client sends (500), the others as a bad name.
    assert [(r.code, r.lines[0][:5]) for r in replies_[:5]] == [
        (501, "5.5.4"),
        (501, "5.5.4"),
        (500, "5.5.2"),
        (501, "5.5.4"),
        (501, "5.5.4"),
    ]
    assert [r.code for r in replies_[5:]] == [250, 250]


def test_replies_echoing_long_parameters_stay_within_512_octets(fuzz_rig: FuzzRig) -> None:
    """Found by the fuzzer: ``MAIL FROM:<…> XXX…`` (a 600-octet keyword) was answered
    ``555 5.5.4 Unsupported option: XXX…`` in one reply line of over 600 octets, and a
    duplicated long keyword ``501 … (duplicate parameter KKK…)`` likewise; a reply line
    is at most 512 octets (RFC 5321 4.5.3.1.5)."""
    replies_ = _exchange(
        fuzz_rig,
        [
            b"EHLO client.example.org\r\n",
            b"MAIL FROM:<alice@example.org> " + b"X" * 600 + b"\r\n",
            b"MAIL FROM:<alice@example.org> " + b"K" * 700 + b"=1 " + b"k" * 700 + b"=2\r\n",
        ],
    )
    assert [r.code for r in replies_] == [250, 555, 501]
    assert all(len(line) <= 512 for r in replies_ for line in r.raw.split(b"\n"))
    assert replies_[1].text == "5.5.4 Unsupported option: " + "X" * 40
    assert replies_[2].text.endswith("(duplicate parameter " + "K" * 40 + ")")


def test_dsn_parameters_that_are_not_xtext_are_refused(fuzz_rig: FuzzRig) -> None:
    """Reported by the fuzz audit: ENVID and ORCPT with 8-bit octets were passed raw
    to the upstream; RFC 3461 makes them xtext, as Postfix checks."""
    replies_ = _exchange(
        fuzz_rig,
        [
            b"EHLO client.example.org\r\n",
            b"MAIL FROM:<alice@example.org> ENVID=caf\xc3\xa9\r\n",
            b"MAIL FROM:<alice@example.org> RET=ALL\r\n",
            b"MAIL FROM:<alice@example.org> RET=HDRS ENVID=QQ314159\r\n",
            b"RCPT TO:<bob@example.test> ORCPT=rfc822;b\xc3\xb6b@example.test\r\n",
            b"RCPT TO:<bob@example.test> NOTIFY=NEVER,DELAY\r\n",
            b"RCPT TO:<bob@example.test> NOTIFY=FAILURE ORCPT=rfc822;bob@example.test\r\n",
        ],
    )
    assert [r.code for r in replies_] == [250, 501, 501, 250, 501, 501, 250]
    assert "ENVID must be xtext" in replies_[1].text
    assert "ORCPT address must be xtext" in replies_[4].text


def test_a_message_beginning_with_a_folded_line_is_refused(fuzz_rig: FuzzRig) -> None:
    """Reported by the fuzz audit: prepended to mailgate's own fields, the client's
    leading continuation line extended the last of them (X-Mailgate-ID)."""
    before = len(fuzz_rig.upstream.transactions)
    replies_ = _exchange(
        fuzz_rig,
        [
            b"EHLO client.example.org\r\n",
            b"MAIL FROM:<alice@example.org>\r\n",
            b"RCPT TO:<bob@example.test>\r\n",
            b"DATA\r\n",
            b" forged; continuation\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
        ],
    )
    assert [r.code for r in replies_] == [250, 250, 250, 354, 550]
    assert replies_[4].lines[0].startswith("5.6.0")
    assert len(fuzz_rig.upstream.transactions) == before
