"""Limits and protocol hygiene of the front end, with the contract's replies."""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.conftest import StartMailgate, message
from tests.rig.client import RawSMTP, smtp_client
from tests.rig.upstream import ScriptedUpstream


def _session(mg_port: int, source_ip: str = "127.0.0.1") -> RawSMTP:
    r = RawSMTP("127.0.0.1", mg_port, source_ip=source_ip).connect()
    assert r.banner().code == 220
    assert r.cmd("EHLO client.example.org").code == 250
    return r


def test_size_declared_too_big(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate({"server": {"max_message_size": 10000}})
    r = _session(mg.smtp_port)
    reply = r.cmd("MAIL FROM:<a@example.org> SIZE=20000")
    assert (reply.code, reply.text.split()[0]) == (552, "5.3.4")


def test_size_actual_too_big_is_refused_and_not_relayed(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"max_message_size": 10000}})
    r = _session(mg.smtp_port)
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    assert r.cmd("DATA").code == 354
    r.send(message(body="x" * 70 + "\r\n") * 200 + b".\r\n")
    reply = r.read_reply()
    assert (reply.code, reply.text.split()[0]) == (552, "5.3.4")
    # The session stays usable.
    assert r.cmd("NOOP").code == 250
    assert upstream.transactions == []


def test_too_many_recipients(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate({"server": {"max_recipients": 2}})
    r = _session(mg.smtp_port)
    r.cmd("MAIL FROM:<a@example.org>")
    assert r.cmd("RCPT TO:<bob@example.test>").code == 250
    assert r.cmd("RCPT TO:<carol@example.test>").code == 250
    reply = r.cmd("RCPT TO:<alice@example.test>")
    assert (reply.code, reply.text.split()[0]) == (452, "4.5.3")


def test_refused_verbs_never_reach_the_upstream(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate()
    r = _session(mg.smtp_port)
    for verb in ("VRFY bob", "EXPN staff", "TURN", "ETRN example.test"):
        reply = r.cmd(verb)
        assert (reply.code, reply.text.split()[0]) == (502, "5.5.1"), verb
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("QUIT")
    time.sleep(0.2)
    verbs = {v for s in upstream.sessions for v in s.verbs()}
    assert not verbs & {"VRFY", "EXPN", "TURN", "ETRN"}


def test_command_timeout_gives_421_and_closes(mailgate: StartMailgate) -> None:
    mg = mailgate({"server": {"command_timeout": "1s"}})
    r = _session(mg.smtp_port)
    reply = r.read_reply(timeout=5)
    assert (reply.code, reply.text.split()[0]) == (421, "4.4.2")
    assert r.is_closed()


def test_data_timeout_gives_421_and_nothing_is_relayed(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"command_timeout": "1s"}})
    r = _session(mg.smtp_port)
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(b"Subject: slowloris\r\n\r\nand then nothing")
    reply = r.read_reply(timeout=5)
    assert (reply.code, reply.text.split()[0]) == (421, "4.4.2")
    assert upstream.transactions == []


def test_slowloris_session_lifetime(mailgate: StartMailgate) -> None:
    """A client trickling NOOPs forever is cut off by session_timeout."""
    mg = mailgate({"server": {"command_timeout": "2s", "session_timeout": "2s"}})
    r = _session(mg.smtp_port)
    deadline = time.monotonic() + 6
    last = None
    while time.monotonic() < deadline:
        last = r.cmd("NOOP", timeout=5)
        if last.code != 250:
            break
        time.sleep(0.3)
    assert last is not None and last.code == 421


def test_connection_limit_per_ip(mailgate: StartMailgate) -> None:
    mg = mailgate({"server": {"max_connections_per_ip": 2}})
    a = _session(mg.smtp_port, "127.0.0.11")
    b = _session(mg.smtp_port, "127.0.0.11")
    third = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.11").connect()
    reply = third.banner()
    assert (reply.code, reply.text.split()[0]) == (421, "4.7.0")
    # Another address is still welcome.
    other = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.12").connect()
    assert other.banner().code == 220
    for s in (a, b, other):
        s.close()


