"""How the front end copes with clients that half-close, never read, or dribble bytes."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from tests.integration.conftest import StartMailgate, message
from tests.rig.client import RawSMTP, read_until_eof
from tests.rig.upstream import ScriptedUpstream


def _codes(data: bytes) -> list[str]:
    """The code and enhanced status of each final reply line, e.g. '250 2.0.0'."""
    out = []
    for line in data.decode("utf-8", "replace").split("\r\n"):
        if len(line) >= 4 and line[3] == " ":
            out.append(" ".join(line.split()[:2]) if line[0] != "3" else line[:3])
    return out


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    banner = sock.recv(4096)
    assert banner.startswith(b"220 "), banner
    return sock


def _half_close(port: int, sent: bytes) -> list[str]:
    """Send ``sent``, shut our sending side, read to EOF: the replies' codes."""
    sock = _connect(port)
    sock.sendall(sent)
    sock.shutdown(socket.SHUT_WR)
    codes = _codes(read_until_eof(sock))
    sock.close()
    return codes


# -- half-close: the client shuts down its sending side after its last command ---------------
def test_half_closed_client_gets_every_reply_and_the_message_once(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """A pipelined transaction + QUIT, then SHUT_WR: every reply, then 221 and close.

    Without the 250 the sender retries a message that was delivered: a duplicate.
    """
    mg = mailgate()
    codes = _half_close(
        mg.smtp_port,
        b"EHLO client.example.org\r\nMAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\n" + message() + b".\r\nQUIT\r\n",
    )
    assert [c[:3] for c in codes] == ["250", "250", "250", "354", "250", "221"], codes
    assert codes[-1] == "221 2.0.0", codes
    assert len(upstream.wait_for_transactions(1)) == 1


def test_half_closed_client_gets_replies_to_simple_commands(mailgate: StartMailgate) -> None:
    """EHLO, NOOP, QUIT, SHUT_WR: 250, 250, 221 (RFC 5321 4.1.1.10), then close."""
    mg = mailgate()
    codes = _half_close(mg.smtp_port, b"EHLO client.example.org\r\nNOOP\r\nQUIT\r\n")
    assert [c[:3] for c in codes] == ["250", "250", "221"], codes


def test_quit_is_answered_and_closed_without_waiting_for_the_upstream(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """After a message, QUIT gets 221 and the close at once, as from Postfix; the
    upstream's slow QUIT exchange happens after the client has gone."""
    upstream.script(delay={"quit": 3.0})
    mg = mailgate()
    sock = _connect(mg.smtp_port)
    sock.sendall(
        b"EHLO client.example.org\r\nMAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\n" + message() + b".\r\n"
    )
    got = b""
    while _codes(got)[-1:] != ["250 2.0.0"]:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    start = time.monotonic()
    sock.sendall(b"QUIT\r\n")
    codes = _codes(read_until_eof(sock))
    took = time.monotonic() - start
    sock.close()
    assert codes == ["221 2.0.0"], codes
    assert took < 1.5, f"the client waited {took:.1f}s for its 221 and the close"
    assert len(upstream.wait_for_transactions(1)) == 1
    # The upstream still hears a QUIT (not a dropped connection) once the client is gone.
    sessions = upstream.wait_until_closed(5)
    assert "QUIT" in [v for s in sessions for v in s.verbs()]


def test_half_closed_client_without_quit_gets_its_replies(mailgate: StartMailgate) -> None:
    """No QUIT before the EOF: the replies still go out, then mailgate closes."""
    mg = mailgate()
    codes = _half_close(mg.smtp_port, b"EHLO client.example.org\r\nNOOP\r\n")
    assert [c[:3] for c in codes] == ["250", "250"], codes


def test_half_close_inside_data_delivers_nothing(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """EOF before the final dot abandons the transaction, as a disconnect does."""
    mg = mailgate()
    codes = _half_close(
        mg.smtp_port,
        b"EHLO client.example.org\r\nMAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\n" + message() + b"QUIT\r\n",
    )
    assert [c[:3] for c in codes] == ["250", "250", "250", "354"], codes
    time.sleep(0.5)
    assert upstream.transactions == []
    assert "end=client_gone" in mg.logs()


# -- a client that never reads its replies --------------------------------------------------
TCP_ESTABLISHED = 1


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _flood(sock: socket.socket, chunk: bytes, total: int, stall: float = 2.0) -> int:
    """Send up to ``total`` bytes without reading; stop once the peer stops taking them."""
    sent = 0
    view = memoryview(chunk)
    sock.settimeout(0.2)
    stalled_since: float | None = None
    while sent < total:
        try:
            n = sock.send(view)
        except TimeoutError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > stall:
                break
            continue
        stalled_since = None
        sent += n
        view = view[n:] if n < len(view) else memoryview(chunk)
    return sent


def test_client_that_never_reads_cannot_grow_memory(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """Pipelined commands from a client that reads no reply: mailgate stops reading
    (backpressure) instead of buffering replies without bound, keeps serving others,
    and the command timeout ends the stuck client."""
    # HELP past the junk-command limit counts as an error: a limit out of reach keeps
    # this about backpressure, not about the error limit ending the session.
    mg = mailgate({"server": {"command_timeout": "3s", "max_errors": 10**9}})
    assert mg.proc is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Small kernel buffers on our side, so what mailgate holds is what is measured.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", mg.smtp_port))
    assert sock.recv(4096).startswith(b"220 ")
    time.sleep(0.2)
    before = _rss_kib(mg.proc.pid)
    sent = _flood(sock, b"HELP\r\n" * 10000, total=12 * 1024 * 1024)
    grown_mib = (_rss_kib(mg.proc.pid) - before) / 1024
    assert grown_mib < 20, f"RSS grew {grown_mib:.1f} MiB after {sent} bytes"
    # The process still serves everyone else.
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.2") as other:
        assert other.banner().code == 220
        assert other.cmd("EHLO other.example.org").code == 250
        assert other.cmd("NOOP").code == 250
    # The command timeout ends the stuck client; its socket is not kept open forever
    # waiting for replies nobody reads (TCP_INFO's first byte is the TCP state).
    deadline = time.monotonic() + 15
    while "end=timeout" not in mg.logs():
        assert time.monotonic() < deadline, mg.logs()
    while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED:
        assert time.monotonic() < deadline, "mailgate kept the connection open"
        time.sleep(0.2)
    sock.close()


def test_client_reading_late_gets_every_reply(mailgate: StartMailgate) -> None:
    """Backpressure only delays: a client that reads after pipelining a lot of
    commands gets one reply for each, in order."""
    mg = mailgate({"server": {"max_errors": 10**9}})  # thousands of junk commands
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", mg.smtp_port))
    assert sock.recv(4096).startswith(b"220 ")
    n = 300_000
    sock.sendall(b"EHLO client.example.org\r\n")
    payload = b"HELP\r\n" * n + b"QUIT\r\n"
    sock.settimeout(10)
    # Start reading only after the server has had to hold back once.
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    time.sleep(1.0)
    got = read_until_eof(sock, timeout=30)
    sender.join(10)
    sock.close()
    codes = _codes(got)
    assert codes[0].startswith("250")
    assert codes[1:-1] == ["214 2.0.0"] * n
    assert codes[-1].startswith("221")


# -- session_timeout applies inside a command line --------------------------------------------
def _dribble_until_reply(sock: socket.socket, first: bytes, limit: float) -> bytes:
    """Send ``first``, then one byte every 0.5 s; return what the server answers."""
    sock.sendall(first)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        sock.settimeout(0.5)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            try:
                sock.sendall(b"x")
            except OSError:
                break
            continue
        return data
    return b""


def test_session_timeout_inside_a_dribbled_command_line(mailgate: StartMailgate) -> None:
    """A command line trickled a byte at a time cannot outlive session_timeout."""
    mg = mailgate({"server": {"command_timeout": "2s", "session_timeout": "3s"}})
    sock = _connect(mg.smtp_port)
    started = time.monotonic()
    data = _dribble_until_reply(sock, b"EH", limit=10)
    assert data.startswith(b"421 4.4.2 "), data
    assert time.monotonic() - started < 5
    sock.close()


def test_session_timeout_while_an_overlong_line_is_discarded(mailgate: StartMailgate) -> None:
    """Past the line limit mailgate discards up to the LF; that wait has the same deadline."""
    mg = mailgate({"server": {"command_timeout": "2s", "session_timeout": "3s"}})
    sock = _connect(mg.smtp_port)
    started = time.monotonic()
    data = _dribble_until_reply(sock, b"NOOP " + b"a" * 2100, limit=10)
    assert data.startswith(b"421 4.4.2 "), data
    assert time.monotonic() - started < 5
    sock.close()
