"""The rig itself: if these fail, every integration/e2e result is suspect."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import time
import tomllib
from pathlib import Path

import dns.flags
import dns.message
import dns.nameserver
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tests.rig.client import RawSMTP, smtp_client
from tests.rig.dnsserver import ZoneDNSServer
from tests.rig.mailgate import MailgateProcess, deep_merge, dump_toml
from tests.rig.postfix import PostfixInstance
from tests.rig.upstream import ScriptedUpstream

MSG = b"From: a@example.org\r\nTo: bob@example.test\r\nSubject: rig\r\n\r\nhello rig\r\n"


# -- Postfix -------------------------------------------------------------------------------
@pytest.mark.postfix
def test_postfix_delivers_to_maildir(mailbox_reset: PostfixInstance) -> None:
    pf = mailbox_reset
    with smtp_client("127.0.0.1", pf.listen_port) as c:
        c.sendmail("a@example.org", ["bob@example.test", "carol@example.test"], MSG)
    (bob,) = pf.wait_for_messages("bob", 1)
    pf.wait_for_messages("carol", 1)
    assert b"hello rig" in bob
    assert pf.messages("alice") == []
    pf.clear_mail()
    assert pf.messages("bob") == []


@pytest.mark.postfix
def test_postfix_rejects_unknown_user_and_relay(postfix: PostfixInstance) -> None:
    with smtp_client("127.0.0.1", postfix.listen_port) as c:
        c.ehlo()
        assert c.mail("a@example.org")[0] == 250
        code, text = c.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = c.rcpt("x@elsewhere.test")
        assert code == 554 and b"Relay access denied" in text
        assert c.rcpt("anything@discard.test")[0] == 250


@pytest.mark.postfix
def test_postfix_accepts_xclient_and_applies_it(mailbox_reset: PostfixInstance) -> None:
    pf = mailbox_reset
    with RawSMTP("127.0.0.1", pf.listen_port) as c:
        assert c.banner().code == 220
        assert "XCLIENT" in c.cmd("EHLO mailgate.test").text
        r = c.cmd("XCLIENT ADDR=127.0.0.2 NAME=mail.example.org HELO=mail.example.org PROTO=ESMTP")
        assert r.code == 220  # a fresh greeting, like after connect
        assert c.cmd("EHLO mail.example.org").code == 250
        assert c.cmd("XFORWARD SOURCE=REMOTE").code == 250
        assert c.cmd("MAIL FROM:<a@example.org>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(MSG + b".\r\n")
        assert c.read_reply().code == 250
        # The restrictions see the XCLIENT address: 127.0.0.66 is on the reject list.
        assert c.cmd("XCLIENT ADDR=127.0.0.66 NAME=[UNAVAILABLE]").code == 220
        c.cmd("EHLO bad.example.org")
        c.cmd("MAIL FROM:<a@example.org>")
        assert c.cmd("RCPT TO:<alice@example.test>").code == 554
    pf.wait_for_messages("alice", 1)
    assert "client=mail.example.org[127.0.0.2]" in pf.maillog()


@pytest.mark.postfix
def test_postfix_default_is_vulnerable_to_bare_lf_smuggling(
    mailbox_reset: PostfixInstance,
) -> None:
    """The rig Postfix must not mask smuggling: <LF>.<LF> ends DATA there."""
    pf = mailbox_reset
    with RawSMTP("127.0.0.1", pf.listen_port) as c:
        c.banner()
        c.cmd("EHLO x.test")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<bob@example.test>")
        assert c.cmd("DATA").code == 354
        c.send(
            b"Subject: one\r\n\r\nhi\n.\nMAIL FROM:<evil@example.org>\r\n"
            b"RCPT TO:<alice@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
        )
        codes = [r.code for r in c.read_replies(5)]
    assert codes == [250, 250, 250, 354, 250]
    assert b"smuggled" in pf.wait_for_messages("alice", 1)[0]


@pytest.mark.postfix
def test_postfix_filter_topology(postfix_filter: PostfixInstance) -> None:
    pf = postfix_filter
    assert pf.proxy_filter_port and pf.after_filter_port
    up = ScriptedUpstream(port=pf.proxy_filter_port).start_in_thread()
    try:
        with smtp_client("127.0.0.1", pf.listen_port, source_ip="127.0.0.3") as c:
            c.ehlo()
            c.mail("a@example.org")
            assert c.rcpt("bob@example.test")[0] == 250
            code, text = c.data(MSG)
        assert code == 250 and b"queued as" in text
        (tx,) = up.wait_for_transactions(1)
        assert tx.rcpts == ["bob@example.test"]
        assert tx.xforward.get("ADDR") == "127.0.0.3"
        assert up.sessions[0].helo == "postfix-before.mailgate.test"
        # Postfix relays the proxy's verdict: a 5xx from the filter reaches the client.
        up.script(data_end="550 5.7.1 filtered")
        with smtp_client("127.0.0.1", pf.listen_port) as c:
            c.ehlo()
            c.mail("a@example.org")
            c.rcpt("bob@example.test")
            code, text = c.data(MSG)
        assert code == 550 and b"filtered" in text
    finally:
        up.stop()
    # The after-filter smtpd believes XFORWARD from loopback and delivers.
    pf.clear_mail()
    with RawSMTP("127.0.0.1", pf.after_filter_port) as c:
        c.banner()
        c.cmd("EHLO mailgate.test")
        assert c.cmd("XFORWARD ADDR=192.0.2.9 NAME=mail.example.org PROTO=ESMTP").code == 250
        c.cmd("MAIL FROM:<a@example.org>")
        assert c.cmd("RCPT TO:<carol@example.test>").code == 250
        assert c.cmd("RCPT TO:<x@elsewhere.test>").code == 554
        c.cmd("DATA")
        c.send(MSG + b".\r\n")
        assert c.read_reply().code == 250
    pf.wait_for_messages("carol", 1)
    assert "client=mail.example.org[192.0.2.9]" in pf.maillog()


# -- DNS -----------------------------------------------------------------------------------
def _query(srv: ZoneDNSServer, name: str, rtype: str, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, use_edns=False)
    fn = dns.query.tcp if tcp else dns.query.udp
    return fn(q, srv.host, port=srv.port, timeout=2)


def _resolver(srv: ZoneDNSServer) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(srv.host, port=srv.port)]
    r.lifetime = 3
    return r


def test_dns_nxdomain_vs_nodata(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("host.example.test", "A", "192.0.2.1")
    ok = _query(dns_zone, "host.example.test", "A")
    assert ok.rcode() == dns.rcode.NOERROR and ok.flags & dns.flags.AA
    assert ok.answer[0][0].address == "192.0.2.1"
    nodata = _query(dns_zone, "host.example.test", "TXT")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority and nodata.authority[0].rdtype == dns.rdatatype.SOA
    ent = _query(dns_zone, "example.test", "TXT")  # exists (has SOA), no TXT
    assert ent.rcode() == dns.rcode.NOERROR
    nx = _query(dns_zone, "nothere.example.test", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority
    assert str(nx.authority[0].name) == "example.test."
    assert dns_zone.count("host.example.test") == 2
    assert dns_zone.count("nothere.example.test", "A") == 1


def test_dns_truncation_and_tcp_fallback(dns_zone: ZoneDNSServer) -> None:
    big = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(60)) + " -all"
    dns_zone.set_records("big.example.test", "TXT", [big, "second record"])
    udp = _query(dns_zone, "big.example.test", "TXT")
    assert udp.flags & dns.flags.TC and not udp.answer
    assert udp.question  # resolvers ignore TC replies without the question
    ans = _resolver(dns_zone).resolve("big.example.test", "TXT")
    texts = sorted(b"".join(r.strings).decode() for r in ans)
    assert texts == sorted([big, "second record"])
    assert ("big.example.test", "TXT", "tcp") in dns_zone.query_log()


def test_dns_runtime_changes_and_faults(dns_zone: ZoneDNSServer) -> None:
    dns_zone.add("mx.example.test", "MX", "10 mail.example.test")
    assert _query(dns_zone, "mx.example.test", "MX").answer
    dns_zone.set_records("mx.example.test", "MX", [])
    assert _query(dns_zone, "mx.example.test", "MX").rcode() == dns.rcode.NXDOMAIN
    dns_zone.set_name_mode("bad.example.test", "servfail")
    assert _query(dns_zone, "bad.example.test", "A").rcode() == dns.rcode.SERVFAIL
    assert _query(dns_zone, "mail.example.test", "A").answer
    dns_zone.set_mode("timeout")
    with pytest.raises(dns.exception.Timeout):
        q = dns.message.make_query("mail.example.test", "A")
        dns.query.udp(q, dns_zone.host, port=dns_zone.port, timeout=0.5)
    dns_zone.set_mode("normal")
    assert _query(dns_zone, "mail.example.test", "A", tcp=True).answer


# -- scripted upstream ---------------------------------------------------------------------
@pytest.mark.both_loops
async def test_upstream_records_wire_bytes_and_scripts(test_upstream: ScriptedUpstream) -> None:
    up = test_upstream
    up.script(rcpt={"nobody@example.test": "550 5.1.1 no such user"})
    r, w = await asyncio.open_connection("127.0.0.1", up.port)

    async def cmd(line: bytes) -> bytes:
        w.write(line)
        await w.drain()
        out = b""
        while True:
            ln = await r.readline()
            out += ln
            if ln[3:4] != b"-":
                return out

    assert (await r.readline()).startswith(b"220")
    ehlo = await cmd(b"EHLO mailgate.test\r\n")
    assert b"250-XCLIENT NAME ADDR PROTO HELO" in ehlo and ehlo.endswith(b"\r\n")
    assert (await cmd(b"XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE]\r\n")).startswith(b"220")
    assert (await cmd(b"EHLO mailgate.test\r\n")).startswith(b"250")
    assert (await cmd(b"XFORWARD ADDR=192.0.2.1\r\n")).startswith(b"250")
    assert (await cmd(b"MAIL FROM:<a@example.org> SIZE=10\r\n")).startswith(b"250")
    assert (await cmd(b"RCPT TO:<bob@example.test>\r\n")).startswith(b"250")
    assert (await cmd(b"RCPT TO:<nobody@example.test>\r\n")).startswith(b"550 5.1.1")
    assert (await cmd(b"DATA\r\n")).startswith(b"354")
    body = b"Subject: x\r\n\r\n..leading dot\r\nbare\nlf\r\n"
    assert (await cmd(body + b".\r\n")).startswith(b"250 2.0.0 Ok: queued as ")
    w.close()
    (tx,) = await up.await_transactions(1)
    assert tx.data == body and tx.message == body.replace(b"\n..", b"\n.")
    assert tx.mail_from == "a@example.org" and tx.mail_params == ["SIZE=10"]
    assert tx.rcpts == ["bob@example.test"] and tx.rejected_rcpts == ["nobody@example.test"]
    assert tx.xclient == {"ADDR": "192.0.2.1", "NAME": "[UNAVAILABLE]"}
    assert tx.xforward == {"ADDR": "192.0.2.1"} and tx.accepted and tx.queue_id


async def test_upstream_faults(test_upstream: ScriptedUpstream) -> None:
    up = test_upstream
    client = await asyncio.to_thread(smtp_client, "127.0.0.1", up.port)
    up.script(data_end="451 4.3.0 try later")
    with pytest.raises(smtplib.SMTPDataError) as ei:
        await asyncio.to_thread(client.sendmail, "a@example.org", ["bob@example.test"], MSG)
    assert ei.value.smtp_code == 451
    up.script(mail="421 4.3.0 bye")
    with pytest.raises(smtplib.SMTPSenderRefused) as ei2:
        await asyncio.to_thread(client.sendmail, "a@example.org", ["bob@example.test"], MSG)
    assert ei2.value.smtp_code == 421
    assert up.sessions[0].closed
    up.reset_script()
    up.script(drop=["data_end"], delay={"rcpt": 0.3})
    client = await asyncio.to_thread(smtp_client, "127.0.0.1", up.port)
    t0 = time.monotonic()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        await asyncio.to_thread(client.sendmail, "a@example.org", ["bob@example.test"], MSG)
    assert time.monotonic() - t0 >= 0.3
    await up.stop_listening()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", up.port), timeout=1).close()
    await up.resume_listening()
    up.reset_script()
    client = await asyncio.to_thread(smtp_client, "127.0.0.1", up.port)
    await asyncio.to_thread(client.sendmail, "a@example.org", ["bob@example.test"], MSG)
    await asyncio.to_thread(client.quit)
    assert [t.accepted for t in up.transactions] == [False, False, True]


def test_upstream_thread_mode_and_bare_lf_option() -> None:
    up = ScriptedUpstream(bare_lf_ends_data=True, extensions=["PIPELINING"]).start_in_thread()
    try:
        with RawSMTP("127.0.0.1", up.port) as c:
            c.banner()
            assert c.cmd("EHLO x").lines == ["upstream.mailgate.test", "PIPELINING"]
            c.cmd("MAIL FROM:<a@example.org>")
            c.cmd("RCPT TO:<bob@example.test>")
            c.cmd("DATA")
            c.send(b"hi\n.\nMAIL FROM:<evil@example.org>\r\n")
            assert c.read_reply().code == 250  # lax server: LF.LF ended DATA
            assert c.read_reply().code == 250  # ... and the smuggled MAIL ran
        up.refuse()
        with pytest.raises(ConnectionRefusedError):
            RawSMTP("127.0.0.1", up.port)
        up.accept()
        RawSMTP("127.0.0.1", up.port).close()
        assert up.wait_for_transactions(1)[0].data == b"hi\n"
        assert b"MAIL FROM:<evil@example.org>\r\n" in up.commands()
    finally:
        up.stop()


# -- mailgate runner -----------------------------------------------------------------------
def test_toml_writer_round_trips() -> None:
    policy = deep_merge(
        {"server": {"listen": ["127.0.0.1:1"], "mode": "enforce"}},
        {
            "server.mode": "monitor",
            "dnsbl": {"enabled": True, "zones": [{"zone": "bl.test", "score": 10.0}]},
            "scores": {"SPF_PASS": -1.0},
            "greylist": {"delay": "5m", "ipv4_prefix": 24},
            "server.tls": {"cert_file": 'a "quoted"\\path'},
        },
    )
    assert tomllib.loads(dump_toml(policy)) == policy
    assert policy["server"]["listen"] == ["127.0.0.1:1"]


def test_mailgate_runner_reports_startup_failure(tmp_path: Path) -> None:
    mg = MailgateProcess(tmp_path, {"server": {"no_such_key": 1}})
    with pytest.raises(RuntimeError, match="mailgate exited") as ei:
        mg.start(timeout=15)
    assert "--- stderr ---" in str(ei.value)
    assert "no_such_key = 1" in mg.config_path.read_text()


# -- ports ---------------------------------------------------------------------------------
def test_mailgate_starts_again_on_fresh_ports_when_its_ports_were_taken(
    tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    """CI once lost a run to a port taken between the rig's pick and mailgate's bind."""
    mg = MailgateProcess(tmp_path, {"upstream": {"address": upstream.address}})
    first = (mg.smtp_port, mg.metrics_port)
    holders = [socket.socket(), socket.socket()]
    try:
        for holder, port in zip(holders, first, strict=True):
            holder.bind(("127.0.0.1", port))  # bound, not listening: connects are refused
        mg.start()
        try:
            assert mg.smtp_port != first[0] and mg.metrics_port != first[1]
            with smtp_client("127.0.0.1", mg.smtp_port) as client:
                assert client.ehlo()[0] == 250
        finally:
            mg.stop()
        assert "address already in use" in mg.logs().lower()  # the first start failed so
    finally:
        for holder in holders:
            holder.close()