def test_per_ip_limit_with_two_workers_is_the_limit_of_the_whole_server(
    mailgate: StartMailgate,
) -> None:
    """Both workers count against one limit: however the kernel spreads a client's
    connections over them, four are admitted and the fifth is refused, every time."""
    mg = mailgate({"server": {"workers": 2, "max_connections_per_ip": 4}})
    for trial in range(6):
        sessions = [
            RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.13").connect() for _ in range(4)
        ]
        codes = [s.banner().code for s in sessions]
        fifth = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.13").connect()
        refused = fifth.banner()
        other = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.14").connect()
        codes.append(other.banner().code)
        for s in [*sessions, fifth, other]:
            s.close()
        assert codes == [220] * 5, (trial, codes)
        assert (refused.code, refused.text.split()[0]) == (421, "4.7.0"), trial
        time.sleep(0.2)  # the workers see the closes before the next round


def test_total_limit_with_two_workers_is_the_limit_of_the_whole_server(
    mailgate: StartMailgate,
) -> None:
    mg = mailgate({"server": {"workers": 2, "max_connections": 3}})
    for trial in range(4):
        sessions = [
            RawSMTP("127.0.0.1", mg.smtp_port, source_ip=f"127.0.0.{30 + i}").connect()
            for i in range(4)
        ]
        codes = [s.banner().code for s in sessions]
        for s in sessions:
            s.close()
        # the two workers accept in parallel: which of the four comes last varies
        assert sorted(codes) == [220, 220, 220, 421], (trial, codes)
        time.sleep(0.2)


def test_connection_limit_total(mailgate: StartMailgate) -> None:
    mg = mailgate({"server": {"max_connections": 2}})
    a = _session(mg.smtp_port, "127.0.0.21")
    b = _session(mg.smtp_port, "127.0.0.22")
    third = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.23").connect()
    assert third.banner().code == 421
    a.close()
    time.sleep(0.3)
    fourth = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.23").connect()
    assert fourth.banner().code == 220
    b.close()


def test_pregreet_client_is_refused(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate({"server": {"greet_pause": "500ms"}})
    sock = socket.create_connection(("127.0.0.1", mg.smtp_port))
    sock.sendall(b"EHLO bot\r\n")  # before the banner
    sock.settimeout(3)
    data = b""
    while not data.endswith(b"\r\n") or (data.startswith(b"220-") and data.count(b"\r\n") < 2):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"220-")
    assert b"554 5.5.1" in data
    sock.close()
    # A polite client waits for the full banner and is served.
    with smtp_client("127.0.0.1", mg.smtp_port) as c:
        assert c.ehlo("client.example.org")[0] == 250
    assert "event=pregreet" in mg.logs()


def test_error_limit_disconnects(mailgate: StartMailgate) -> None:
    mg = mailgate({"server": {"max_errors": 3}})
    r = _session(mg.smtp_port)
    codes = [r.cmd("BOGUS").code for _ in range(3)]
    assert codes == [500, 500, 500]
    reply = r.read_reply(timeout=3)
    assert (reply.code, reply.text.split()[0]) == (421, "4.7.0")
    assert r.is_closed()


def test_overlong_command_line(mailgate: StartMailgate) -> None:
    mg = mailgate()
    r = _session(mg.smtp_port)
    reply = r.cmd("MAIL FROM:<" + "a" * 5000 + "@example.org>")
    assert reply.code == 500
    assert r.cmd("NOOP").code == 250  # back in sync after the long line


