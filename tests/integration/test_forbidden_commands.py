"""Non-SMTP input ends the session at once, as Postfix's smtpd_forbidden_commands does.

A web browser tricked into POSTing to port 25 (a cross-protocol attack) sends an HTTP
request whose body may hold SMTP commands; an HTTP proxy probe sends CONNECT; a
client that lost its place sends message header lines as commands. Answering each
line with 500 would let the body's commands run; Postfix instead answers
``221 2.7.0 Error: I can break rules, too. Goodbye.`` and closes. So does mailgate.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import AUTH_CHECKS_OFF, StartMailgate
from tests.rig.client import RawSMTP
from tests.rig.mailgate import MailgateProcess, deep_merge
from tests.rig.upstream import ScriptedUpstream

GOODBYE = b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"


def _start(mailgate: StartMailgate, **server: object) -> MailgateProcess:
    return mailgate(deep_merge(AUTH_CHECKS_OFF, {"dnsbl": {"enabled": False}, "server": server}))


@pytest.mark.parametrize(
    "line",
    [
        b"POST / HTTP/1.1",
        b"GET /index.html HTTP/1.0",
        b"connect mx.example.org:25 HTTP/1.1",  # any case, as Postfix
        b"Host: mx.example.org",  # a header line: a client lost in its own message
        b"Subject: hello",
        b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello on the plain port
        b".",  # a message's end, outside DATA
        b"250 ok",  # a server's reply where a command belongs
    ],
)
def test_non_smtp_input_gets_221_and_the_connection_is_closed(
    mailgate: StartMailgate, upstream: ScriptedUpstream, line: bytes
) -> None:
    mg = _start(mailgate)
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.240") as c:
        assert c.banner().code == 220
        assert c.cmd("EHLO client.example.org").code == 250
        c.send(line + b"\r\n")
        reply = c.read_reply()
        assert reply.raw == GOODBYE
        assert c.is_closed(timeout=3)
    logs = mg.logs()
    assert "event=forbidden_command" in logs and "level=warning" in logs
    assert "end=forbidden_command" in logs


def test_a_browser_post_never_runs_the_smtp_in_its_body(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = _start(mailgate)
    body = (
        b"EHLO attacker.example\r\nMAIL FROM:<spam@attacker.example>\r\n"
        b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: via your browser\r\n\r\nhi\r\n.\r\n"
    )
    request = (
        b"POST / HTTP/1.1\r\nHost: mx.example.org:25\r\nContent-Type: text/plain\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.241") as c:
        c.send(request)  # a browser sends the lot at once, without waiting for a banner
        assert c.banner().code == 220
        assert c.read_reply().raw == GOODBYE
        assert c.is_closed(timeout=3)
        assert c.pending() == b""  # nothing after the goodbye: the rest was never read
    assert not any(cmd.startswith(b"MAIL") for cmd in upstream.commands())
    assert upstream.transactions == []


def test_the_list_is_policy_and_smtp_goes_on_unhindered(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = _start(mailgate, forbidden_commands=["USER", "PASS"])
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.242") as c:
        assert c.banner().code == 220
        assert c.cmd("ehlo client.example.org").code == 250  # lower case is SMTP too
        assert c.cmd("GET / HTTP/1.0").code == 500  # no longer on the list: an error
        assert c.cmd("NOOP").code == 250
        assert c.cmd("XYZZY").code == 500  # unknown, but a word: an error, not an attack
        assert c.cmd("").code == 500  # an empty line is not bogus either
        c.send(b"user alice\r\n")
        assert c.read_reply().raw == GOODBYE
        assert c.is_closed(timeout=3)


def test_a_transaction_in_progress_is_dropped_upstream(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = _start(mailgate)
    with RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.243") as c:
        assert c.banner().code == 220
        assert c.cmd("EHLO client.example.org").code == 250
        assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert c.cmd("From: alice@example.org").raw == GOODBYE
        assert c.is_closed(timeout=3)
    assert upstream.transactions == []
    assert not any(cmd.startswith(b"DATA") for cmd in upstream.commands())
