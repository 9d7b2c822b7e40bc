"""Hostile clients on STARTTLS, the PROXY protocol header and the metrics/health listener.

Each case is what a careful MTA (Postfix) does: every wait is bounded by the policy's
timeouts and connection limits, bad input gets an SMTP error or a log line that says
why, and nobody but the client a PROXY header names is believed about its address.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate, message
from tests.rig.client import RawSMTP, read_until_eof
from tests.rig.mailgate import MailgateProcess
from tests.rig.tlscerts import issue_certificate
from tests.rig.upstream import ScriptedUpstream

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FAST = {"server": {"command_timeout": "2s"}, **AUTH_CHECKS_OFF}


def _client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_policy(tmp_path: Path) -> dict[str, object]:
    _, cert, key = issue_certificate(tmp_path, "mx.mailgate.test")
    return {"server": {"command_timeout": "2s", "tls": {"cert_file": cert, "key_file": key}}}


def _log_line(mg: MailgateProcess, pattern: str, timeout: float = 5.0) -> str:
    """The first log line matching ``pattern``, waiting for the batched log to flush."""
    deadline = time.monotonic() + timeout
    while True:
        for line in mg.stderr().splitlines():
            if re.search(pattern, line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matches {pattern!r}\n{mg.logs()}")
        time.sleep(0.1)


class BioTLS:
    """A TLS client over a plain socket that can send close_notify and keep reading
    (ssl.SSLSocket.unwrap would wait for the server's own close_notify)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext | None = None) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = (ctx or _client_context()).wrap_bio(self.incoming, self.outgoing)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(65536)
                if not data:
                    raise EOFError("server closed during the handshake") from None
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def close_notify(self) -> None:
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.unwrap()
        self._flush()

    def read_until(self, expected: bytes, timeout: float = 10.0) -> tuple[bytes, str]:
        """Decrypted bytes until ``expected`` is among them or the stream ends, and why."""
        deadline = time.monotonic() + timeout
        got = b""
        while expected not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                return got, "timeout"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return got, "timeout"
            if not data:
                self.incoming.write_eof()
            else:
                self.incoming.write(data)
            while True:
                try:
                    chunk = self.obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    return got, "close_notify"
                except ssl.SSLError as exc:
                    return got, type(exc).__name__
                if not chunk:
                    break
                got += chunk
            if not data:
                return got, "eof"
        return got, "found"


def _starttls(port: int, ctx: ssl.SSLContext | None = None) -> BioTLS:
    r = RawSMTP("127.0.0.1", port)
    assert r.banner().code == 220
    r.cmd("EHLO client.example.org")
    assert r.cmd("STARTTLS").code == 220
    assert r.sock is not None
    return BioTLS(r.sock, ctx)


ENVELOPE = b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\n"


# -- STARTTLS ------------------------------------------------------------------------------
def test_stalled_or_broken_tls_handshakes_are_bounded_and_logged(
    mailgate: StartMailgate, tmp_path: Path
) -> None:
    """Silence, a ClientHello dribbled a byte at a time, garbage and a client gone
    mid-handshake: each ends within command_timeout with a log line saying why."""
    mg = mailgate({**_tls_policy(tmp_path), **AUTH_CHECKS_OFF})

    def after_starttls() -> RawSMTP:
        r = RawSMTP("127.0.0.1", mg.smtp_port)
        r.banner()
        r.cmd("EHLO client.example.org")
        assert r.cmd("STARTTLS").code == 220
        return r

    silent, slow, garbage, gone = (after_starttls() for _ in range(4))
    hello = ssl.MemoryBIO()
    obj = _client_context().wrap_bio(ssl.MemoryBIO(), hello)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    client_hello = hello.read()
    garbage.send(b"EHLO this is not a ClientHello\r\n" * 4)
    gone.close()
    started = time.monotonic()
    with pytest.raises(OSError):  # the server gives up while the hello still trickles
        for byte in client_hello:
            slow.send(bytes([byte]))
            time.sleep(0.2)
            assert time.monotonic() - started < 6, "a dribbled ClientHello kept the session"
    assert garbage.is_closed(timeout=2)
    assert silent.is_closed(timeout=4)
    assert time.monotonic() - started < 6
    _log_line(mg, r"TLS handshake failed: .*taking longer than 2")
    _log_line(mg, r"TLS handshake failed: .*WRONG_VERSION_NUMBER")
    # Before: "TLS handshake failed: " with nothing after it.
    _log_line(mg, r"TLS handshake failed: ConnectionResetError")
    assert not re.search(r"TLS handshake failed: *$", mg.stderr(), re.M)
    assert "Traceback" not in mg.stderr()


def test_close_notify_after_the_final_dot_still_gets_every_reply(
    mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """TLS 1.3 half-close: the client's close_notify ends its sending side only, as a
    TCP half-close does in clear text; the 250 and 221 still reach it."""
    mg = mailgate({**_tls_policy(tmp_path), **AUTH_CHECKS_OFF})
    t = _starttls(mg.smtp_port)
    t.send(ENVELOPE + b"DATA\r\n")
    assert t.read_until(b"354 ")[1] == "found"
    t.send(message() + b".\r\nQUIT\r\n")
    t.close_notify()
    got, _ = t.read_until(b"221 ")
    assert b"250 2.0.0 Ok: queued" in got and b"221 2.0.0" in got
    assert len(upstream.wait_for_transactions(1)) == 1


def test_close_notify_inside_data_relays_nothing(
    mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    mg = mailgate({**_tls_policy(tmp_path), **AUTH_CHECKS_OFF})
    t = _starttls(mg.smtp_port)
    t.send(ENVELOPE + b"DATA\r\n")
    assert t.read_until(b"354 ")[1] == "found"
    t.send(message() + b"no final dot")
    t.close_notify()
    got, why = t.read_until(b"never")
    assert why in ("close_notify", "eof") and got == b""
    _log_line(mg, r"event=session_end .*end=client_gone")
    assert upstream.transactions == [] or not any(t.accepted for t in upstream.transactions)
    assert not any(c.startswith(b"DATA") for c in upstream.commands())


def test_starttls_twice_inside_a_transaction_and_with_oversized_input(
    mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """A second STARTTLS is 503; STARTTLS inside a transaction discards it (RFC 3207:
    nothing from before the handshake counts); a 1 MB line inside TLS is 500 and the
    session goes on; a client certificate is not required and does not break it."""
    mg = mailgate({**_tls_policy(tmp_path), **AUTH_CHECKS_OFF})
    r = RawSMTP("127.0.0.1", mg.smtp_port)
    r.banner()
    r.cmd("EHLO client.example.org")
    assert r.cmd("MAIL FROM:<a@example.org>").code == 250
    assert r.cmd("STARTTLS").code == 220
    assert r.sock is not None
    (tmp_path / "client").mkdir()
    _, cert, key = issue_certificate(tmp_path / "client", "client.example.org")
    ctx = _client_context()
    ctx.load_cert_chain(cert, key)
    t = BioTLS(r.sock, ctx)
    t.send(b"EHLO client.example.org\r\nRCPT TO:<bob@example.test>\r\nSTARTTLS\r\n")
    got, _ = t.read_until(b"5.5.1", timeout=5)
    assert b"250-STARTTLS" not in got
    assert re.search(rb"\r\n503 5\.5\.1[^\r]*\r\n503 5\.5\.1", got), got  # RCPT, STARTTLS
    t.send(b"EHLO client.example.org\r\n" + b"A" * (1 << 20) + b"\r\nNOOP\r\n")
    got, _ = t.read_until(b"250 2.0.0 Ok\r\n", timeout=10)
    assert b"500 5.5.2" in got and got.endswith(b"250 2.0.0 Ok\r\n")
    t.send(ENVELOPE + b"DATA\r\n")
    assert t.read_until(b"354 ")[1] == "found"
    t.send(message() + b".\r\n")
    assert t.read_until(b"250 2.0.0 Ok: queued")[1] == "found"
    [txn] = upstream.wait_for_transactions(1)
    assert txn.mail_from == "a@example.org"


# -- PROXY protocol ------------------------------------------------------------------------
def _v2(command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + body


IPV4_BODY = bytes([192, 0, 2, 5, 192, 0, 2, 1]) + struct.pack("!HH", 40000, 25)
BAD_HEADERS = {
    "v1 line over 107 bytes": b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
    "v1 LF without CR": b"PROXY TCP4 192.0.2.9 192.0.2.1 1 25\n",
    "v1 IPv6 address as TCP4": b"PROXY TCP4 ::1 ::1 1 25\r\n",
    "v1 port out of range": b"PROXY TCP4 192.0.2.9 192.0.2.1 65536 25\r\n",
    "v1 non-ASCII": b"PROXY UNKNOWN \xff\r\n",
    "v2 length over 536": _v2(1, 0x11, IPV4_BODY, length=65535),
    "v2 length shorter than the addresses": _v2(1, 0x11, IPV4_BODY, length=4) + IPV4_BODY,
    "v2 TLV running past the header": _v2(1, 0x11, IPV4_BODY + b"\x01\x00\x14h2"),
    "v2 version 1": V2_SIGNATURE + b"\x11\x11" + struct.pack("!H", 12) + IPV4_BODY,
    "SMTP instead of a header": b"EHLO client.example.org\r\n",
}


def test_bad_proxy_headers_are_dropped_and_slow_ones_bounded(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """Malformed headers are dropped at once with a proxy_refused line; a header that
    never completes (silence, a lying v2 length, a byte at a time) is dropped within
    command_timeout (before: a fixed 10s whatever the policy said)."""
    mg = mailgate({**FAST, "server": {"command_timeout": "2s", "proxy_protocol": True}})
    for name, header in BAD_HEADERS.items():
        r = RawSMTP("127.0.0.1", mg.smtp_port)
        r.send(header)
        assert r.is_closed(timeout=1), name
    slow = [RawSMTP("127.0.0.1", mg.smtp_port) for _ in range(3)]
    slow[1].send(_v2(1, 0x11, IPV4_BODY, length=100))
    started = time.monotonic()
    header = b"PROXY TCP4 192.0.2.9 192.0.2.1 1 25\r\n"
    with pytest.raises(OSError):
        for byte in header[:-1]:
            slow[2].send(bytes([byte]))
            time.sleep(0.1)
            assert time.monotonic() - started < 5, "a dribbled header kept the connection"
    for r in slow:
        assert r.is_closed(timeout=5 - (time.monotonic() - started))
    _log_line(mg, r"proxy_refused .*reason=\"no complete header within 2s")
    for reason in ("v1 line longer than 107", "not terminated by CRLF", "does not match TCP4"):
        _log_line(mg, f"proxy_refused .*{reason}")
    assert "Traceback" not in mg.stderr()
    assert upstream.transactions == []


def test_good_proxy_headers_name_the_client(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """v2 with TLVs, v2 LOCAL (a health check) and v1 UNKNOWN keep their meaning."""
    mg = mailgate({**FAST, "server": {"command_timeout": "2s", "proxy_protocol": True}})
    tlv = IPV4_BODY + b"\x01\x00\x02h2" + b"\x04\x00\x03abc"
    for header, client in (
        (_v2(1, 0x11, tlv), "192.0.2.5"),
        (_v2(0, 0x11, IPV4_BODY), "127.0.0.1"),  # LOCAL: the addresses are ignored
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    ):
        r = RawSMTP("127.0.0.1", mg.smtp_port)
        r.send(header)
        assert r.banner().code == 220
        r.send(b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\n")
        r.send(b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
        for _ in range(4):
            r.read_reply()
        r.send(message() + b".\r\nQUIT\r\n")
        assert r.read_reply().code == 250
        r.close()
        txn = upstream.wait_for_transactions(1)[-1]
        assert txn.xclient["ADDR"] == client
        upstream.clear_records()


def test_xforward_from_behind_a_balancer_is_not_believed(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """The balancer's address is in xforward_hosts, but the XFORWARD comes from the
    client behind it. Before: advertised, accepted, and the spoofed address used."""
    mg = mailgate(
        {
            **FAST,
            "server": {
                "command_timeout": "2s",
                "proxy_protocol": True,
                "xforward_hosts": ["127.0.0.1/32"],
            },
        }
    )
    r = RawSMTP("127.0.0.1", mg.smtp_port)
    r.send(b"PROXY TCP4 198.51.100.77 192.0.2.1 40000 25\r\n")
    assert r.banner().code == 220
    assert "XFORWARD" not in r.cmd("EHLO client.example.org").text
    assert r.cmd("XFORWARD ADDR=203.0.113.200 NAME=spoof.example.org").code == 550
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(message() + b".\r\n")
    assert r.read_reply().code == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.xclient["ADDR"] == "198.51.100.77"


def test_a_proxy_header_without_proxy_protocol_is_just_a_bad_command(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate(FAST)
    r = RawSMTP("127.0.0.1", mg.smtp_port)
    r.banner()
    assert r.cmd("PROXY TCP4 203.0.113.9 192.0.2.1 40000 25").code == 500
    r.cmd("EHLO client.example.org")
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(message() + b".\r\n")
    assert r.read_reply().code == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.xclient["ADDR"] == "127.0.0.1"


def test_connections_waiting_for_their_proxy_header_count_in_max_connections(
    mailgate: StartMailgate,
) -> None:
    """Before: silent connections were not counted until their header arrived, so anyone
    reaching the port could hold any number of them past max_connections."""
    policy = {"command_timeout": "2s", "proxy_protocol": True, "max_connections": 3}
    mg = mailgate({**FAST, "server": policy})
    silent = [RawSMTP("127.0.0.1", mg.smtp_port) for _ in range(3)]
    deadline = time.monotonic() + 1.5
    while True:  # the three are accepted and counted; then a fourth is refused
        r = RawSMTP("127.0.0.1", mg.smtp_port)
        assert r.sock is not None
        data = read_until_eof(r.sock, timeout=3)
        if data.startswith(b"421 4.7.0"):
            break
        assert time.monotonic() < deadline, data
    for s in silent:
        assert s.is_closed(timeout=4)
    deadline = time.monotonic() + 3
    while True:  # the slots are free again
        r = RawSMTP("127.0.0.1", mg.smtp_port)
        r.send(b"PROXY TCP4 192.0.2.9 192.0.2.1 1 25\r\n")
        if r.banner().code == 220:
            break
        assert time.monotonic() < deadline
    _log_line(mg, r"connection_refused .*reason=refused_limit")


# -- the metrics/health listener -----------------------------------------------------------
def _http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return read_until_eof(s, timeout)


def test_http_listener_hostile_requests(mailgate: StartMailgate) -> None:
    mg = mailgate(FAST)
    port = mg.metrics_port
    cases = {
        b"GET /healthz HTTP/1.0\r\n\r\n": b"HTTP/1.1 200 ",
        b"GET /../../etc/passwd HTTP/1.1\r\n\r\n": b"HTTP/1.1 404 ",
        b"GET /%2e%2e/metrics HTTP/1.1\r\n\r\n": b"HTTP/1.1 404 ",
        b"GET /\xff\xfe HTTP/1.1\r\n\r\n": b"HTTP/1.1 400 ",
        b"GET /healthz HTTP/1.1\r\nX-Bin: \xff\xfe\r\n\r\n": b"HTTP/1.1 200 ",
        b"GET http://x/metrics HTTP/1.1\r\n\r\n": b"HTTP/1.1 400 ",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello": b"HTTP/1.1 405 ",
        b"DELETE /metrics HTTP/1.1\r\n\r\n": b"HTTP/1.1 405 ",
        b"CONNECT example.org:443 HTTP/1.1\r\n\r\n": b"HTTP/1.1 400 ",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": b"HTTP/1.1 505 ",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n": b"HTTP/1.1 431 ",
        b"GET / HTTP/1.1\r\n" + b"X-B: c\r\n" * 2000 + b"\r\n": b"HTTP/1.1 431 ",
    }
    for request, status in cases.items():
        got = _http(port, request)
        assert got.startswith(status), (request[:60], got[:80])
        assert b"Connection: close\r\n" in got
    # Keep-alive is never offered: a pipelined second request is not answered.
    got = _http(
        port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert got.count(b"HTTP/1.1") == 1 and got.endswith(b"ok\n")
    assert "Traceback" not in mg.stderr()


def test_idle_http_connections_do_not_starve_health_checks(mailgate: StartMailgate) -> None:
    """Before: 64 idle sockets (the listener's limit) made every probe get a bare close
    for as long as the attacker kept reconnecting; a failing liveness probe restarts
    the service. Now the oldest idle connection makes room."""
    mg = mailgate(FAST)
    idle = [socket.create_connection(("127.0.0.1", mg.metrics_port)) for _ in range(80)]
    try:
        for s in idle[:10]:
            s.sendall(b"GET /heal")  # half a request head: still idle
        time.sleep(0.3)
        for _ in range(3):
            assert _http(mg.metrics_port, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"ok\n")
        smtp = RawSMTP("127.0.0.1", mg.smtp_port)
        assert smtp.banner().code == 220
        smtp.close()
    finally:
        for s in idle:
            s.close()
    _log_line(mg, r"dropped the oldest idle one")


def test_many_concurrent_scrapes_with_workers(mailgate: StartMailgate) -> None:
    """/metrics merges the workers' files in a thread: many at once all succeed and
    SMTP keeps answering meanwhile."""
    mg = mailgate({**FAST, "server": {"command_timeout": "2s", "workers": 2}})
    results: list[bytes] = []

    def scrape() -> None:
        results.append(_http(mg.metrics_port, b"GET /metrics HTTP/1.1\r\n\r\n", timeout=15))

    threads = [threading.Thread(target=scrape) for _ in range(40)]
    for t in threads:
        t.start()
    smtp = RawSMTP("127.0.0.1", mg.smtp_port, timeout=5)
    assert smtp.banner().code == 220
    assert smtp.cmd("NOOP").code == 250
    for t in threads:
        t.join(20)
    assert len(results) == 40
    bad = [r[:200] for r in results if not (r.startswith(b"HTTP/1.1 200 ") and b"mailgate_" in r)]
    assert not bad, (bad, mg.logs()[-4000:])