def test_overlong_data_line_is_refused(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    mg = mailgate()
    r = _session(mg.smtp_port)
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
    reply = r.read_reply()
    assert reply.code == 550 and "line too long" in reply.text
    assert upstream.transactions == []


def test_sequence_errors(mailgate: StartMailgate) -> None:
    mg = mailgate()
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    assert r.cmd("MAIL FROM:<a@example.org>").code == 503  # no EHLO yet
    r.cmd("EHLO client.example.org")
    assert r.cmd("RCPT TO:<bob@example.test>").code == 503
    assert r.cmd("DATA").code == 503
    assert r.cmd("MAIL FROM:<a@example.org>").code == 250
    assert r.cmd("MAIL FROM:<a@example.org>").code == 503  # nested
    assert r.cmd("DATA").code == 554  # no valid recipients
    assert r.cmd("MAIL FROM:<a@example.org> FOO=bar").code == 503  # still nested
    r.cmd("RSET")
    assert r.cmd("MAIL FROM:<a@example.org> FOO=bar").code == 555
    assert r.cmd("MAIL FROM:<bad address@example.org>").code == 501
    assert r.cmd("AUTH PLAIN AAAA").code == 503


def test_ipv6_listener_and_xclient_address(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    if not socket.has_ipv6:
        raise AssertionError("IPv6 loopback is required on the test machine")
    from tests.rig.ports import free_port

    port = free_port()
    mg = mailgate({"server": {"listen": [f"127.0.0.1:{port}", f"[::1]:{port}"]}}, smtp_port=port)
    with smtp_client("::1", port, source_ip="::1") as c:
        c.ehlo("client.example.org")
        c.mail("a@example.org")
        c.rcpt("bob@example.test")
        assert c.data(message())[0] == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.xclient["ADDR"] == "IPV6:::1"
    assert mg.smtp_port == port


def _with_size(upstream: ScriptedUpstream, size: str) -> None:
    upstream.extensions = [e for e in upstream.extensions if not e.startswith("SIZE")]
    upstream.extensions.append(f"SIZE {size}".strip())


def test_size_advertised_is_the_upstreams_when_smaller(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """RFC 1870: SIZE is what the server will accept. In front of a Postfix with a
    smaller message_size_limit, offering ours made clients upload what Postfix refuses."""
    _with_size(upstream, "1000000")
    mg = mailgate()  # max_message_size 25MiB
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    assert r.banner().code == 220
    ehlo = r.cmd("EHLO client.example.org")
    assert "SIZE 1000000" in ehlo.lines, ehlo.lines
    reply = r.cmd("MAIL FROM:<a@example.org> SIZE=2000000")
    assert (reply.code, reply.text.split()[0]) == (552, "5.3.4")
    assert r.cmd("MAIL FROM:<a@example.org> SIZE=900000").code == 250


@pytest.mark.parametrize(("theirs", "advertised"), [("0", 26214400), ("", 26214400)])
def test_size_advertised_is_ours_when_the_upstream_names_no_limit(
    mailgate: StartMailgate, upstream: ScriptedUpstream, theirs: str, advertised: int
) -> None:
    _with_size(upstream, theirs)
    mg = mailgate()
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    assert r.banner().code == 220
    assert f"SIZE {advertised}" in r.cmd("EHLO client.example.org").lines


def test_recipients_past_the_limit_are_not_errors(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """RFC 5321 4.5.3.1.10: after 452 the client delivers to the recipients accepted and
    sends the rest later. Counting each 452 as an error ended the session first."""
    mg = mailgate({"server": {"max_recipients": 2, "max_errors": 3}})
    r = _session(mg.smtp_port)
    assert r.cmd("MAIL FROM:<a@example.org>").code == 250
    codes = [r.cmd(f"RCPT TO:<u{n}@example.test>").code for n in range(8)]
    assert codes == [250, 250] + [452] * 6
    assert r.cmd("DATA").code == 354
    r.send(message() + b"\r\n.\r\n")
    assert r.read_reply().code == 250
    assert upstream.transactions[-1].rcpts == ["u0@example.test", "u1@example.test"]


def test_delivered_message_resets_the_error_count(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """As Postfix's smtpd_hard_error_limit: errors made "without delivering mail". A list
    message with stale addresses must not cost the next message its session."""
    upstream.script(rcpt={"gone@example.test": "550 5.1.1 no such user"})
    mg = mailgate({"server": {"max_errors": 3}})
    r = _session(mg.smtp_port)
    for n in range(3):
        assert r.cmd("MAIL FROM:<a@example.org>").code == 250, n
        assert r.cmd("RCPT TO:<gone@example.test>").code == 550
        assert r.cmd("RCPT TO:<gone@example.test>").code == 550
        assert r.cmd("RCPT TO:<bob@example.test>").code == 250
        assert r.cmd("DATA").code == 354
        r.send(message() + b"\r\n.\r\n")
        assert r.read_reply().code == 250
    # Without deliveries the limit still holds.
    codes = [r.cmd("BOGUS").code for _ in range(3)]
    assert codes == [500, 500, 500]
    assert r.read_reply(timeout=3).code == 421
