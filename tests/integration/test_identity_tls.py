"""Who the client is (PROXY protocol, XFORWARD) and STARTTLS."""

from __future__ import annotations

import smtplib
import ssl
import time
from pathlib import Path

from filter.app import tls_context
from filter.policy.schema import policy_from_dict
from tests.integration.conftest import StartMailgate, message
from tests.rig.client import RawSMTP
from tests.rig.tlscerts import issue_certificate
from tests.rig.upstream import ScriptedUpstream


def _deliver(r: RawSMTP) -> int:
    r.cmd("MAIL FROM:<a@example.org>")
    r.cmd("RCPT TO:<bob@example.test>")
    r.cmd("DATA")
    r.send(message() + b".\r\n")
    return r.read_reply().code


def test_proxy_protocol_v1_sets_the_client(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"proxy_protocol": True}})
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.send(b"PROXY TCP4 192.0.2.44 198.51.100.1 40000 25\r\n")
    assert r.banner().code == 220
    r.cmd("EHLO client.example.org")
    assert _deliver(r) == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.xclient["ADDR"] == "192.0.2.44"
    assert txn.xclient.get("PORT", "40000") == "40000"


def test_proxy_protocol_v2_ipv6(mailgate: StartMailgate, upstream: ScriptedUpstream) -> None:
    import ipaddress
    import struct

    mg = mailgate({"server": {"proxy_protocol": True}})
    src = ipaddress.IPv6Address("2001:db8::7").packed
    dst = ipaddress.IPv6Address("2001:db8::1").packed
    body = src + dst + struct.pack("!HH", 50000, 25)
    header = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21]) + struct.pack("!H", len(body)) + body
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.send(header)
    assert r.banner().code == 220
    r.cmd("EHLO client.example.org")
    assert _deliver(r) == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.xclient["ADDR"] == "IPV6:2001:db8::7"


def test_proxy_protocol_garbage_is_dropped(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"proxy_protocol": True}})
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.send(b"EHLO not-a-proxy-header\r\n")
    assert r.is_closed(timeout=3)
    assert not any(c.startswith(b"MAIL") for c in upstream.commands())


def test_xforward_from_an_allowed_host_names_the_real_client(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"xforward_hosts": ["127.0.0.1/32"]}})
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    ehlo = r.cmd("EHLO postfix.example.test")
    assert "XFORWARD" in ehlo.text
    reply = r.cmd(
        "XFORWARD NAME=mail.sender.example ADDR=203.0.113.9 PORT=41000"
        " PROTO=ESMTP HELO=mail.sender.example"
    )
    assert reply.code == 250
    assert _deliver(r) == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.xclient["ADDR"] == "203.0.113.9"
    assert txn.xclient["NAME"] == "mail.sender.example"
    assert txn.xclient["HELO"] == "mail.sender.example"


def test_xforward_from_anyone_else_is_refused(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    mg = mailgate({"server": {"xforward_hosts": ["127.0.0.1/32"]}})
    r = RawSMTP("127.0.0.1", mg.smtp_port, source_ip="127.0.0.9").connect()
    r.banner()
    assert "XFORWARD" not in r.cmd("EHLO sneaky.example").text
    reply = r.cmd("XFORWARD ADDR=10.1.2.3")
    assert reply.code == 550
    assert _deliver(r) == 250
    [txn] = upstream.wait_for_transactions(1)
    assert txn.xclient["ADDR"] == "127.0.0.9"


def test_xforward_values_with_control_characters_are_refused(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """xtext can encode CR LF (+0D+0A): such a HELO would break our A-R field open."""
    mg = mailgate({"server": {"xforward_hosts": ["127.0.0.1/32"]}})
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO postfix.example")
    bad = r.cmd("XFORWARD ADDR=203.0.113.9 HELO=helo+0D+0AX-Injected:+20yes")
    assert (bad.code, bad.text.split()[0]) == (501, "5.5.4")
    # U+2028 (a line break to many log readers) and C1 CSI (U+009B), xtext-encoded.
    for encoded in ("x+E2+80+A8ts+3D1", "x+C2+9B31m"):
        bad = r.cmd(f"XFORWARD ADDR=203.0.113.9 HELO={encoded}")
        assert (bad.code, bad.text.split()[0]) == (501, "5.5.4"), encoded
    assert r.cmd("XFORWARD ADDR=203.0.113.9 HELO=good.example").code == 250
    r.close()


def test_xforward_makes_a_trusted_peer_untrusted_for_a_remote_client(
    mailgate: StartMailgate, upstream: ScriptedUpstream
) -> None:
    """Postfix on 127.0.0.1 is trusted; the internet client it forwards is not."""
    mg = mailgate(
        {"server": {"xforward_hosts": ["127.0.0.1/32"], "trusted_networks": ["127.0.0.1/32"]}}
    )
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO postfix.example.test")
    r.cmd("XFORWARD ADDR=203.0.113.9 NAME=[UNAVAILABLE] HELO=x.example PROTO=ESMTP")
    assert _deliver(r) == 250
    [txn] = upstream.wait_for_transactions(1)
    # Checked (not trusted): mailgate's spam headers are present.
    assert b"X-Spam-Status:" in txn.message


def test_starttls_then_relay(
    mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    _, cert, key = issue_certificate(tmp_path, "mx.mailgate.test")
    mg = mailgate({"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", mg.smtp_port, timeout=10) as c:
        c.ehlo("client.example.org")
        assert c.has_extn("starttls")
        assert c.starttls(context=ctx)[0] == 220
        c.ehlo("client.example.org")
        assert not c.has_extn("starttls")
        c.mail("a@example.org")
        c.rcpt("bob@example.test")
        assert c.data(message())[0] == 250
    assert len(upstream.wait_for_transactions(1)) == 1


def test_starttls_drops_pipelined_plaintext(
    mailgate: StartMailgate, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """CVE-2011-0411: commands sent with STARTTLS must not run inside TLS."""
    _, cert, key = issue_certificate(tmp_path, "mx.mailgate.test")
    mg = mailgate({"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    r.cmd("EHLO client.example.org")
    r.send(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
    assert r.read_reply().code == 220
    time.sleep(0.5)
    assert "dropped" in mg.logs() and "after STARTTLS" in mg.logs()
    r.close()
    assert not any(c.startswith(b"MAIL") for c in upstream.commands())


def test_starttls_not_offered_without_certificate(mailgate: StartMailgate) -> None:
    mg = mailgate()
    r = RawSMTP("127.0.0.1", mg.smtp_port).connect()
    r.banner()
    assert "STARTTLS" not in r.cmd("EHLO client.example.org").text
    assert r.cmd("STARTTLS").code == 502


def test_server_tls_refuses_renegotiation_and_old_protocols(tmp_path: Path) -> None:
    """The STARTTLS context: TLS 1.2 at least, and no client-started renegotiation (a
    handshake's CPU for the server each time, for nothing SMTP needs)."""
    _, cert, key = issue_certificate(tmp_path, "mx.mailgate.test")
    policy, problems = policy_from_dict(
        {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}}
    )
    assert policy is not None, problems
    ctx = tls_context(policy)
    assert ctx is not None
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
